"""A stream's events as OpenAI's server-sent events (``text/event-stream``).

    Relayed  -> its frames, byte for byte (the provider's ``data: {...}`` events)
    Ended    -> ``: x-sidecar-cost-usd 0.000123`` (when the cost is known), ``data: [DONE]``
    Failed   -> one ``data: {"error": {...}}`` event in OpenAI's envelope, no ``[DONE]``
"""

from __future__ import annotations

from collections.abc import AsyncGenerator

from sidecar.errors import SidecarError
from sidecar.gateway import Ended, Failed, Relayed, StreamEvent, error_body
from sidecar.money import format_usd

DONE_FRAME = b"data: [DONE]\n\n"
COST_COMMENT = b": x-sidecar-cost-usd "


def error_frame(err: SidecarError) -> bytes:
    """``err`` as one SSE event in OpenAI's error envelope."""
    return b"data: " + error_body(err) + b"\n\n"


def cost_comment(end: Ended) -> bytes:
    """``: x-sidecar-cost-usd ...`` (an SSE comment, which every client skips) when the
    cost is known, else nothing."""
    if end.cost is None:
        return b""
    return COST_COMMENT + format_usd(end.cost).encode() + b"\n\n"


def end_frames(end: Ended) -> bytes:
    """What closes a stream that ended well: the cost comment when known, then ``[DONE]``."""
    return cost_comment(end) + DONE_FRAME


async def sse(events: AsyncGenerator[StreamEvent, None]) -> AsyncGenerator[bytes, None]:
    """``events`` as SSE bytes (see the module docstring). Closing it closes ``events``
    (which closes the upstream and records the stream's cost)."""
    try:
        async for event in events:
            match event:
                case Relayed(frame=frame):
                    yield frame
                case Ended():
                    yield end_frames(event)
                case Failed(error=error):
                    yield error_frame(error)
    finally:
        await events.aclose()
