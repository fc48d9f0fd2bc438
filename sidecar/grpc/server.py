"""The gRPC front end's server: one ``grpc.aio`` server on the running event loop.

It serves ``sidecar.v1.Sidecar`` (:class:`~sidecar.grpc.servicer.SidecarServicer`), the
standard ``grpc.health.v1.Health`` service and server reflection (v1alpha, what grpcurl
and grpc_health_probe use), on TCP ``host:grpc_port`` and, when configured, a Unix domain
socket. It runs in the same process and event loop as the HTTP front end (uvloop
included: grpc.aio schedules its work on whatever loop is running) and calls the same
:class:`~sidecar.gateway.Gateway`.

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
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from sidecar.config import ServerConfig
from sidecar.gateway import Gateway
from sidecar.grpc.servicer import SERVICE_NAME, SidecarServicer
from sidecar.request_meta import MAX_HEAD_BYTES


class GrpcServer:
    """Not started by construction; one :meth:`start`, then :meth:`drain` and
    :meth:`stop`. Must be built and used inside the serving event loop."""

    def __init__(self, gateway: Gateway, config: ServerConfig) -> None:
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
        servicer = SidecarServicer(gateway, max_timeout_s=config.max_request_timeout_s)
        handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = servicer.handlers()
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
        self._server.add_registered_method_handlers(SERVICE_NAME, handlers)
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server)

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
