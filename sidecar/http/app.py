"""Litestar application: OpenAI-compatible routes over the :class:`~sidecar.gateway.Gateway`.

Bodies are read as bytes and decoded with msgspec straight into the request Structs (no
pydantic, no OpenAPI schema generation in the request path; ``/openapi.json`` is built
from the same Structs by :mod:`sidecar.http.openapi`). Answers from OpenAI-compatible
providers are relayed as their own bytes. Every error leaves as OpenAI's envelope, with the
status from :mod:`sidecar.errors`; unexpected exceptions become a generic 500 and are logged
here, never sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Coroutine
from typing import Any

import msgspec
from litestar import Litestar, Request, Response, get, post
from litestar.exceptions import HTTPException
from litestar.response import Stream

from sidecar.errors import (
    InvalidRequest,
    ModelNotFound,
    PayloadTooLarge,
    SidecarError,
    Unavailable,
)
from sidecar.gateway import Completed, Context, Gateway, error_body, shut_down
from sidecar.http.openapi import openapi_document
from sidecar.http.sse import sse
from sidecar.request_meta import api_key, request_id_of, retry_after, served_meta
from sidecar.types import MAX_DEPTH, Call, Op, validate_call

log = logging.getLogger("sidecar.http")

_JSON = "application/json"
_SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
_object_decoder = msgspec.json.Decoder(dict[str, Any])
_INLINE_DECODE_BYTES = 64 * 1024
_encoder = msgspec.json.Encoder()


def decode_call(op: Op, body: bytes) -> Call:
    """Validate a client body for ``op``. Raises :class:`InvalidRequest` with the path."""
    try:
        raw = _object_decoder.decode(body)
    except msgspec.ValidationError as e:
        if str(e).startswith("Expected `object`"):
            raise InvalidRequest("The request body must be a JSON object.") from None
        raise InvalidRequest(f"The request body is not valid: {e}") from None  # 1e999
    except msgspec.DecodeError as e:
        raise InvalidRequest(f"The request body is not valid JSON: {e}") from None
    except RecursionError:  # thousands of nested brackets: never a real request
        raise InvalidRequest(f"The request body nests deeper than {MAX_DEPTH} levels.") from None
    return validate_call(op, raw)


async def _unless_client_leaves(request: Request[Any, Any, Any],
                                call: Coroutine[Any, Any, Completed],
                                gateway: Gateway) -> Completed | None:
    """Await ``call``; if the client disconnects first, cancel it (so a local generation
    frees its sequence and a remote call is closed) and return None. If the gateway is
    cut first (the shutdown grace is over), cancel it and raise the shut-down 503."""
    task = asyncio.ensure_future(call)
    gone = asyncio.ensure_future(_disconnected(request))
    stop = asyncio.ensure_future(gateway.until_cut())
    try:
        await asyncio.wait((task, gone, stop), return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        gone.cancel()
        stop.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    if gateway.is_cut:
        raise shut_down()
    return None


async def _disconnected(request: Request[Any, Any, Any]) -> None:
    """Return when the ASGI server reports the client gone (the body was read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _timeout(request: Request[Any, Any, Any]) -> float | None:
    value = request.headers.get("x-sidecar-timeout")
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        raise InvalidRequest(
            "x-sidecar-timeout must be a number of seconds.", param="x-sidecar-timeout"
        ) from None


def _models_body(gateway: Gateway) -> bytes:
    """``GET /v1/models``."""
    data = [{"id": id, "object": "model", "created": 0, "owned_by": owner}
            for id, owner in gateway.models()]
    return _encoder.encode({"object": "list", "data": data})


def error_response(err: SidecarError, request_id: str | None = None) -> Response[bytes]:
    """The error envelope, with ``retry-after`` when known and ``x-should-retry`` (which
    the OpenAI SDKs obey over their own status rules) always."""
    headers = {"x-request-id": request_id or uuid.uuid4().hex,
               "x-should-retry": "true" if err.should_retry else "false"}
    if err.retry_after_s is not None:
        headers["retry-after"] = retry_after(err.retry_after_s)
    return Response(error_body(err), status_code=err.status, media_type=_JSON, headers=headers)


def create_app(gateway: Gateway, *, max_body_bytes: int) -> Litestar:
    """Build the HTTP application. ``gateway`` is owned by the caller."""

    async def serve(op: Op, request: Request[Any, Any, Any]) -> Response[Any]:
        request_id = request_id_of(request.headers)
        request.state.request_id = request_id
        # Authentication comes before anything else looks at the request.
        identity = gateway.authenticate(api_key(request.headers))
        ctx = Context(request_id, gateway.deadline(_timeout(request)), identity)
        body = await request.body()
        # Checking a big body's every value takes a while (~0.1 s per MB of tiny arrays):
        # off the event loop, which the GIL then still lets run every few milliseconds.
        call = (decode_call(op, body) if len(body) < _INLINE_DECODE_BYTES
                else await asyncio.to_thread(decode_call, op, body))
        if call.stream:
            streaming = await gateway.stream(call, ctx)
            headers = served_meta(request_id, streaming)
            return Stream(
                sse(streaming.events), media_type="text/event-stream",
                headers=headers | _SSE_HEADERS,
            )
        done = await _unless_client_leaves(request, gateway.complete(call, ctx), gateway)
        if done is None:  # nobody is left to answer; the call was cancelled upstream
            return Response(b"", status_code=499)
        return Response(
            done.reply.body,
            media_type=_JSON,
            headers=served_meta(request_id, done),
        )

    @post("/v1/chat/completions", status_code=200)
    async def chat(request: Request[Any, Any, Any]) -> Response[Any]:
        """Create a chat completion (OpenAI's, stream or not)."""
        return await serve(Op.CHAT, request)

    @post("/v1/completions", status_code=200)
    async def completions(request: Request[Any, Any, Any]) -> Response[Any]:
        """Create a text completion (legacy)."""
        return await serve(Op.COMPLETIONS, request)

    @post("/v1/embeddings", status_code=200)
    async def embeddings(request: Request[Any, Any, Any]) -> Response[Any]:
        """Create embeddings."""
        return await serve(Op.EMBEDDINGS, request)

    models_body = _models_body(gateway)

    @get("/v1/models")
    async def models(request: Request[Any, Any, Any]) -> Response[bytes]:
        """List the models clients may ask for: routes, then provider/model targets."""
        gateway.authenticate(api_key(request.headers))
        return Response(models_body, media_type=_JSON)

    @get("/v1/sidecar/budgets")
    async def budgets(request: Request[Any, Any, Any]) -> Response[bytes]:
        """Every budget's current window (per-key ones of the caller only)."""
        identity = gateway.authenticate(api_key(request.headers))
        return Response(await gateway.budgets(identity), media_type=_JSON)

    @get("/v1/sidecar/status")
    async def status(request: Request[Any, Any, Any]) -> Response[bytes]:
        """Host pressure, targets' health and load, local models, route reasons."""
        gateway.authenticate(api_key(request.headers))
        return Response(gateway.status(), media_type=_JSON)

    @get("/healthz")
    async def healthz() -> Response[bytes]:
        """Liveness: 200 while the process serves."""
        return Response(b'{"status":"ok"}', media_type=_JSON)

    @get("/readyz")
    async def readyz() -> Response[bytes]:
        """Readiness: 200, or 503 while draining; targets' circuits."""
        ready, body = gateway.readiness()
        return Response(body, status_code=200 if ready else 503, media_type=_JSON)

    def on_sidecar_error(request: Request[Any, Any, Any], exc: SidecarError) -> Response[bytes]:
        return error_response(exc, getattr(request.state, "request_id", None))

    def on_http_error(request: Request[Any, Any, Any], exc: HTTPException) -> Response[bytes]:
        err: SidecarError
        if exc.status_code == 413:
            err = PayloadTooLarge(f"The request body is larger than {max_body_bytes} bytes.")
        elif exc.status_code == 404:
            err = ModelNotFound(f"No route for {request.method} {request.url.path}.")
            err.code = "not_found"
        elif exc.status_code == 405:
            err = InvalidRequest(f"Method {request.method} is not allowed on {request.url.path}.")
            err.status = 405
        elif exc.status_code >= 500:
            err = Unavailable("The sidecar could not handle the request.")
        else:
            err = InvalidRequest(str(exc.detail))
        return error_response(err, getattr(request.state, "request_id", None))

    def on_unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        err = SidecarError("The sidecar hit an internal error.")
        return error_response(err, getattr(request.state, "request_id", None))

    document: list[bytes] = []  # built on first use, from the finished app's routes

    @get("/openapi.json")
    async def openapi(request: Request[Any, Any, Any]) -> Response[bytes]:
        """The OpenAPI document of this API; needs a client key like ``/v1/models``."""
        gateway.authenticate(api_key(request.headers))
        if not document:
            document.append(_encoder.encode(openapi_document(request.app, auth=gateway.auth)))
        return Response(document[0], media_type=_JSON)

    return Litestar(
        route_handlers=[chat, completions, embeddings, models, budgets, status, healthz,
                        readyz, openapi],
        exception_handlers={
            SidecarError: on_sidecar_error,
            HTTPException: on_http_error,
            Exception: on_unexpected,
        },
        request_max_body_size=max_body_bytes,
        openapi_config=None,
        logging_config=None,
        debug=False,
    )


