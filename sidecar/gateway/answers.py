"""What the gateway answers a front end: who served a call, and the reply or the stream."""

from __future__ import annotations

from collections.abc import AsyncGenerator

import msgspec

from sidecar.cache import Result
from sidecar.gateway.events import StreamEvent
from sidecar.providers.base import Reply


class Served(msgspec.Struct):
    """Who served a request, after how many attempts and why there (for response headers)."""

    target: str
    attempts: int
    reason: str
    """``primary``, or ``offload:*`` / ``fallback:*`` reasons joined by commas."""
    cost: int | None
    """µ$ recorded for this answer (None: the target's price is unknown, or, for a paid
    stream, not known until it ends)."""


class Completed(Served):
    reply: Reply
    cache: Result | None = None
    """``x-sidecar-cache``: hit (answered from the response cache: ``attempts`` 0, cost 0,
    reason ``cache:hit``, or ``cache:semantic`` when found by meaning), miss or bypass, on
    a route with the cache; None without one."""


class Streaming(Served):
    """A committed stream: its first frame has arrived. Iterate ``events`` to the end (or
    close it): :class:`~sidecar.gateway.events.Relayed` frames, then one
    :class:`~sidecar.gateway.events.Ended` (its cost recorded) or
    :class:`~sidecar.gateway.events.Failed`. ``cost`` is known now only for free targets
    (0), else None (the cost comes with ``Ended``). ``native``: the frames are Anthropic's
    own events (``Call.messages`` served by a provider that speaks the Messages API), not
    OpenAI chunks."""

    events: AsyncGenerator[StreamEvent, None]
    native: bool = False
    cache: Result | None = None
    """As :attr:`Completed.cache`."""
