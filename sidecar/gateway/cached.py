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
* **By meaning** (a plan with ``semantic``): after an exact miss the question is embedded by
  the local model (at most the plan's ``timeout_s``; an embedding that fails or is late is
  only an exact miss) and its index searched (:func:`~sidecar.cache.semantic.nearest`); a
  match whose answer is still kept is a hit. Once a missed answer is kept, its question
  joins the index. Embeddings take at most :data:`EMBED_SHARE` of the model's time on
  average, so a flood of new questions cannot stall the model's generations: a lookup
  that finds the share used is exact only. Concurrent misses of one index may each write
  it: the last write wins, and a question lost that way is only a later miss.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence

import msgspec

from sidecar.cache import CachePlan, CacheStore, CacheUnavailable, Entry, semantic
from sidecar.cache.entry import decode_entry, encode_entry
from sidecar.cache.policy import SemanticPlan
from sidecar.config import Pooling
from sidecar.gateway.events import Ended, Relayed, StreamEvent
from sidecar.providers.base import Reply

log = logging.getLogger("sidecar.cache")

EMBED_SHARE = 0.25
"""The most of a local model's time the semantic cache's embeddings take, on average: they
spend a credit of model seconds that grows by this share of the time passing, up to
:data:`EMBED_BURST_S`, at most :data:`EMBED_CONCURRENCY` at once (a lookup that finds no
credit or no room is exact only)."""
EMBED_BURST_S = 2.0
EMBED_CONCURRENCY = 4

Embed = Callable[[str, str, Pooling], Awaitable[Sequence[float]]]
"""(local model, text, pooling) -> the model's embedding of the text."""


class Lookup(msgspec.Struct, frozen=True):
    """What :meth:`ResponseCache.lookup` found."""

    entry: Entry | None = None
    """The answer to serve (a hit), or None (a miss)."""
    similarity: float | None = None
    """Set when the hit was found by meaning: how alike the questions were."""
    indexed: semantic.Indexed | None = None
    """A missed question to add to its index once its answer is kept."""


MISS = Lookup()


class ResponseCache:
    """See the module docstring. ``clock``: Unix seconds (default :func:`time.time`);
    ``monotonic``: the clock of the embeddings' share (default :func:`time.monotonic`)."""

    def __init__(self, store: CacheStore, clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self._clock = clock
        self._monotonic = monotonic
        self._healthy = True
        self._embedding = True
        self._embeddings = 0
        self._credit_s, self._credit_at = EMBED_BURST_S, monotonic()
        """Seconds of embedding the model may spend now, as of ``_credit_at``."""

    async def lookup(self, plan: CachePlan, stream: bool, embed: Embed | None = None
                     ) -> Lookup:
        """The entry ``plan`` reads, when there is one of the right kind (a stream's
        frames for a stream), exactly or, with ``embed`` and a semantic plan, by meaning."""
        if plan.read:
            entry = await self._entry(plan.key, stream)
            if entry is not None:
                return Lookup(entry)
        sem = plan.semantic
        if sem is None or embed is None:
            return MISS
        vector = await self._vector(sem, embed)
        if vector is None:
            return MISS
        indexed = semantic.Indexed(plan.key, sem.question.terms, vector)
        if not plan.read:
            return Lookup(indexed=indexed)
        index = semantic.decode_index(await self._get(sem.question.index_key))
        match = semantic.nearest(index, vector, sem.question.terms, sem.min_similarity)
        if match is not None:
            entry = await self._entry(match[0], stream)
            if entry is not None:
                log.debug("semantic cache hit (similarity %.3f)", match[1])
                return Lookup(entry, match[1])
        return Lookup(indexed=indexed)

    async def _entry(self, key: str, stream: bool) -> Entry | None:
        data = await self._get(key)
        entry = None if data is None else decode_entry(data)
        if entry is None or (entry.frames is not None) != stream:
            return None
        return entry

    async def _get(self, key: str) -> bytes | None:
        try:
            data = await self.store.get(key)
        except CacheUnavailable as e:
            self._failed(e)
            return None
        self._healthy = True
        return data

    async def _vector(self, sem: SemanticPlan, embed: Embed) -> bytes | None:
        """The question's embedding as an index keeps it, or None when the model did not
        give one in time (anything it raises is only a miss: the first failure after a
        success is a warning, the rest debug)."""
        started = self._monotonic()
        credit = min(EMBED_BURST_S, self._credit_s + (started - self._credit_at) * EMBED_SHARE)
        self._credit_s, self._credit_at = credit, started
        if credit <= 0 or self._embeddings >= EMBED_CONCURRENCY:
            log.debug("semantic cache: the model's share for embeddings is used, exact only")
            return None
        self._embeddings += 1
        try:
            async with asyncio.timeout(sem.timeout_s):
                text = semantic.prompt(sem.question, sem.pooling)
                vector = semantic.vector_bytes(await embed(sem.model, text, sem.pooling))
        except Exception as e:
            level = logging.WARNING if self._embedding else logging.DEBUG
            self._embedding = False
            log.log(level, "semantic cache: no embedding from %s, looked up exactly: %s",
                    sem.model, "timed out" if isinstance(e, TimeoutError) else e)
            return None
        finally:
            self._embeddings -= 1
            self._credit_s -= self._monotonic() - started
        self._embedding = True
        return vector

    async def keep_reply(self, plan: CachePlan, found: Lookup, target: str, reply: Reply
                         ) -> None:
        """Keep a non-stream answer (already redacted) under ``plan``'s key (and its
        question in its index, when ``found`` has one)."""
        if len(reply.body) <= self.store.max_entry_bytes:
            await self._put(plan, found, Entry(target, self._clock(), reply.usage,
                                               reply.native, body=reply.body))

    async def recording(self, plan: CachePlan, found: Lookup, target: str, native: bool,
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
                    await self._put(plan, found, Entry(target, self._clock(), event.usage,
                                                       native, frames=frames))
                yield event
        finally:
            await events.aclose()

    async def _put(self, plan: CachePlan, found: Lookup, entry: Entry) -> None:
        try:
            await self.store.put(plan.key, encode_entry(entry), plan.ttl_s)
            if found.indexed is not None and plan.semantic is not None:
                await self._index(plan.semantic.question.index_key, found.indexed, plan.ttl_s)
        except CacheUnavailable as e:
            self._failed(e)
        else:
            self._healthy = True

    async def _index(self, key: str, item: semantic.Indexed, ttl_s: float) -> None:
        """Add ``item`` to the index under ``key`` (its oldest questions dropped while it
        is larger than an entry may be). Raises :class:`CacheUnavailable`."""
        index = semantic.with_question(semantic.decode_index(await self.store.get(key)), item)
        data = semantic.encode_index(index)
        while len(data) > self.store.max_entry_bytes and len(index) > 1:
            index = index[len(index) // 2:]
            data = semantic.encode_index(index)
        await self.store.put(key, data, ttl_s)

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
