"""The parts an agent starts besides its CA: data root, API client, watches, Events, status
socket, PodCertificateRequest signing and the CSI gRPC server."""

from __future__ import annotations

import logging
import os
from concurrent import futures
from typing import Any

import grpc

from agent.agent_base import (
    AgentBase,
    StartupError,
)
from agent.csi import endpoint
from agent.csi.admission import VolumeOperationSlots
from agent.csi.handlers import add_csi_servicers
from agent.csi.service import IdentityServicer, NodeServicer
from agent.observe.status_socket import STATUS_SOCKET, StatusServer

# The server's logger: its parts log as one component, as before the split.
log = logging.getLogger("agent.server")


class AgentParts(AgentBase):
    """How each part is made, started and registered for the stop."""

    def _prepare_data_root(self) -> None:
        root = self.config.data_root
        root.mkdir(parents=True, exist_ok=True)
        os.chmod(root, 0o700)
        volumes = root / "volumes"
        volumes.mkdir(exist_ok=True)
        if self.mounter.can_mount:
            # Keys live in memory only: payloads sit on a tmpfs that no disk ever sees.
            if not self.mounter.is_tmpfs(volumes):
                # Mounted by this start, so empty: a start that fails takes it away again.
                # (A tmpfs found mounted holds live volumes and always stays.)
                self._rollback.append(lambda: self.mounter.unmount_tmpfs(volumes))
            self.mounter.ensure_tmpfs(volumes, self.config.tmpfs_size_bytes)
        elif not self.config.standalone:
            reason = getattr(self.mounter, "reason", "no mount privilege")
            raise RuntimeError(
                f"the agent cannot mount ({reason}); it needs root, CAP_SYS_ADMIN (run the "
                "container privileged) and a writable temporary directory ($TMPDIR or /tmp) "
                "for its mount probe; only --standalone may run without mounts"
            )
        else:
            log.warning(
                "not running as root: volumes are written straight into their target "
                "directories instead of being bind-mounted read-only, and payloads are "
                "not on a tmpfs. Fine for trying the agent out; in a cluster it always mounts.",
                extra={"data_root": str(root)},
            )

    def _kubernetes_client(self) -> Any:
        from agent.kube.client import KubeSettings, make_api_client

        return make_api_client(
            KubeSettings(
                kubeconfig=self.config.kubeconfig,
                qps=self.config.kube_qps,
                burst=self.config.kube_burst,
            )
        )

    def _attach_pod_and_trust_watches(self, api: Any) -> None:
        """The pod watch (${POD_IP}) and trust-bundle watches; both start on first use."""
        manager, config = self.manager, self.config
        manager.pod_ips.wait_timeout = manager.trust.wait_timeout = config.issue_timeout_seconds
        manager.trust.start()
        self._closers.append(manager.trust.stop)
        if api is None:
            return
        from agent.kube.pods import PodIPWatch
        from agent.kube.trust_bundles import TrustBundleWatcher

        bundles = TrustBundleWatcher(
            api, on_change=manager.trust.on_change, on_problem=manager.trust.on_problem
        )
        manager.trust.watcher = bundles
        self._closers.append(bundles.stop)
        if config.pod_watch == "off":
            manager.pod_ips.disabled_reason = "the agent runs with --pod-watch=off"
            return
        pods = PodIPWatch(api, config.node_id, on_ips=manager.pod_ips.on_pod_ips)
        manager.pod_ips.source = pods
        self._closers.append(pods.stop)
        if config.pod_watch == "on":
            pods.start()

    def _start_status(self) -> None:
        """The read-only socket `cert-agent status` reads; without it the agent still serves."""
        status = StatusServer(self.config.data_root / STATUS_SOCKET, self.manager.status)
        try:
            status.start()
        except OSError as exc:  # e.g. a data root path too long for a UNIX socket (108 bytes)
            log.error("cannot serve `cert-agent status`", extra={"error": str(exc)})
            return
        self.status_server = status
        self._closers.append(status.stop)

    def _start_events(self, api: Any) -> None:
        """Events on pods, written by one background thread; best effort (see kube/events.py)."""
        from agent.kube.events import EventRecorder
        from agent.kube.volume_events import KubeVolumeEvents

        recorder = EventRecorder(
            api,
            controller=self.config.driver_name,
            instance=self.config.node_id,
            clock=self.clock,
            on_result=self.metrics.event_result,
        )
        recorder.start()
        self._closers.append(recorder.stop)
        self.events = recorder
        self.manager.attach_events(KubeVolumeEvents(recorder))

    def _start_pcr(self, api: Any) -> None:
        """PodCertificateRequest signing (docs/pod-certificates.md), with the local CA."""
        from agent.issuers.pcr_policy import pcr_policy
        from agent.issuers.pcr_service import PcrService

        self.pcr = PcrService(
            api,
            node=self.config.node_id,
            signers=self.config.pcr_signers,
            ca=self.ca_provider,
            registry=self.metrics.registry,
            publish_trust_bundle=self.config.pcr_publish_trust_bundle,
            leaf_guard=None if self.node_ca is None else self.node_ca.check_leaf,
            policy=pcr_policy(self.policy),
        )
        self._closers.append(self.pcr.stop)
        self.pcr.start()

    def _start_grpc(self) -> None:
        socket_path = self.config.socket_path
        socket_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # Again, right before binding: another agent may have started meanwhile.
            endpoint.claim(socket_path)
        except endpoint.EndpointInUse as exc:
            raise StartupError(f"--endpoint {self.config.endpoint}: {exc}") from exc
        # Volume operations get --grpc-workers threads; a few more stay free for Probe & co.
        slots = VolumeOperationSlots(self.config.grpc_workers)
        server = grpc.server(
            futures.ThreadPoolExecutor(
                max_workers=slots.pool_size, thread_name_prefix="cert-agent-grpc"
            )
        )
        add_csi_servicers(
            server,
            {
                "Identity": IdentityServicer(
                    self.config.driver_name, self.metrics, self.probe_ready
                ),
                "Node": NodeServicer(self.manager, self.config.node_id, self.metrics, slots),
            },
        )
        if server.add_insecure_port(f"unix://{socket_path}") == 0:
            raise StartupError(f"cannot listen on --endpoint {self.config.endpoint}")
        self.grpc_server = server
        server.start()
        self._socket_inode = endpoint.inode(socket_path)
        # kubelet and the registrar run as root; nobody else needs the socket.
        os.chmod(socket_path, 0o660)
