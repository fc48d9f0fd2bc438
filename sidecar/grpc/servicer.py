"""The ``sidecar.v1.Sidecar`` service: gRPC calls onto the :class:`~sidecar.gateway.Gateway`.

Each call, in this order:

1. authenticate from metadata (``authorization: Bearer <key>`` or ``x-api-key``) with the
   HTTP front end's keys, before the request is looked at;
2. build the :class:`~sidecar.gateway.Context`: request id from ``x-request-id`` (when
   well formed) or a new one; deadline from the call's gRPC deadline, which plays the role
   of HTTP's ``x-sidecar-timeout`` (capped at ``max_request_timeout_s``; without one,
   ``request_timeout_s``), so the client's deadline bounds the whole request;
3. translate the request (:mod:`sidecar.grpc.translation`: the same validation and
   messages as HTTP), call the gateway, translate the answer back.

Who served a call, and why there, goes in the response message and in metadata:
trailing for unary calls (``x-request-id``, ``x-sidecar-target``, ``x-sidecar-attempts``,
``x-sidecar-route-reason``, ``x-sidecar-cost-usd``; sent with the status, where initial
metadata would cost an extra write per call), initial for streams (all but the cost, as
soon as the stream commits) with the cost trailing. The cost is left out when the
target's price is unknown.

Errors are translated here, once: a :class:`~sidecar.errors.SidecarError` ends the call
with its ``grpc_code``, its message, rich status details (``google.rpc.ErrorInfo`` with the
HTTP API's error code, ``google.rpc.RetryInfo`` when a retry time is known) and trailing
metadata (``x-request-id``, ``retry-after`` in whole seconds). Anything else is logged and
ends the call with INTERNAL and a fixed message, never a stack trace.

Cancellation: grpc.aio cancels a call's handler task when the client cancels or its
deadline passes. That cancels the gateway call, which stops the upstream HTTP call or the
local generation; a stream handler also closes the stream's events (in ``finally``), so
the stream's cost is settled and its upstream closed at once.

Streams: the gateway's :class:`~sidecar.gateway.Relayed` frames become chunk messages (the
first one stamped with who served it), :class:`~sidecar.gateway.Ended` the closing chunk with
the cost, and :class:`~sidecar.gateway.Failed` ends the call with its error exactly as a
unary call's error would (code, details, ``retry-after``), after the chunks already sent.

Safe for concurrent calls on one event loop; holds no per-call state.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator
from typing import Any, NoReturn, TypeVar

import google.rpc.error_details_pb2 as error_details_pb2
import google.rpc.status_pb2 as status_pb2
import grpc
from google.protobuf import any_pb2, duration_pb2
from grpc_status import rpc_status

from sidecar.cache import directive_of
from sidecar.errors import SidecarError
from sidecar.gateway import (
    Completed,
    Context,
    Current,
    Ended,
    Failed,
    Gateway,
    Relayed,
    StreamEvent,
)
from sidecar.grpc.translation import (
    ChunkReader,
    chat_call,
    chat_response,
    embed_call,
    embed_response,
)
from sidecar.grpc.v1 import sidecar_pb2 as pb
from sidecar.money import format_usd
from sidecar.request_meta import api_key, request_id_of, retry_after, served_meta

log = logging.getLogger("sidecar.grpc")

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["Sidecar"].full_name
# grpc.aio reports "no deadline" as a time remaining of centuries.
_NO_DEADLINE_S = 10 * 365 * 86400.0

Metadata = tuple[tuple[str, str | bytes], ...]
ServicerContext = grpc.aio.ServicerContext[Any, Any]


class SidecarServicer:
    """Implements ``sidecar.v1.Sidecar``; :meth:`handlers` registers it on a server."""

    def __init__(self, current: Current, *, max_timeout_s: float) -> None:
        """Calls go to ``current.gateway``, read once per call (a reload replaces it);
        ``max_timeout_s``: the longest deadline a call may have (longer ones are cut to it),
        ``[server].max_request_timeout_s``."""
        self._current = current
        self._max_timeout_s = max_timeout_s

    def handlers(self) -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
        """The service's method handlers by method name."""
        return {
            "Chat": grpc.unary_unary_rpc_method_handler(
                self.chat,
                request_deserializer=pb.ChatRequest.FromString,
                response_serializer=pb.ChatResponse.SerializeToString,
            ),
            "ChatStream": grpc.unary_stream_rpc_method_handler(
                self.chat_stream,
                request_deserializer=pb.ChatRequest.FromString,
                response_serializer=pb.ChatChunk.SerializeToString,
            ),
            "Embed": grpc.unary_unary_rpc_method_handler(
                self.embed,
                request_deserializer=pb.EmbedRequest.FromString,
                response_serializer=pb.EmbedResponse.SerializeToString,
            ),
            "ListModels": grpc.unary_unary_rpc_method_handler(
                self.list_models,
                request_deserializer=pb.ListModelsRequest.FromString,
                response_serializer=pb.ListModelsResponse.SerializeToString,
            ),
        }

    # --- methods --------------------------------------------------------------------------

    async def chat(self, request: pb.ChatRequest, context: ServicerContext) -> pb.ChatResponse:
        meta = _metadata(context)
        request_id = request_id_of(meta)
        try:
            gateway, ctx = self._context(context, meta, request_id)
            done = await gateway.complete(chat_call(request, stream=False), ctx)
            return _stamped(chat_response(done.reply.body, done.target), done, request_id, context)
        except Exception as e:
            await _fail(context, e, request_id)

    async def chat_stream(self, request: pb.ChatRequest, context: ServicerContext) -> None:
        """Writes chunks with ``context.write`` (not an async generator), so that a
        cancellation lands in this coroutine wherever it waits and ``finally`` closes the
        frames at once rather than when a suspended generator is collected."""
        meta = _metadata(context)
        request_id = request_id_of(meta)
        events: AsyncGenerator[StreamEvent, None] | None = None
        try:
            gateway, ctx = self._context(context, meta, request_id)
            streaming = await gateway.stream(chat_call(request, stream=True), ctx)
            events = streaming.events
            await context.send_initial_metadata(
                tuple(served_meta(request_id, streaming).items()))
            reader = ChunkReader(streaming.target)
            first = True
            async for event in events:
                match event:
                    case Relayed(frame=frame):
                        for chunk in reader.feed(frame):
                            if first:
                                first = False
                                chunk.target = streaming.target
                                chunk.attempts = streaming.attempts
                                chunk.route_reason = streaming.reason
                                chunk.request_id = request_id
                            await context.write(chunk)
                    case Ended(cost=cost):
                        if cost is not None:
                            context.set_trailing_metadata(
                                (("x-sidecar-cost-usd", format_usd(cost)),))
                        await context.write(reader.last_chunk(cost))
                    case Failed(error=error):
                        raise error  # reported like any call's error, just below
        except Exception as e:
            await _fail(context, e, request_id)
        finally:
            if events is not None:
                await events.aclose()

    async def embed(self, request: pb.EmbedRequest, context: ServicerContext) -> pb.EmbedResponse:
        meta = _metadata(context)
        request_id = request_id_of(meta)
        try:
            gateway, ctx = self._context(context, meta, request_id)
            done = await gateway.complete(embed_call(request), ctx)
            return _stamped(embed_response(done.reply.body, done.target), done, request_id, context)
        except Exception as e:
            await _fail(context, e, request_id)

    async def list_models(self, request: pb.ListModelsRequest, context: ServicerContext
                          ) -> pb.ListModelsResponse:
        meta = _metadata(context)
        request_id = request_id_of(meta)
        try:
            gateway = self._current.gateway
            gateway.authenticate(api_key(meta))
            context.set_trailing_metadata((("x-request-id", request_id),))
            return pb.ListModelsResponse(
                models=[pb.Model(id=id, owned_by=owner) for id, owner in gateway.models()])
        except Exception as e:
            await _fail(context, e, request_id)

    # --- helpers --------------------------------------------------------------------------

    def _context(self, context: ServicerContext, meta: dict[str, str], request_id: str
                 ) -> tuple[Gateway, Context]:
        """The gateway this call goes to, and its context (authenticated, with its
        deadline)."""
        gateway = self._current.gateway
        identity = gateway.authenticate(api_key(meta))
        remaining = context.time_remaining()
        if remaining is None or remaining >= _NO_DEADLINE_S:
            deadline = gateway.deadline(None)
        else:
            deadline = gateway.deadline(min(max(remaining, 1e-3), self._max_timeout_s))
        return gateway, Context(request_id, deadline, identity, directive_of(meta))


