"""The CSI Identity and Node gRPC servicers: request checks, error codes, metrics.

The servicers only translate: protobuf in, a ``PublishRequest`` to the volume manager, and every
``AgentError`` out as the gRPC status it names. Anything unexpected is INTERNAL with a pointer to
the agent's log, never a stack trace or key material in the message.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

import grpc
from google.protobuf import wrappers_pb2

from agent import __version__
from agent.csi import csi_pb2, csi_pb2_grpc
from agent.csi.admission import VolumeOperationSlots
from agent.csi.handlers import UndecodableRequest
from agent.errors import AgentError, FailedPrecondition, InvalidArgument, shorten
from agent.observe.metrics import AgentMetrics
from agent.volumes.manager import PublishRequest, VolumeManager

log = logging.getLogger(__name__)

Request = TypeVar("Request")
Response = TypeVar("Response")
Handler = Callable[[Any, Request, grpc.ServicerContext], Response]

# Longest status message sent back: a safety net behind the shortened quotes in each message,
# because gRPC clients refuse status details bigger than their metadata limit.
MAX_MESSAGE_CHARS = 1024

SINGLE_NODE_MODES = {
    csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER,
    csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_READER_ONLY,
    csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_SINGLE_WRITER,
    csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_MULTI_WRITER,
}


def rpc(
    method: str, *, volume_operation: bool = False
) -> Callable[[Handler[Request, Response]], Handler[Request, Response]]:
    """Time the call, count it by code, and map AgentError to its gRPC status.

    A request protobuf could not decode arrives as ``UndecodableRequest`` (see csi/handlers) and
    is answered INVALID_ARGUMENT. A ``volume_operation`` takes one of the servicer's
    ``slots`` (csi/admission) for its duration, or is refused when none is free.
    """

    def decorate(handler: Handler[Request, Response]) -> Handler[Request, Response]:
        @functools.wraps(handler)
        def wrapper(self: Any, request: Request, context: grpc.ServicerContext) -> Response:
            started = time.monotonic()
            code = "OK"
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "%s called",
                    method,
                    extra={
                        "method": method,
                        "volume_id": _shown_field(request, "volume_id"),
                        "target_path": _shown_field(request, "target_path"),
                    },
                )
            try:
                if isinstance(request, UndecodableRequest):
                    raise InvalidArgument(
                        f"the request ({request.size} bytes) is not a valid "
                        f"{request.message_type}: {request.error}; string fields must be UTF-8"
                    )
                if volume_operation:
                    with self.slots.hold(method):
                        return handler(self, request, context)
                return handler(self, request, context)
            except AgentError as exc:
                code = exc.code
                context.abort(grpc.StatusCode[exc.code], shorten(exc.message, MAX_MESSAGE_CHARS))
            except Exception:
                code = "INTERNAL"
                log.exception("%s failed unexpectedly", method)
                context.abort(
                    grpc.StatusCode.INTERNAL,
                    f"{method} failed with an internal error; the agent's log on this node "
                    "has the details",
                )
            finally:
                self.metrics.observe_grpc(method, code, time.monotonic() - started)
                if code != "OK":
                    log.info("%s answered %s", method, code, extra={"method": method})
            raise AssertionError("unreachable: context.abort raises")

        return wrapper

    return decorate


def _shown_field(request: object, name: str) -> str | None:
    value = getattr(request, name, None)
    return shorten(value) if isinstance(value, str) else None


class IdentityServicer(csi_pb2_grpc.IdentityServicer):
    def __init__(
        self, driver_name: str, metrics: AgentMetrics, ready: Callable[[], tuple[bool, str]]
    ) -> None:
        self.driver_name = driver_name
        self.metrics = metrics
        self.ready = ready

    @rpc("GetPluginInfo")
    def GetPluginInfo(
        self, request: csi_pb2.GetPluginInfoRequest, context: grpc.ServicerContext
    ) -> csi_pb2.GetPluginInfoResponse:
        return csi_pb2.GetPluginInfoResponse(name=self.driver_name, vendor_version=__version__)

    @rpc("GetPluginCapabilities")
    def GetPluginCapabilities(
        self, request: csi_pb2.GetPluginCapabilitiesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.GetPluginCapabilitiesResponse:
        # A node-only plugin: no controller service, no topology constraints.
        return csi_pb2.GetPluginCapabilitiesResponse()

    @rpc("Probe")
    def Probe(
        self, request: csi_pb2.ProbeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ProbeResponse:
        ok, reason = self.ready()
        if not ok:
            raise FailedPrecondition(f"not ready: {reason}")
        return csi_pb2.ProbeResponse(ready=wrappers_pb2.BoolValue(value=True))


class NodeServicer(csi_pb2_grpc.NodeServicer):
    def __init__(
        self,
        manager: VolumeManager,
        node_id: str,
        metrics: AgentMetrics,
        slots: VolumeOperationSlots | None = None,
    ) -> None:
        self.manager = manager
        self.node_id = node_id
        self.metrics = metrics
        self.slots = slots if slots is not None else VolumeOperationSlots(8)

    @rpc("NodePublishVolume", volume_operation=True)
    def NodePublishVolume(
        self, request: csi_pb2.NodePublishVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodePublishVolumeResponse:
        self.manager.publish(publish_request_from_proto(request))
        return csi_pb2.NodePublishVolumeResponse()

    @rpc("NodeUnpublishVolume", volume_operation=True)
    def NodeUnpublishVolume(
        self, request: csi_pb2.NodeUnpublishVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeUnpublishVolumeResponse:
        if not request.volume_id:
            raise InvalidArgument("volume_id is required")
        if not request.target_path:
            raise InvalidArgument("target_path is required")
        self.manager.unpublish(request.volume_id, request.target_path)
        return csi_pb2.NodeUnpublishVolumeResponse()

    @rpc("NodeGetCapabilities")
    def NodeGetCapabilities(
        self, request: csi_pb2.NodeGetCapabilitiesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeGetCapabilitiesResponse:
        # VOLUME_MOUNT_GROUP makes kubelet pass the pod's fsGroup instead of chowning itself.
        rpc_cap = csi_pb2.NodeServiceCapability.RPC(
            type=csi_pb2.NodeServiceCapability.RPC.VOLUME_MOUNT_GROUP
        )
        return csi_pb2.NodeGetCapabilitiesResponse(
            capabilities=[csi_pb2.NodeServiceCapability(rpc=rpc_cap)]
        )

    @rpc("NodeGetInfo")
    def NodeGetInfo(
        self, request: csi_pb2.NodeGetInfoRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeGetInfoResponse:
        return csi_pb2.NodeGetInfoResponse(node_id=self.node_id)


def publish_request_from_proto(request: csi_pb2.NodePublishVolumeRequest) -> PublishRequest:
    """Check the CSI fields (docs/architecture.md, "Publish"); make the manager's request."""
    if not request.volume_id:
        raise InvalidArgument("volume_id is required")
    if not request.target_path:
        raise InvalidArgument("target_path is required")
    if not request.HasField("volume_capability"):
        raise InvalidArgument("volume_capability is required")
    capability = request.volume_capability
    if capability.HasField("block"):
        raise InvalidArgument("block volumes are not supported: this driver serves a directory")
    if not capability.HasField("mount"):
        raise InvalidArgument("volume_capability must be a mount volume")
    if capability.access_mode.mode not in SINGLE_NODE_MODES:
        mode = csi_pb2.VolumeCapability.AccessMode.Mode.Name(capability.access_mode.mode)
        raise InvalidArgument(
            f"access mode {mode} is not supported: the volume belongs to one pod on one node"
        )
    if request.staging_target_path:
        raise InvalidArgument("staging_target_path must be empty: this driver has no stage step")
    context = dict(request.volume_context)
    if context.get("csi.storage.k8s.io/ephemeral", "true") != "true":
        raise InvalidArgument(
            "only inline ephemeral volumes are supported: declare the volume under the pod's "
            "spec.volumes[].csi, not as a PersistentVolume"
        )
    return PublishRequest(
        volume_id=request.volume_id,
        target_path=request.target_path,
        volume_context=context,
        readonly=request.readonly,
        volume_mount_group=capability.mount.volume_mount_group or None,
    )
