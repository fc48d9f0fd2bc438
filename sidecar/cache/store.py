"""What every response-cache backend is: :class:`CacheStore`, and its one error.

A store keeps opaque values (encoded :class:`~sidecar.cache.entry.Entry` bytes) under keys
(hex digests from :func:`~sidecar.cache.policy.cache_key`), each for a time to live, within
a total size. The same contract holds for every backend (one suite in
``tests/contract/test_cache_contract.py`` runs against each):

* :meth:`CacheStore.get` returns what the last :meth:`~CacheStore.put` of the key stored, or
  None once its time to live has passed, after it was evicted, or when it never was stored.
* :meth:`CacheStore.put` replaces any value of the key. A value larger than
  ``max_entry_bytes`` is not kept (the call succeeds); the values kept never add up to more
  than ``max_bytes`` (older ones are evicted first, as each backend documents).
* A store that cannot be reached raises :class:`CacheUnavailable` within its time-out,
  with a message holding no secret; the caller treats that as a miss (the cache is an
  optimisation: its failure never fails a request).
* Safe for concurrent use from one event loop; :meth:`CacheStore.aclose` is idempotent.
"""

from __future__ import annotations

from typing import Protocol


class CacheUnavailable(Exception):
    """The store cannot be reached or used now; ``str(err)`` says why, without secrets."""


class CacheStore(Protocol):
    """Keys to values with a time to live, bounded in size (see the module contract)."""

    max_bytes: int
    max_entry_bytes: int

    async def get(self, key: str) -> bytes | None:
        """The value of ``key`` while it lives, else None. Raises :class:`CacheUnavailable`."""
        ...

    async def put(self, key: str, value: bytes, ttl_s: float) -> None:
        """Keep ``value`` under ``key`` for ``ttl_s`` seconds (> 0). Raises
        :class:`CacheUnavailable`."""
        ...

    async def size_bytes(self) -> int:
        """The values kept now, together (expired ones not yet dropped may be included).
        Raises :class:`CacheUnavailable`."""
        ...

    async def aclose(self) -> None:
        """Release the store's resources (idempotent)."""
        ...
