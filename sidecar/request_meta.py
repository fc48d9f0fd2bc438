"""What both front ends (HTTP headers, gRPC metadata) read from a request and write on an
answer, so they agree on who is calling and what they are told.

Contract: every function takes or returns plain ``name -> value`` text with lowercase names
(Litestar's headers are a case-insensitive mapping; gRPC metadata keys are lowercase).
"""

from __future__ import annotations

import base64
import binascii
import re
import uuid
from collections.abc import Mapping

from sidecar.gateway import Completed, Streaming
from sidecar.money import format_usd

MAX_HEADERS = 100
"""Header fields one HTTP request may have."""
MAX_HEAD_BYTES = 16 * 1024
"""An HTTP request line and its ``name: value`` lines together; a gRPC call's metadata."""

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def request_id_of(meta: Mapping[str, str]) -> str:
    """The client's ``x-request-id`` when well formed, else a new one."""
    given = meta.get("x-request-id")
    if given and _REQUEST_ID.match(given):
        return given
    return uuid.uuid4().hex


def api_key(meta: Mapping[str, str]) -> str | None:
    """The client key a request carries: ``authorization: Bearer <key>``; or HTTP Basic
    (``authorization: Basic base64(user:key)``: the password is the key, the user name is
    ignored; what a browser sends to the status page at ``/`` and its fetches, after it
    prompted or took ``http://user:KEY@host/``); else ``x-api-key``. ``""`` for an
    ``authorization`` of another scheme or a malformed Basic one (so the key is "incorrect",
    not "missing"); None when neither header is there."""
    auth = meta.get("authorization")
    if auth:
        scheme, _, token = auth.partition(" ")
        scheme = scheme.lower()
        if scheme == "bearer":
            return token.strip()
        if scheme == "basic":
            return _basic_password(token.strip())
        return ""
    return meta.get("x-api-key")


def _basic_password(token: str) -> str:
    """The password of a Basic credential (``base64(user:password)``, UTF-8); ``""`` when it
    is not valid base64 or has no ``:``."""
    try:
        decoded = base64.b64decode(token, validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return ""
    _user, sep, password = decoded.partition(":")
    return password if sep else ""


_UNSAFE = re.compile(r"[^ -~]")


def header_safe(value: str) -> str:
    """``value`` with every character that is not printable ASCII replaced by ``?``, so no
    text (a configured name included; clients' are validated before) can break a header or
    a gRPC metadata value."""
    return _UNSAFE.sub("?", value)


def served_meta(request_id: str, served: Completed | Streaming) -> dict[str, str]:
    """Who served it and why there; ``x-sidecar-cost-usd`` when the cost is known now (a
    paid stream's cost comes at its end); ``x-sidecar-cache`` on a route with the response
    cache. Every value is :func:`header_safe`."""
    out = {
        "x-request-id": header_safe(request_id),
        "x-sidecar-target": header_safe(served.target),
        "x-sidecar-attempts": str(served.attempts),
        "x-sidecar-route-reason": header_safe(served.reason),
    }
    if served.cost is not None:
        out["x-sidecar-cost-usd"] = format_usd(served.cost)
    if served.cache is not None:
        out["x-sidecar-cache"] = served.cache
    return out


def retry_after(seconds: float) -> str:
    """``retry-after`` in whole seconds, at least 1 (rounded up, bar the last thousandth)."""
    return str(max(1, round(seconds + 0.499)))

