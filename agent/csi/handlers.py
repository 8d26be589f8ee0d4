"""Registers the CSI servicers with the gRPC server, decoding requests ourselves.

The generated ``add_*Servicer_to_server`` functions hand protobuf's ``FromString`` to gRPC, which
answers any undecodable request (for example invalid UTF-8 in a string field) with INTERNAL
"Exception deserializing request!" before our code sees it, and without counting it. Here the
deserializer never raises: it returns an ``UndecodableRequest`` that the servicer turns into
INVALID_ARGUMENT through the same path as every other bad request (see ``service.rpc``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message

from agent.csi import csi_pb2


@dataclass(frozen=True)
class UndecodableRequest:
    """What the servicer receives instead of a request that protobuf could not parse."""

    message_type: str
    error: str
    size: int


def tolerant_deserializer(message_class: type[Message]) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return message_class.FromString(data)
        except DecodeError as exc:
            return UndecodableRequest(message_class.DESCRIPTOR.full_name, str(exc), len(data))

    return parse


def add_csi_servicers(server: grpc.Server, servicers: dict[str, object]) -> None:
    """Register ``servicers`` ({"Identity": ..., "Node": ...}) for the csi.v1 services."""
    for service_name, servicer in servicers.items():
        service = csi_pb2.DESCRIPTOR.services_by_name[service_name]
        handlers = {}
        for method in service.methods:
            request_class = getattr(csi_pb2, method.input_type.name)
            response_class = getattr(csi_pb2, method.output_type.name)
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                getattr(servicer, method.name),
                request_deserializer=tolerant_deserializer(request_class),
                response_serializer=response_class.SerializeToString,
            )
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service.full_name, handlers),)
        )
