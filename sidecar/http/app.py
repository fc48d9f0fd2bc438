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
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import msgspec
from litestar import Litestar, Request, Response, get, post
from litestar.exceptions import HTTPException
from litestar.response import Stream

from sidecar.cache import directive_of
from sidecar.config import ConfigError
from sidecar.errors import (
    InvalidRequest,
    ModelNotFound,
    PayloadTooLarge,
    SidecarError,
    Unauthenticated,
    Unavailable,
)
from sidecar.gateway import Completed, Context, Current, Gateway, shut_down
from sidecar.http.openapi import openapi_document
from sidecar.http.status_page import CHALLENGE, CHALLENGE_BODY, load_status_page
from sidecar.http.wires import (
    MessagesWire,
    OpenAIWire,
    ResponsesWire,
    Wire,
    decode_object,
    error_envelope,
)
from sidecar.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from sidecar.metrics import Metrics
from sidecar.protocols.messages import count_body
from sidecar.request_meta import api_key, request_id_of, retry_after, served_meta
from sidecar.types import Call, Op

log = logging.getLogger("sidecar.http")

_JSON = "application/json"
_SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
_INLINE_DECODE_BYTES = 64 * 1024
_encoder = msgspec.json.Encoder()


def decode_call(wire: Wire, body: bytes) -> Call:
    """Validate a client body with ``wire``. Raises :class:`InvalidRequest` with the path."""
    return wire.decode(decode_object(body))


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


def _model_objects(gateway: Gateway) -> dict[str, dict[str, Any]]:
    """``GET /v1/models`` entries by id, in order."""
    return {id: {"id": id, "object": "model", "created": 0, "owned_by": owner}
            for id, owner in gateway.models()}


def error_response(err: SidecarError, request_id: str | None = None, path: str = ""
                   ) -> Response[bytes]:
    """The error envelope of the protocol at ``path`` (see :func:`error_envelope`), with
    ``retry-after`` when known and ``x-should-retry`` (which the OpenAI and Anthropic SDKs
    obey over their own status rules) always; ``request-id`` too (Anthropic's name)."""
    rid = request_id or uuid.uuid4().hex
    headers = {"x-request-id": rid, "request-id": rid,
               "x-should-retry": "true" if err.should_retry else "false"}
    if err.retry_after_s is not None:
        headers["retry-after"] = retry_after(err.retry_after_s)
    return Response(error_envelope(path, err), status_code=err.status, media_type=_JSON,
                    headers=headers)


