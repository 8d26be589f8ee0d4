"""A kubelet-like CSI client: publish and unpublish volumes on a running agent.

It sends exactly what kubelet sends for an inline ephemeral volume (docs/architecture.md,
"Publish"), so a person can drive an agent in standalone mode, or debug one on a live node,
without a cluster.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

import grpc

from agent.csi import csi_pb2, csi_pb2_grpc


@dataclass(frozen=True)
class PodIdentity:
    name: str = "standalone"
    namespace: str = "default"
    uid: str = ""
    service_account: str = "default"


def kubelet_volume_id(pod_uid: str, volume_name: str) -> str:
    """kubelet's id for an inline volume: "csi-" and a sha256 hex digest (68 characters)."""
    digest = hashlib.sha256(f"{pod_uid}/{volume_name}".encode()).hexdigest()
    return "csi-" + digest


def pod_volume_context(pod: PodIdentity, attributes: Mapping[str, str]) -> dict[str, str]:
    """The user's attributes plus what kubelet adds when the CSIDriver has podInfoOnMount."""
    context = dict(attributes)
    context.update(
        {
            "csi.storage.k8s.io/pod.name": pod.name,
            "csi.storage.k8s.io/pod.namespace": pod.namespace,
            "csi.storage.k8s.io/pod.uid": pod.uid,
            "csi.storage.k8s.io/serviceAccount.name": pod.service_account,
            "csi.storage.k8s.io/ephemeral": "true",
        }
    )
    return context


def publish_request(
    *,
    volume_id: str,
    target_path: str,
    volume_context: Mapping[str, str],
    fs_group: int | None = None,
    readonly: bool = True,
) -> csi_pb2.NodePublishVolumeRequest:
    mount = csi_pb2.VolumeCapability.MountVolume(
        volume_mount_group=str(fs_group) if fs_group is not None else ""
    )
    capability = csi_pb2.VolumeCapability(
        mount=mount,
        access_mode=csi_pb2.VolumeCapability.AccessMode(
            mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER
        ),
    )
    return csi_pb2.NodePublishVolumeRequest(
        volume_id=volume_id,
        target_path=target_path,
        volume_capability=capability,
        readonly=readonly,
        volume_context=dict(volume_context),
    )


class CSIClient:
    """Blocking calls to an agent's CSI socket."""

    def __init__(self, endpoint: str, timeout: float = 120.0) -> None:
        self.channel = grpc.insecure_channel(endpoint)
        self.node = csi_pb2_grpc.NodeStub(self.channel)
        self.identity = csi_pb2_grpc.IdentityStub(self.channel)
        self.timeout = timeout

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> CSIClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def publish(self, request: csi_pb2.NodePublishVolumeRequest) -> None:
        self.node.NodePublishVolume(request, timeout=self.timeout)

    def unpublish(self, volume_id: str, target_path: str) -> None:
        self.node.NodeUnpublishVolume(
            csi_pb2.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=target_path),
            timeout=self.timeout,
        )

    def plugin_info(self) -> csi_pb2.GetPluginInfoResponse:
        response: csi_pb2.GetPluginInfoResponse = self.identity.GetPluginInfo(
            csi_pb2.GetPluginInfoRequest(), timeout=self.timeout
        )
        return response
