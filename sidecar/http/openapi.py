"""The OpenAPI 3.1 document of the HTTP API (``GET /openapi.json``), generated, never written
by hand: paths and methods come from the Litestar app's route table (summaries from the
handlers' docstrings), request and answer schemas from the msgspec Structs the front end
decodes into (:mod:`sidecar.types`) via :func:`msgspec.json.schema_components`, so the
document cannot drift from what is validated.

The handlers read raw bytes (Litestar's own generator sees no body), which is why the body
schemas are attached here. Pure: no I/O, built once per app.
"""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Litestar
from litestar.routes import HTTPRoute

from sidecar import __version__
from sidecar.protocols.messages import MessagesRequest
from sidecar.types import REQUEST_TYPES, ChatCompletion, Op


class ErrorDetail(msgspec.Struct):
    message: str
    type: str
    code: str | None
    param: str | None


class ErrorEnvelope(msgspec.Struct):
    """OpenAI's error envelope: every error the sidecar answers has this shape."""

    error: ErrorDetail


_ERRORS = {
    "400": "Invalid request (the field is named in `param`).",
    "401": "Missing or incorrect client key.",
    "404": "Unknown model or path.",
    "413": "Body larger than `max_body_bytes`.",
    "429": "Rate limited or budget exhausted (`Retry-After` when known).",
    "431": "Request headers too large.",
    "502": "Every target failed.",
    "503": "Overloaded or shutting down (`Retry-After`).",
    "504": "The request deadline passed.",
}
_PARAMETERS = [
    {"name": "x-sidecar-timeout", "in": "header", "required": False,
     "description": "Total deadline of this request in seconds.",
     "schema": {"type": "number", "exclusiveMinimum": 0}},
    {"name": "x-request-id", "in": "header", "required": False,
     "description": "Echoed back when it matches the pattern; else a new id is made.",
     "schema": {"type": "string", "pattern": "^[A-Za-z0-9._:\\-]{1,128}$"}},
]


_TEXT_ANSWERS = {"/metrics": {"text/plain": {"schema": {"type": "string"}}}}
"""The answers that are not JSON, by path."""


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def openapi_document(app: Litestar, *, auth: bool) -> dict[str, Any]:
    """The document for ``app``'s routes. ``auth``: client keys are configured, so every
    path but ``/healthz`` and ``/readyz`` needs ``Authorization: Bearer <key>``."""
    bodies: dict[str, type[msgspec.Struct]] = {
        f"/v1/{op.value}": t for op, t in REQUEST_TYPES.items()}
    bodies["/v1/messages"] = MessagesRequest
    answers: dict[str, type[msgspec.Struct]] = {f"/v1/{Op.CHAT.value}": ChatCompletion}
    _, components = msgspec.json.schema_components(
        [*bodies.values(), *answers.values(), ErrorEnvelope],
        ref_template="#/components/schemas/{name}",
    )
    errors = {code: {"description": text,
                     "content": {"application/json": {"schema": _ref("ErrorEnvelope")}}}
              for code, text in _ERRORS.items()}
    paths: dict[str, dict[str, Any]] = {}
    for route in app.routes:
        if not isinstance(route, HTTPRoute):
            continue
        for handler in route.route_handlers:
            if not handler.include_in_schema:  # the status page at /: HTML, not the API
                continue
            methods = sorted(m for m in getattr(handler, "http_methods", ()) if m != "OPTIONS")
            for method in methods:
                summary = (handler.fn.__doc__ or "").strip().split("\n\n")[0]
                op: dict[str, Any] = {"operationId": handler.handler_name,
                                      "summary": " ".join(summary.split()) or route.path}
                public = route.path in ("/healthz", "/readyz")
                if route.path in bodies:
                    struct = bodies[route.path]
                    op["parameters"] = _PARAMETERS
                    op["requestBody"] = {"required": True, "content": {
                        "application/json": {"schema": _ref(struct.__name__)}}}
                    answer = answers.get(route.path)
                    ok = {"schema": _ref(answer.__name__) if answer else {"type": "object"}}
                    content: dict[str, Any] = {"application/json": ok}
                    if route.path != f"/v1/{Op.EMBEDDINGS.value}":
                        content["text/event-stream"] = {"schema": {"type": "string"}}
                    op["responses"] = {"200": {"description": "The answer.",
                                               "content": content}, **errors}
                else:
                    op["responses"] = {
                        "200": {"description": "OK", "content": _TEXT_ANSWERS.get(
                            route.path, {"application/json": {"schema": {"type": "object"}}})},
                        **({"503": errors["503"]} if route.path == "/readyz" else {}),
                        **({} if public else {"401": errors["401"]}),
                    }
                if auth and not public:
                    op["security"] = [{"bearer": []}]
                paths.setdefault(route.path, {})[method.lower()] = op
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "Sidecar", "version": __version__,
                 "description": "OpenAI-compatible AI gateway."},
        "paths": dict(sorted(paths.items())),
        "components": {"schemas": components},
    }
    if auth:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    return doc