def create_app(current: Current, *, max_body_bytes: int, metrics: Metrics | None = None,
               reload: Callable[[], Awaitable[object]] | None = None) -> Litestar:
    """Build the HTTP application over ``current.gateway`` (owned by the caller, and read
    once per request: a reload that replaces it sends new requests to the new one while
    those in flight finish on theirs); ``metrics`` (see :mod:`sidecar.metrics`) is served at
    ``GET /metrics`` (none: no such route); ``reload`` (re-read the config, raising
    :class:`~sidecar.config.ConfigError` or another exception when it is refused) at
    ``POST /v1/sidecar/reload`` (none: that answers 400)."""

    async def accept(request: Request[Any, Any, Any], wire: Wire, gateway: Gateway
                     ) -> tuple[Context, Call]:
        """Authenticate, then read and validate the body."""
        request_id = request_id_of(request.headers)
        request.state.request_id = request_id
        # Authentication comes before anything else looks at the request.
        identity = gateway.authenticate(api_key(request.headers))
        ctx = Context(request_id, gateway.deadline(_timeout(request)), identity,
                      directive_of(request.headers))
        body = await request.body()
        # Checking a big body's every value takes a while (~0.1 s per MB of tiny arrays):
        # off the event loop, which the GIL then still lets run every few milliseconds.
        call = (decode_call(wire, body) if len(body) < _INLINE_DECODE_BYTES
                else await asyncio.to_thread(decode_call, wire, body))
        return ctx, call

    async def serve(wire: Wire, request: Request[Any, Any, Any]) -> Response[Any]:
        gateway = current.gateway
        ctx, call = await accept(request, wire, gateway)
        request_id = ctx.request_id
        if call.stream:
            streaming = await gateway.stream(call, ctx)
            headers = served_meta(request_id, streaming)
            return Stream(
                wire.events(streaming), media_type="text/event-stream",
                headers=headers | _SSE_HEADERS,
            )
        done = await _unless_client_leaves(request, gateway.complete(call, ctx), gateway)
        if done is None:  # nobody is left to answer; the call was cancelled upstream
            return Response(b"", status_code=499)
        return Response(wire.body(done), media_type=_JSON, headers=served_meta(request_id, done))

    @post("/v1/chat/completions", status_code=200)
    async def chat(request: Request[Any, Any, Any]) -> Response[Any]:
        """Create a chat completion (OpenAI's, stream or not)."""
        return await serve(OpenAIWire(Op.CHAT), request)

    @post("/v1/completions", status_code=200)
    async def completions(request: Request[Any, Any, Any]) -> Response[Any]:
        """Create a text completion (legacy)."""
        return await serve(OpenAIWire(Op.COMPLETIONS), request)

    @post("/v1/embeddings", status_code=200)
    async def embeddings(request: Request[Any, Any, Any]) -> Response[Any]:
        """Create embeddings."""
        return await serve(OpenAIWire(Op.EMBEDDINGS), request)

    @post("/v1/messages", status_code=200)
    async def create_message(request: Request[Any, Any, Any]) -> Response[Any]:
        """Create a message (Anthropic's Messages API, stream or not), served by any target."""
        return await serve(MessagesWire(), request)

    @post("/v1/messages/count_tokens", status_code=200)
    async def count_tokens(request: Request[Any, Any, Any]) -> Response[bytes]:
        """Count a Messages request's input tokens (Anthropic's count for Anthropic targets,
        else an estimate; see docs/protocols.md)."""
        request_id = request.state.request_id = request_id_of(request.headers)
        gateway = current.gateway
        identity = gateway.authenticate(api_key(request.headers))
        ctx = Context(request_id, gateway.deadline(_timeout(request)), identity)
        raw = decode_object(await request.body())
        call = MessagesWire().decode({"max_tokens": 1, **raw, "stream": False})
        return Response(count_body(await gateway.count_tokens(call, ctx)), media_type=_JSON)

    @post("/v1/responses", status_code=200)
    async def create_response(request: Request[Any, Any, Any]) -> Response[Any]:
        """Create a model response (OpenAI's Responses API, stateless)."""
        return await serve(ResponsesWire(), request)

    documents: dict[str, tuple[Gateway, bytes]] = {}

    def document(name: str, gateway: Gateway, build: Callable[[], bytes]) -> bytes:
        """``build()`` once per gateway (again after a reload replaced it)."""
        found = documents.get(name)
        if found is None or found[0] is not gateway:
            documents[name] = found = (gateway, build())
        return found[1]

    @get("/v1/models")
    async def models(request: Request[Any, Any, Any]) -> Response[bytes]:
        """List the models clients may ask for: routes, then provider/model targets."""
        gateway = current.gateway
        gateway.authenticate(api_key(request.headers))
        body = document("models", gateway, lambda: _encoder.encode(
            {"object": "list", "data": list(_model_objects(gateway).values())}))
        return Response(body, media_type=_JSON)

    @get("/v1/models/{model_id:path}")
    async def model(request: Request[Any, Any, Any], model_id: str) -> Response[bytes]:
        """One model of the list (``provider/model`` ids included)."""
        gateway = current.gateway
        gateway.authenticate(api_key(request.headers))
        found = _model_objects(gateway).get(model_id.lstrip("/"))
        if found is None:
            raise ModelNotFound(f"The model '{model_id.lstrip('/')[:256]}' does not exist.",
                                param="model")
        return Response(_encoder.encode(found), media_type=_JSON)

    @get("/v1/sidecar/budgets")
    async def budgets(request: Request[Any, Any, Any]) -> Response[bytes]:
        """Every budget's current window (per-key ones of the caller only)."""
        gateway = current.gateway
        identity = gateway.authenticate(api_key(request.headers))
        return Response(await gateway.budgets(identity), media_type=_JSON)

    @get("/v1/sidecar/status")
    async def status(request: Request[Any, Any, Any]) -> Response[bytes]:
        """Host pressure, targets' health and load, local models, route reasons."""
        gateway = current.gateway
        gateway.authenticate(api_key(request.headers))
        return Response(gateway.status(), media_type=_JSON)

    @post("/v1/sidecar/reload", status_code=200)
    async def reload_config(request: Request[Any, Any, Any]) -> Response[bytes]:
        """Re-read the config file and swap it in (as SIGHUP does); an invalid one is
        refused with 400 naming the error, and the config in use serves on."""
        current.gateway.authenticate(api_key(request.headers))
        if reload is None:
            raise InvalidRequest("This sidecar cannot reload its config.")
        try:
            await reload()
        except ConfigError as e:
            raise InvalidRequest(f"The config was not reloaded: {e}") from None
        except Exception as e:  # e.g. a ledger that cannot be opened
            log.exception("reload refused")
            raise InvalidRequest(f"The config was not reloaded: {type(e).__name__}: {e}"
                                 ) from None
        config = current.gateway.config
        return Response(_encoder.encode({"reloaded": True, "routes": len(config.routes),
                                         "providers": len(config.providers)}),
                        media_type=_JSON)

    page = load_status_page()

    @get("/", include_in_schema=False)
    async def status_page(request: Request[Any, Any, Any]) -> Response[bytes]:
        """The status page (HTML, see :mod:`sidecar.http.status_page`); with keys configured,
        401 and a Basic challenge unless the request carries a valid one."""
        try:
            current.gateway.authenticate(api_key(request.headers))
        except Unauthenticated:
            return Response(CHALLENGE_BODY, status_code=401, media_type="text/plain",
                            headers=page.headers | CHALLENGE)
        return Response(page.body, media_type="text/html", headers=page.headers)

    @get("/healthz")
    async def healthz() -> Response[bytes]:
        """Liveness: 200 while the process serves."""
        return Response(b'{"status":"ok"}', media_type=_JSON)

    @get("/readyz")
    async def readyz() -> Response[bytes]:
        """Readiness: 200, or 503 while draining; targets' circuits."""
        ready, body = current.gateway.readiness()
        return Response(body, status_code=200 if ready else 503, media_type=_JSON)

    @get("/metrics")
    async def prometheus(request: Request[Any, Any, Any]) -> Response[bytes]:
        """Prometheus metrics (text format); needs a client key like ``/v1/models``."""
        identity = current.gateway.authenticate(api_key(request.headers))
        assert metrics is not None  # registered only with metrics
        return Response(await metrics.exposition(identity), media_type=METRICS_CONTENT_TYPE)

    def on_sidecar_error(request: Request[Any, Any, Any], exc: SidecarError) -> Response[bytes]:
        return error_response(exc, getattr(request.state, "request_id", None), request.url.path)

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
        return error_response(err, getattr(request.state, "request_id", None), request.url.path)

    def on_unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        err = SidecarError("The sidecar hit an internal error.")
        return error_response(err, getattr(request.state, "request_id", None), request.url.path)

    @get("/openapi.json")
    async def openapi(request: Request[Any, Any, Any]) -> Response[bytes]:
        """The OpenAPI document of this API; needs a client key like ``/v1/models``."""
        gateway = current.gateway
        gateway.authenticate(api_key(request.headers))
        body = document("openapi", gateway, lambda: _encoder.encode(
            openapi_document(request.app, auth=gateway.auth)))
        return Response(body, media_type=_JSON)

    return Litestar(
        route_handlers=[chat, completions, embeddings, create_message, count_tokens,
                        create_response, models, model, budgets, status, reload_config,
                        healthz, readyz,
                        openapi, status_page, *([] if metrics is None else [prometheus])],
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


