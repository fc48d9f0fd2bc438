"""The in-process response cache: an LRU dict bounded in bytes.

:class:`MemoryCacheStore` is a :class:`~sidecar.cache.store.CacheStore` held by one process
and lost when it stops. Evicts the least recently used values first (a :meth:`get` counts as
a use); an expired value is dropped when it is next read or when eviction reaches it.
Every operation is O(1) amortised and never awaits anything.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable


class MemoryCacheStore:
    """See the module docstring. ``clock``: seconds, monotonic (for tests; default
    :func:`time.monotonic`)."""

    def __init__(self, *, max_bytes: int, max_entry_bytes: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_bytes = max_bytes
        self.max_entry_bytes = min(max_entry_bytes, max_bytes)
        self._clock = clock
        self._values: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        """key -> (expires at, value), least recently used first."""
        self._bytes = 0

    async def size_bytes(self) -> int:
        """The values kept now, together (expired ones not yet dropped included)."""
        return self._bytes

    async def get(self, key: str) -> bytes | None:
        found = self._values.get(key)
        if found is None:
            return None
        expires, value = found
        if self._clock() >= expires:
            self._drop(key)
            return None
        self._values.move_to_end(key)
        return value

    async def put(self, key: str, value: bytes, ttl_s: float) -> None:
        self._drop(key)
        if len(value) > self.max_entry_bytes:
            return
        while self._bytes + len(value) > self.max_bytes:
            self._drop(next(iter(self._values)))
        self._values[key] = (self._clock() + ttl_s, value)
        self._bytes += len(value)

    def _drop(self, key: str) -> None:
        found = self._values.pop(key, None)
        if found is not None:
            self._bytes -= len(found[1])

    async def aclose(self) -> None:
        self._values.clear()
        self._bytes = 0
