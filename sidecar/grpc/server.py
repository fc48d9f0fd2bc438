"""The gRPC front end's server: one ``grpc.aio`` server on the running event loop.

It serves ``sidecar.v1.Sidecar`` (:class:`~sidecar.grpc.servicer.SidecarServicer`), the
standard ``grpc.health.v1.Health`` service and server reflection, both
``grpc.reflection.v1.ServerReflection`` (what current clients, grpcurl included, try first)
and the older ``grpc.reflection.v1alpha.ServerReflection`` (what older ones use), on TCP
``host:grpc_port`` and, when configured, a Unix domain socket. It runs in the same process
and event loop as the HTTP front end (uvloop included: grpc.aio schedules its work on
whatever loop is running) and calls the same :class:`~sidecar.gateway.Gateway`.

Reflection v1: grpcio-reflection only ships v1alpha. The two protos differ only in their
package name (every message and field number is the same, so the messages are identical on
the wire), so one v1alpha servicer answers both service names. Its descriptor pool is
:class:`_ReflectedFiles`: every file in protobuf's default pool (the generated modules this
process imported, as before) plus ``grpc/reflection/v1/reflection.proto``, derived from the
v1alpha file by renaming its package, so that a client can also describe the v1 service
itself (``grpcurl describe`` does, for every service listed). Both names are listed.

Lifecycle: :meth:`GrpcServer.start` binds and starts serving (raises :class:`OSError`
naming the address it could not listen on); :meth:`GrpcServer.drain` turns the health
status NOT_SERVING (pushed to ``Watch`` streams at once; new calls are then refused by
the gateway with UNAVAILABLE); :meth:`GrpcServer.stop` refuses new calls, gives calls in
flight ``grace`` seconds to finish and cancels the rest.
"""

from __future__ import annotations

import os
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from sidecar.config import ServerConfig
from sidecar.gateway import Current
from sidecar.grpc.servicer import SERVICE_NAME, SidecarServicer
from sidecar.request_meta import MAX_HEAD_BYTES

REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"
_V1_FILE = "grpc/reflection/v1/reflection.proto"
_V1_PACKAGE = "grpc.reflection.v1"


class GrpcServer:
    """Not started by construction; one :meth:`start`, then :meth:`drain` and
    :meth:`stop`. Must be built and used inside the serving event loop."""

    def __init__(self, current: Current, config: ServerConfig) -> None:
        self._config = config
        host = f"[{config.host}]" if ":" in config.host else config.host
        self._tcp = f"{host}:{config.grpc_port}" if config.grpc_port else None
        self._uds = "unix:" + os.path.abspath(config.uds) if config.uds else None
        self._server = grpc.aio.server(options=[
            # Without this a second sidecar could bind the same port and steal half the
            # connections.
            ("grpc.so_reuseport", 0),
            ("grpc.max_receive_message_length", config.max_body_bytes),
            # The same cap as HTTP heads.
            ("grpc.max_metadata_size", MAX_HEAD_BYTES),
            ("grpc.absolute_max_metadata_size", MAX_HEAD_BYTES),
        ])
        servicer = SidecarServicer(current, max_timeout_s=config.max_request_timeout_s)
        self._add(SERVICE_NAME, servicer.handlers())
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        reflecting = reflection.aio.ReflectionServicer(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME, REFLECTION_V1),
            pool=descriptor_pool.DescriptorPool(_ReflectedFiles()))
        # The v1alpha messages serve v1 too: they are the same on the wire.
        info = grpc.stream_stream_rpc_method_handler(
            reflecting.ServerReflectionInfo,
            request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)
        for name in (REFLECTION_V1, reflection.SERVICE_NAME):
            self._add(name, {"ServerReflectionInfo": info})

    def _add(self, service: str, handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]) -> None:
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service, handlers),))
        self._server.add_registered_method_handlers(service, handlers)

    async def start(self) -> list[str]:
        """Bind and serve; returns the addresses listened on (``host:port``, and
        ``unix:PATH`` when ``uds`` is set)."""
        addresses = []
        if self._tcp is not None:
            port = self._bind(self._tcp)
            addresses.append(f"{self._config.host}:{port}")
        if self._uds is not None:
            self._bind(self._uds)
            addresses.append(self._uds)
        for service in ("", SERVICE_NAME):
            await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        await self._server.start()
        return addresses

    def _bind(self, address: str) -> int:
        try:
            port = self._server.add_insecure_port(address)
        except RuntimeError as e:
            raise OSError(f"gRPC cannot listen on {address}: {e}") from None
        if port == 0 and not address.startswith("unix:"):
            raise OSError(f"gRPC cannot listen on {address}")
        return port

    async def drain(self) -> None:
        """Report NOT_SERVING from now on (for good)."""
        await self._health.enter_graceful_shutdown()

    async def stop(self, grace: float) -> None:
        """Refuse new calls, wait up to ``grace`` seconds for calls in flight, then
        cancel them (which cancels their gateway calls)."""
        await self._server.stop(grace)


class _ReflectedFiles:
    """The descriptor database behind server reflection (what a
    :class:`~google.protobuf.descriptor_pool.DescriptorPool` built on it asks): the files of
    protobuf's default pool, looked up there at each call, plus the v1 reflection proto.
    Both lookups raise :class:`KeyError` for what neither has (reflection answers
    NOT_FOUND)."""

    def __init__(self) -> None:
        self._default = descriptor_pool.Default()
        self._v1 = _reflection_v1_file()

    def FindFileByName(self, name: str) -> descriptor_pb2.FileDescriptorProto:
        if name == self._v1.name:
            return self._v1
        return _proto_of(self._default.FindFileByName(name).serialized_pb)

    def FindFileContainingSymbol(self, symbol: str) -> descriptor_pb2.FileDescriptorProto:
        if symbol.startswith(_V1_PACKAGE + "."):
            return self._v1
        return _proto_of(self._default.FindFileContainingSymbol(symbol).serialized_pb)


def _proto_of(serialized: bytes) -> descriptor_pb2.FileDescriptorProto:
    return descriptor_pb2.FileDescriptorProto.FromString(serialized)


def _reflection_v1_file() -> descriptor_pb2.FileDescriptorProto:
    """``grpc/reflection/v1/reflection.proto`` as grpc-proto publishes it (less comments):
    the v1alpha file with package ``grpc.reflection.v1`` and v1's file options."""
    file = _proto_of(reflection_pb2.DESCRIPTOR.serialized_pb)
    old, new = f".{file.package}.", f".{_V1_PACKAGE}."
    file.name, file.package = _V1_FILE, _V1_PACKAGE
    file.options.ClearField("deprecated")
    file.options.java_package = "io.grpc.reflection.v1"
    file.options.go_package = "google.golang.org/grpc/reflection/grpc_reflection_v1"

    def renamed(type_name: str) -> str:
        return new + type_name.removeprefix(old) if type_name.startswith(old) else type_name

    messages = list(file.message_type)
    while messages:
        message = messages.pop()
        messages.extend(message.nested_type)
        for field in message.field:
            if field.HasField("type_name"):  # setting it, even to "", would add one
                field.type_name = renamed(field.type_name)
    for service in file.service:
        for method in service.method:
            method.input_type = renamed(method.input_type)
            method.output_type = renamed(method.output_type)
    return file