def _metadata(context: ServicerContext) -> dict[str, str]:
    """The call's text metadata (binary ``-bin`` entries are skipped)."""
    return {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}


_Unary = TypeVar("_Unary", pb.ChatResponse, pb.EmbedResponse)


def _stamped(out: _Unary, done: Completed, request_id: str, context: ServicerContext
             ) -> _Unary:
    """``out`` with who served it, how and at what cost; the same in trailing metadata."""
    out.target, out.attempts, out.request_id = done.target, done.attempts, request_id
    out.route_reason = done.reason
    if done.cost is not None:
        out.cost_micro_usd, out.cost_usd = done.cost, format_usd(done.cost)
    context.set_trailing_metadata(tuple(served_meta(request_id, done).items()))
    return out


def error_status(err: SidecarError) -> tuple[grpc.StatusCode, str, Metadata]:
    """The status code, message and trailing metadata (rich status details included)
    that report ``err``."""
    code = grpc.StatusCode.__members__.get(err.grpc_code, grpc.StatusCode.INTERNAL)
    info = error_details_pb2.ErrorInfo(
        reason=(err.code or err.type or "error").upper(),
        domain="sidecar",
        metadata={k: v for k, v in
                  (("type", err.type), ("code", err.code), ("param", err.param)) if v},
    )
    details = [_pack(info)]
    trailing: list[tuple[str, str | bytes]] = [
        ("x-should-retry", "true" if err.should_retry else "false")]
    if err.retry_after_s is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(round(err.retry_after_s * 1e9))
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
        trailing.append(("retry-after", retry_after(err.retry_after_s)))
    status = rpc_status.to_status(status_pb2.Status(
        code=code.value[0], message=err.message, details=details))
    return code, err.message, tuple(status.trailing_metadata) + tuple(trailing)


def _pack(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


async def _fail(context: ServicerContext, exc: Exception, request_id: str) -> NoReturn:
    """End the call with the status that reports ``exc`` (see the module docstring)."""
    if isinstance(exc, SidecarError):
        err = exc
    else:
        log.error("unexpected error in a gRPC call (request %s)", request_id, exc_info=exc)
        err = SidecarError("The sidecar hit an internal error.")
    code, message, trailing = error_status(err)
    await context.abort(code, message, (("x-request-id", request_id), *trailing))
