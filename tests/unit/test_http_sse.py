"""Unit tests of :mod:`sidecar.http.sse`: a stream's events as the bytes HTTP clients get."""

from __future__ import annotations

from collections.abc import AsyncGenerator

import pytest

from sidecar.errors import DeadlineExceeded, UpstreamRateLimited
from sidecar.gateway import Ended, Failed, Relayed, StreamEvent
from sidecar.http.sse import sse
from sidecar.types import Usage

FRAME = b'data: {"choices":[{"index":0,"delta":{"content":"Hi"}}]}\n\n'


async def rendered(*events: StreamEvent) -> tuple[bytes, bool]:
    """The SSE bytes of ``events`` and whether the renderer closed them."""
    closed = False

    async def source() -> AsyncGenerator[StreamEvent, None]:
        nonlocal closed
        try:
            for e in events:
                yield e
        finally:
            closed = True

    out = b"".join([b async for b in sse(source())])
    return out, closed


@pytest.mark.parametrize(("end", "tail"), [
    (Ended(Usage(3, 2, 5), 150), b": x-sidecar-cost-usd 0.000150\n\ndata: [DONE]\n\n"),
    (Ended(None, None), b"data: [DONE]\n\n"),
    (Failed(DeadlineExceeded("The request deadline passed mid-stream.")),
     b'data: {"error":{"message":"The request deadline passed mid-stream.",'
     b'"type":"timeout_error","code":"deadline_exceeded","param":null}}\n\n'),
    (Failed(UpstreamRateLimited("p/m is rate limited", target="p/m", retry_after_s=3)),
     b'data: {"error":{"message":"p/m is rate limited","type":"rate_limit_error",'
     b'"code":"upstream_rate_limited","param":null}}\n\n'),
])
async def test_frames_pass_through_then_one_end(end: Ended | Failed, tail: bytes) -> None:
    out, closed = await rendered(Relayed(FRAME), Relayed(FRAME + FRAME), end)
    assert out == FRAME * 3 + tail
    assert closed


async def test_closing_early_closes_the_events() -> None:
    closed = False

    async def source() -> AsyncGenerator[StreamEvent, None]:
        nonlocal closed
        try:
            while True:
                yield Relayed(FRAME)
        finally:
            closed = True

    out = sse(source())
    assert await anext(out) == FRAME
    await out.aclose()
    assert closed
