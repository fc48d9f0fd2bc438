"""The response cache in the pipeline: look up, keep, record and replay answers.

:class:`ResponseCache` wraps a :class:`~sidecar.cache.CacheStore` for the gateway, which
decides with :func:`sidecar.cache.plan` whether a request uses it. Its contract:

* **The cache never fails a request.** A store that cannot be reached, or a value that is
  not an entry, is a miss; a put that fails is dropped. The first failure after a success is
  logged as a warning, the rest at debug, so an outage logs once.
* **Only whole answers are kept.** A non-stream answer as the client got it (redacted); a
  stream's frames once it ended well (:class:`~sidecar.gateway.events.Ended`), not when it
  failed, was cut or the client left, nor when its frames grew past ``max_entry_bytes``.
* **A replay is the stream again:** every frame as it was relayed, then ``Ended`` with the
  original usage and a cost of 0 (a hit costs nothing and is charged to no budget).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator, Callable

from sidecar.cache import CachePlan, CacheStore, CacheUnavailable, Entry
from sidecar.cache.entry import decode_entry, encode_entry
from sidecar.gateway.events import Ended, Relayed, StreamEvent
from sidecar.providers.base import Reply

log = logging.getLogger("sidecar.cache")


class ResponseCache:
    """See the module docstring. ``clock``: Unix seconds (default :func:`time.time`)."""

    def __init__(self, store: CacheStore, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self._clock = clock
        self._healthy = True

    async def lookup(self, plan: CachePlan, stream: bool) -> Entry | None:
        """The entry ``plan`` reads, when there is one of the right kind (a stream's
        frames for a stream), else None."""
        if not plan.read:
            return None
        try:
            data = await self.store.get(plan.key)
        except CacheUnavailable as e:
            self._failed(e)
            return None
        self._healthy = True
        entry = None if data is None else decode_entry(data)
        if entry is None or (entry.frames is not None) != stream:
            return None
        return entry

    async def keep_reply(self, plan: CachePlan, target: str, reply: Reply) -> None:
        """Keep a non-stream answer (already redacted) under ``plan``'s key."""
        if len(reply.body) <= self.store.max_entry_bytes:
            await self._put(plan, Entry(target, self._clock(), reply.usage, reply.native,
                                        body=reply.body))

    async def recording(self, plan: CachePlan, target: str, native: bool,
                        events: AsyncGenerator[StreamEvent, None]
                        ) -> AsyncGenerator[StreamEvent, None]:
        """``events`` as they are; once they end well their frames are kept under
        ``plan``'s key (before ``Ended`` is passed on). Closing it closes ``events``."""
        frames: list[bytes] | None = []
        size, limit = 0, self.store.max_entry_bytes
        try:
            async for event in events:
                if isinstance(event, Relayed) and frames is not None:
                    size += len(event.frame)
                    if size > limit:
                        frames = None  # too big to keep: served, not cached
                    else:
                        frames.append(event.frame)
                elif isinstance(event, Ended) and frames is not None:
                    await self._put(plan, Entry(target, self._clock(), event.usage, native,
                                                frames=frames))
                yield event
        finally:
            await events.aclose()

    async def _put(self, plan: CachePlan, entry: Entry) -> None:
        try:
            await self.store.put(plan.key, encode_entry(entry), plan.ttl_s)
        except CacheUnavailable as e:
            self._failed(e)
        else:
            self._healthy = True

    def _failed(self, e: CacheUnavailable) -> None:
        level = logging.WARNING if self._healthy else logging.DEBUG
        self._healthy = False
        log.log(level, "response cache unavailable, serving without it: %s", e)

    async def aclose(self) -> None:
        await self.store.aclose()


async def replay(entry: Entry) -> AsyncGenerator[StreamEvent, None]:
    """A cached stream's events: its frames, then ``Ended(usage, cost=0)``."""
    for frame in entry.frames or ():
        yield Relayed(frame)
    yield Ended(entry.usage, 0)
