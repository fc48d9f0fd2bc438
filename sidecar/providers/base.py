"""The Provider protocol and what every HTTP provider shares.

A provider answers one :class:`~sidecar.types.Call` for one upstream model, in the OpenAI
wire format whatever it speaks upstream:

* :meth:`Provider.send` returns a :class:`Reply`: the OpenAI JSON body and its usage.
* :meth:`Provider.stream` is an async generator of SSE bytes, each item one or more whole
  ``data: {...}\\n\\n`` frames, never the final ``data: [DONE]`` (the gateway writes that).

Both raise only :class:`~sidecar.errors.UpstreamError` subclasses (or ``CancelledError``):
foreign exceptions are translated here, once, from transport failures and from status
codes and structured error bodies, never by searching an exception's text. Both are safe
to call concurrently; cancelling the caller closes the upstream connection.
"""

from __future__ import annotations

import contextlib
import datetime
import email.utils
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from typing import Any, Protocol

import httpx
import msgspec

from sidecar.config import ProviderConfig
from sidecar.errors import (
    UpstreamAuthFailed,
    UpstreamError,
    UpstreamMalformed,
    UpstreamRateLimited,
    UpstreamServerError,
    UpstreamTimeout,
    UpstreamUnreachable,
    rejected,
)
from sidecar.providers.transport import PooledTransport
from sidecar.types import Call, ErrorDetail, ErrorEnvelope, Meter, Op, Usage


class Reply(msgspec.Struct, frozen=True):
    """A complete non-stream answer: OpenAI-format JSON bytes and the usage they report
    (``native``: an Anthropic message instead, see ``Provider.native_messages``)."""

    body: bytes
    usage: Usage | None = None
    native: bool = False


class Provider(Protocol):
    """What the gateway needs from a place that runs models."""

    name: str
    native_messages: bool
    """Whether a call carrying ``Call.messages`` (a client's Anthropic Messages body) is
    sent upstream as that body and answered in Anthropic's format: :meth:`send` returns a
    ``native`` reply holding the message, :meth:`stream` yields Anthropic's SSE events
    (whole ``event: ...\ndata: ...\n\n`` events) instead of OpenAI chunks."""

    def supports(self, op: Op) -> bool:
        """Whether this provider can serve ``op`` at all (checked when routes are planned)."""
        ...

    async def send(self, call: Call, model: str, timeout_s: float,
                   meter: Meter | None = None) -> Reply:
        """Answer a non-stream call. ``timeout_s`` bounds the whole attempt. ``meter``
        receives what the provider said about its rate limits."""
        ...

    def stream(self, call: Call, model: str, timeout_s: float, meter: Meter | None = None
               ) -> AsyncGenerator[bytes, None]:
        """Stream SSE frames. ``timeout_s`` bounds connecting and each wait for data.
        ``meter`` receives the usage, the content relayed and the rate-limit state as the
        stream goes, however it ends."""
        ...

    async def aclose(self) -> None:
        """Close pooled connections. Calls in flight fail."""
        ...


class Upstream:
    """One provider's pooled HTTP client and the request mechanics every provider shares.

    ``post`` and ``open_stream`` raise only upstream errors: a transport failure or a
    non-200 answer is translated here. Safe for concurrent use from one event loop.
    """

    def __init__(self, config: ProviderConfig, headers: dict[str, str]) -> None:
        """``headers`` (protocol and credentials) are sent with every request, after
        ``content-type: application/json`` and the provider's configured headers."""
        self._timeout_s = config.timeout_s
        self._connect_timeout_s = config.connect_timeout_s
        self._client = httpx.AsyncClient(
            base_url=config.base_url.rstrip("/"),
            headers={"content-type": "application/json", **config.headers, **headers},
            timeout=httpx.Timeout(config.timeout_s, connect=config.connect_timeout_s),
            transport=PooledTransport(max_connections=config.max_connections,
                                      keepalive_expiry_s=30.0),
            follow_redirects=False,
            trust_env=False,
        )

    def _timeout(self, timeout_s: float) -> httpx.Timeout:
        t = min(timeout_s, self._timeout_s)
        return httpx.Timeout(t, connect=min(self._connect_timeout_s, t))

    async def post(self, path: str, content: bytes, timeout_s: float, target: str,
                   meter: Meter | None = None) -> bytes:
        """POST and return the body of a 200 answer."""
        with transport_errors(target):
            resp = await self._client.post(path, content=content, timeout=self._timeout(timeout_s))
        if meter is not None:
            meter.limited_for_s = exhausted_for_s(resp.headers)
        if resp.status_code != 200:
            raise status_error(resp.status_code, resp.content, resp.headers, target)
        return resp.content

    @contextlib.asynccontextmanager
    async def open_stream(self, path: str, content: bytes, timeout_s: float, target: str,
                          meter: Meter | None = None) -> AsyncIterator[AsyncIterator[bytes]]:
        """POST and yield the body of a 200 answer as it arrives; closes the response."""
        request = self._client.build_request(
            "POST", path, content=content, timeout=self._timeout(timeout_s)
        )
        with transport_errors(target):
            resp = await self._client.send(request, stream=True)
        if meter is not None:
            meter.limited_for_s = exhausted_for_s(resp.headers)
        try:
            if resp.status_code != 200:
                with transport_errors(target):
                    body = await resp.aread()
                raise status_error(resp.status_code, body, resp.headers, target)
            yield _translated(resp.aiter_bytes(), target)
        finally:
            await resp.aclose()

    async def aclose(self) -> None:
        await self._client.aclose()


