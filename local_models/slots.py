"""The engine's sequence slots: which are free, and which tokens each one's KV cache holds.

Pure bookkeeping for :mod:`local_models.engine` (no llama.cpp call, no I/O); the engine
makes the matching KV cache changes.

Contract:

* ``n`` slots, numbered 0 to ``n - 1``. A request is first *reserved* (its prompt is still
  being tokenized, so which slot suits it is not known yet) and gets its slots once its
  prompt is whole: :meth:`Slots.available` counts the free slots not reserved.
* :meth:`Slots.take_best` gives the free slot whose kept tokens share the longest common
  prefix with the prompt; ties go to the lowest slot, so slots stay packed from 0
  (llama.cpp splits a batch at every gap between sequence ids). A prompt that matches no
  slot at all goes to the lowest slot that holds nothing, when one does, rather than
  evicting what another slot keeps.
  :meth:`Slots.take_lowest` gives the lowest free slot (the other choices of ``n > 1``).
* Exact reuse (:meth:`Slots.take_exact`): ``sealed[slot]`` is how many of the slot's kept
  tokens were prefilled *canonically*: as a prompt's part before its last message (its
  *split*), from position 0 in the chunks of :func:`canonical_take`, whatever else was in
  the batches. A prompt reuses a slot only when the slot's sealed part is exactly its own
  split (same length, same tokens): that KV cache is then what prefilling it again would
  compute, bit for bit, so reuse does not change an answer.
* ``kept[slot]`` is, token for token, what the slot's KV cache holds from position 0 on:
  the engine appends every token it puts in a batch for the slot and cuts or clears the
  list exactly where it removes KV cells. With ``keep=False`` (no prefix reuse) nothing
  is kept past a sequence's end and every match is empty.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

__all__ = ["Slots", "canonical_take", "common_prefix"]


def canonical_take(n_past: int, split: int, chunk: int, room: int) -> int:
    """How many prompt tokens a sequence at ``n_past`` prefills in this step while it is
    before its ``split``: up to the next multiple of ``chunk`` (or the split), all of them
    or none (0: not enough ``room`` left in this batch; it goes first in a later one), so
    the canonical part is always cut into the same batches."""
    want = min(split, (n_past // chunk + 1) * chunk) - n_past
    return want if want <= room else 0


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """The length of the longest common prefix of ``a`` and ``b`` (slice compares in C,
    bisected, rather than a Python loop over every token)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo] and a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


class Slots:
    """Free slots (a heap: the lowest first), reservations, and each slot's kept tokens."""

    def __init__(self, n: int, *, keep: bool) -> None:
        if n < 1:
            raise ValueError(f"n_parallel must be at least 1, not {n}")
        self.keep = keep
        """Whether a slot's tokens outlive its sequence (prefix reuse on)."""
        self.free = list(range(n))
        self.reserved = 0
        self.kept: list[list[int]] = [[] for _ in range(n)]
        self.sealed = [0] * n
        """Per slot: how many of its kept tokens were prefilled canonically (see above)."""

    def available(self) -> int:
        """Free slots that no request still tokenizing has reserved."""
        return len(self.free) - self.reserved

    def reserve(self, n: int) -> None:
        if n > self.available():
            raise ValueError(f"{n} slots asked, {self.available()} available")
        self.reserved += n

    def unreserve(self, n: int) -> None:
        if n > self.reserved:
            raise ValueError(f"{n} reservations given back, {self.reserved} held")
        self.reserved -= n

    def take_best(self, prompt: Sequence[int]) -> tuple[int, int]:
        """Take a reserved slot for ``prompt``: (slot, length of the prefix its kept tokens
        share with ``prompt``), the longest match first, then the lowest slot."""
        self.unreserve(1)
        slot, best = min(self.free), 0
        empty = min((s for s in self.free if not self.kept[s]), default=None)
        if self.keep:
            for s in sorted(self.free):
                length = common_prefix(self.kept[s], prompt)
                if length > best:
                    slot, best = s, length
        if best == 0 and empty is not None:
            slot = empty
        self.free.remove(slot)
        heapq.heapify(self.free)
        return slot, best

    def take_exact(self, prompt: Sequence[int], split: int) -> tuple[int, int]:
        """Take a reserved slot for ``prompt``, whose part before its last message is
        ``prompt[:split]``: (slot, tokens to reuse), ``split`` from the lowest free slot
        whose sealed part is exactly that (and is not the whole prompt, whose last token is
        decoded for its logits), else 0 from the lowest empty slot, else from the lowest
        free one."""
        self.unreserve(1)
        free = sorted(self.free)
        slot = next((s for s in free if 0 < split < len(prompt) and self.sealed[s] == split
                     and self.kept[s][:split] == prompt[:split]), None)
        reuse = split if slot is not None else 0
        if slot is None:
            slot = next((s for s in free if not self.kept[s]), free[0])
        self.free.remove(slot)
        heapq.heapify(self.free)
        return slot, reuse

    def cut(self, slot: int, keep: int) -> None:
        """The slot's cache now holds its first ``keep`` tokens only; a sealed part that is
        longer is no longer whole."""
        del self.kept[slot][keep:]
        if self.sealed[slot] > keep:
            self.sealed[slot] = 0

    def take_lowest(self) -> int:
        """Take a reserved slot: the lowest free one."""
        self.unreserve(1)
        return heapq.heappop(self.free)

    def release(self, slot: int) -> None:
        """Give ``slot`` back; its kept tokens stay only when ``keep``."""
        if slot in self.free:
            raise ValueError(f"slot {slot} is already free")
        if not self.keep:
            self.kept[slot].clear()
            self.sealed[slot] = 0
        heapq.heappush(self.free, slot)
