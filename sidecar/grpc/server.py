"""The gRPC front end's server: grpc's sync server, its calls bridged to the event loop.

It serves ``sidecar.v1.Sidecar`` (:class:`~sidecar.grpc.servicer.SidecarServicer`, through
:mod:`sidecar.grpc.bridge`), the standard ``grpc.health.v1.Health`` service and server
reflection, both ``grpc.reflection.v1.ServerReflection`` (what current clients, grpcurl
included, try first) and the older ``grpc.reflection.v1alpha.ServerReflection`` (what older
ones use), on TCP ``host:grpc_port`` and, when configured, a Unix domain socket. It runs in
the same process as the HTTP front end; grpc's work (HTTP/2, its completion queue,
(de)serialising) runs in grpc's threads and a pool of ``grpc_max_calls`` threads, while the
servicer and the gateway run on the serving event loop (uvloop included), as HTTP's do. Health
and reflection run in the pool threads alone.

Threads: each call holds one pool thread while it runs (a stream until its last message, a
health ``Watch`` none: it is non-blocking), and at most ``grpc_max_calls`` calls run at once
(``maximum_concurrent_rpcs``): one more is refused at once with RESOURCE_EXHAUSTED, "Concurrent
RPC limit exceeded!", rather than queued behind the others; calls in flight are not
affected. So slow or stalled clients hold only their own calls' threads, each call bounded by
its deadline. The pool threads and grpc's own run at ``SCHED_BATCH`` (Linux): woken, they wait
for the running thread's time slice instead of preempting the event loop, which halves the
context switches per call (docs/benchmarks.md, gRPC).

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
flight ``grace`` seconds to finish and cancels the rest (which cancels their coroutines).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from concurrent import futures
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from sidecar.config import ServerConfig
from sidecar.gateway import Current
from sidecar.grpc.bridge import bridged
from sidecar.grpc.servicer import SERVICE_NAME, SidecarServicer
from sidecar.request_meta import MAX_HEAD_BYTES

REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"
_V1_FILE = "grpc/reflection/v1/reflection.proto"
_V1_PACKAGE = "grpc.reflection.v1"

TRANSPORT_OPTIONS: tuple[tuple[str, int], ...] = (
    # Without this a second sidecar could bind the same port and steal half the connections.
    ("grpc.so_reuseport", 0),
    # No bandwidth-delay probing: its pings cost about 3% of a small unary call's CPU on
    # loopback, where the default 64 KiB window is never the limit.
    ("grpc.http2.bdp_probe", 0),
)
"""The server's options that do not depend on the config (``benchmarks/grpc_floor.py``
serves with them too)."""


class GrpcServer:
    """Not started by construction; one :meth:`start`, then :meth:`drain` and
    :meth:`stop`. Must be built and used inside the serving event loop, whose coroutines
    the calls run as."""

    def __init__(self, current: Current, config: ServerConfig) -> None:
        self._config = config
        host = f"[{config.host}]" if ":" in config.host else config.host
        self._tcp = f"{host}:{config.grpc_port}" if config.grpc_port else None
        self._uds = "unix:" + os.path.abspath(config.uds) if config.uds else None
        loop = asyncio.get_running_loop()
        self._threads_before = _thread_ids()
        self._pool = futures.ThreadPoolExecutor(
            max_workers=config.grpc_max_calls, thread_name_prefix="sidecar-grpc",
            initializer=_batch_scheduling)
        self._server = grpc.server(self._pool, options=[
            *TRANSPORT_OPTIONS,
            ("grpc.max_receive_message_length", config.max_body_bytes),
            # The same cap as HTTP heads.
            ("grpc.max_metadata_size", MAX_HEAD_BYTES),
            ("grpc.absolute_max_metadata_size", MAX_HEAD_BYTES),
        ], maximum_concurrent_rpcs=config.grpc_max_calls)
        servicer = SidecarServicer(current, max_timeout_s=config.max_request_timeout_s)
        self._add(SERVICE_NAME,
                  {name: bridged(h, loop) for name, h in servicer.handlers().items()})
        # Watch is non-blocking: a watcher holds no thread between its messages.
        self._health = health.HealthServicer(experimental_non_blocking=True)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        reflecting = reflection.ReflectionServicer(
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
            self._health.set(service, health_pb2.HealthCheckResponse.SERVING)  # no watchers yet
        self._server.start()
        # grpc's own threads (its completion queue's, its executor's), started by now.
        for tid in _thread_ids() - self._threads_before:
            _batch_scheduling(tid)
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
        # In a thread: pushing the status to a Watch waits until grpc sent it.
        await asyncio.to_thread(self._health.enter_graceful_shutdown)

    async def stop(self, grace: float) -> None:
        """Refuse new calls, wait up to ``grace`` seconds for calls in flight, then
        cancel them (which cancels their gateway calls)."""
        stopped = self._server.stop(grace)
        await asyncio.to_thread(stopped.wait)
        self._pool.shutdown(wait=False)


def _thread_ids() -> set[int]:
    try:
        return {int(t) for t in os.listdir("/proc/self/task")}
    except OSError:  # not Linux
        return set()


def _batch_scheduling(tid: int = 0) -> None:
    """Thread ``tid`` (0: this one) to SCHED_BATCH, where the platform has it."""
    policy = getattr(os, "SCHED_BATCH", None)
    if policy is None:
        return
    with contextlib.suppress(OSError):
        os.sched_setscheduler(tid, policy, os.sched_param(0))


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