async def _translated(pieces: AsyncIterator[bytes], target: str) -> AsyncIterator[bytes]:
    with transport_errors(target):
        async for piece in pieces:
            yield piece


@contextlib.contextmanager
def transport_errors(target: str) -> Iterator[None]:
    """Translate httpx transport exceptions into upstream errors for ``target``."""
    try:
        yield
    except httpx.TimeoutException:
        raise UpstreamTimeout(f"{target} did not answer in time", target=target) from None
    except httpx.TransportError as e:
        raise UpstreamUnreachable(
            f"{target} connection failed ({type(e).__name__})", target=target
        ) from None


def retry_after_s(headers: httpx.Headers, now: float | None = None) -> float | None:
    """Seconds to wait from ``retry-after-ms`` / ``retry-after`` (seconds or HTTP date)."""
    ms = headers.get("retry-after-ms")
    if ms is not None:
        with contextlib.suppress(ValueError):
            return max(0.0, float(ms) / 1000.0)
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def exhausted_for_s(headers: httpx.Headers, now: float | None = None) -> float | None:
    """Seconds until the provider's request limit resets, when it says none are left.

    OpenAI style: ``x-ratelimit-remaining-requests: 0`` with ``x-ratelimit-reset-requests:
    6m0s`` (Go durations); Anthropic style: ``anthropic-ratelimit-requests-remaining: 0``
    with ``anthropic-ratelimit-requests-reset`` (an RFC 3339 time)."""
    if headers.get("x-ratelimit-remaining-requests") == "0":
        reset = headers.get("x-ratelimit-reset-requests", "")
        parts = _DURATION.findall(reset)
        if parts:
            return sum(float(n) * _UNIT_S[u] for n, u in parts)
        with contextlib.suppress(ValueError):
            return max(0.0, float(reset))
        return 1.0
    if headers.get("anthropic-ratelimit-requests-remaining") == "0":
        reset = headers.get("anthropic-ratelimit-requests-reset", "")
        try:
            when = datetime.datetime.fromisoformat(reset.replace("Z", "+00:00"))
        except ValueError:
            return 1.0
        return max(0.0, when.timestamp() - (time.time() if now is None else now))
    return None


_error_decoder = msgspec.json.Decoder(ErrorEnvelope)


def status_error(status: int, body: bytes, headers: httpx.Headers, target: str) -> UpstreamError:
    """Translate a non-2xx upstream answer, using its status and structured error body.

    Both OpenAI (``{"error": {...}}``) and Anthropic (``{"type": "error", "error": {...}}``)
    envelopes carry ``error.message``; anything else gets a generic message. 401/403 mean
    the provider refused the sidecar's key (:class:`UpstreamAuthFailed`), not the client's.
    """
    message, code, param = f"HTTP {status}", None, None
    try:
        detail = _error_decoder.decode(body).error
    except (msgspec.DecodeError, msgspec.ValidationError):
        detail = None
    if isinstance(detail, ErrorDetail):
        message = detail.message or detail.type or message
        code = str(detail.code) if detail.code is not None else detail.type
        param = detail.param
    elif isinstance(detail, str):
        message = detail
    text = f"{target}: {message}"
    if status == 429:
        return UpstreamRateLimited(text, target=target, retry_after_s=retry_after_s(headers))
    if status in (401, 403):
        # The sidecar's own provider key was refused: say so without the provider's text,
        # which may echo the key it received.
        provider = target.split("/", 1)[0]
        return UpstreamAuthFailed(
            f"provider {provider} rejected the sidecar's credentials (HTTP {status})",
            target=target,
        )
    if status in (408, 425) or status >= 500:
        return UpstreamServerError(text, target=target, retry_after_s=retry_after_s(headers))
    if 400 <= status < 500:
        return rejected(status, text, target=target, code=code, param=param)
    return UpstreamMalformed(f"{target}: unexpected HTTP {status}", target=target)


def check_usage(usage: Usage | None, target: str, meter: Meter | None) -> None:
    """Raise :class:`UpstreamMalformed` (and mark ``meter``) if ``usage`` cannot be true
    (:meth:`~sidecar.types.Usage.problem`): a negative count would refund a budget."""
    problem = None if usage is None else usage.problem()
    if problem is not None:
        if meter is not None:
            meter.usage_invalid = True
        raise UpstreamMalformed(f"{target} reported an impossible usage ({problem})",
                                target=target)


def check_shape(op: Op, shape: Any, target: str) -> None:
    """Raise :class:`UpstreamMalformed` unless ``shape`` (a BodyShape) fits ``op``."""
    ok = shape.data is not None if op is Op.EMBEDDINGS else shape.choices is not None
    if not ok:
        if shape.error is not None:
            raise UpstreamServerError(f"{target} answered with an error object", target=target)
        what = "data" if op is Op.EMBEDDINGS else "choices"
        raise UpstreamMalformed(f"{target} answered without '{what}'", target=target)
