"""The engine's slot bookkeeping (pure): reservations, the longest-prefix and exact choices,
kept and sealed tokens, canonical chunks."""

from __future__ import annotations

import pytest

from local_models.slots import Slots, canonical_take, common_prefix


@pytest.mark.parametrize(("a", "b", "n"), [
    ([], [], 0), ([1, 2, 3], [], 0), ([1, 2, 3], [1, 2, 3], 3), ([1, 2, 3], [1, 2], 2),
    ([1, 2, 3], [1, 9, 3], 1), ([5], [6], 0), (list(range(1000)), [*range(777), -1], 777),
])
def test_common_prefix(a: list[int], b: list[int], n: int) -> None:
    assert common_prefix(a, b) == n == common_prefix(b, a)


def test_the_longest_match_wins_and_ties_go_to_the_lowest_slot() -> None:
    s = Slots(4, keep=True)
    s.kept[1][:] = [7, 8, 9, 10]
    s.kept[2][:] = [7, 8, 9, 11, 12]
    s.kept[3][:] = [7, 8, 9, 11, 12]
    s.reserve(1)
    assert s.take_best([7, 8, 9, 11, 13]) == (2, 4)  # 2 and 3 tie at 4: the lower
    s.reserve(1)
    assert s.take_best([1, 2]) == (0, 0)  # no match anywhere: the lowest free slot
    s.reserve(2)
    assert s.take_best([7, 8]) == (1, 2)
    assert s.take_lowest() == 3
    assert s.available() == 0 and s.reserved == 0


def test_a_prompt_that_matches_nothing_takes_an_empty_slot_first() -> None:
    s = Slots(3, keep=True)
    s.kept[0][:] = [7, 8, 9]
    s.kept[2][:] = [5]
    s.reserve(3)
    assert s.take_best([1, 2]) == (1, 0)  # not slot 0: it keeps [7, 8, 9]
    assert s.take_best([1, 2]) == (0, 0)  # none is empty now: the lowest
    assert s.take_best([5, 6]) == (2, 1)


def test_reservations_bound_what_is_available() -> None:
    s = Slots(2, keep=True)
    s.reserve(2)
    assert s.available() == 0
    with pytest.raises(ValueError, match="1 slots asked, 0 available"):
        s.reserve(1)
    s.unreserve(1)
    with pytest.raises(ValueError, match="2 reservations given back, 1 held"):
        s.unreserve(2)
    slot = s.take_lowest()
    with pytest.raises(ValueError, match="already free"):
        s.release(1 - slot)
    s.release(slot)
    assert s.available() == 2


def test_without_keep_nothing_outlives_a_sequence() -> None:
    s = Slots(2, keep=False)
    s.reserve(1)
    slot, common = s.take_best([1, 2, 3])
    assert (slot, common) == (0, 0)
    s.kept[slot].extend([1, 2, 3, 4])
    s.release(slot)
    assert s.kept[slot] == []
    s.reserve(1)
    assert s.take_best([1, 2, 3]) == (0, 0)


def test_kept_tokens_outlive_a_sequence_with_keep() -> None:
    s = Slots(2, keep=True)
    s.reserve(1)
    slot, _ = s.take_best([1, 2, 3])
    s.kept[slot].extend([1, 2, 3, 4])
    s.release(slot)
    s.reserve(1)
    assert s.take_best([1, 2, 3]) == (slot, 3)


def test_a_bad_size_is_refused() -> None:
    with pytest.raises(ValueError, match="n_parallel must be at least 1"):
        Slots(0, keep=True)


def test_exact_reuse_takes_only_a_slot_sealed_at_the_very_same_split() -> None:
    s = Slots(4, keep=True)
    s.kept[1][:], s.sealed[1] = [7, 8, 9, 10, 11], 3  # sealed at 3: [7, 8, 9]
    s.kept[2][:], s.sealed[2] = [7, 8, 9, 10, 11], 4  # sealed longer: not this prompt's
    s.kept[3][:], s.sealed[3] = [7, 8, 5, 10], 3  # the same length, other tokens
    s.reserve(4)
    assert s.take_exact([7, 8, 9, 42, 43], 3) == (1, 3)
    # No slot sealed at this split (2 holds [7, 8, 9, 10] but sealed at 4): the lowest
    # empty slot, not a longer common prefix.
    assert s.take_exact([7, 8, 9, 10, 99], 3) == (0, 0)
    assert s.take_exact([7, 8, 9, 10, 99], 0) == (2, 0)  # no split: nothing is reused
    assert s.take_exact([1], 1) == (3, 0)  # nothing empty left: the lowest free slot


def test_a_cut_below_the_sealed_part_unseals_it() -> None:
    s = Slots(1, keep=True)
    s.kept[0][:], s.sealed[0] = [1, 2, 3, 4], 3
    s.cut(0, 3)
    assert s.kept[0] == [1, 2, 3] and s.sealed[0] == 3
    s.cut(0, 2)
    assert s.kept[0] == [1, 2] and s.sealed[0] == 0


@pytest.mark.parametrize(("n_past", "split", "room", "take"), [
    (0, 10, 50, 10),  # a short split: in one chunk
    (0, 250, 50, 0),  # its first chunk (60) does not fit in 50 rows: wait, never cut
    (0, 250, 60, 60),
    (60, 250, 512, 60),  # the next chunk, never more than one per step
    (240, 250, 512, 10),  # the last, partial chunk ends at the split
])
def test_canonical_chunks_start_at_zero_and_are_never_cut(n_past: int, split: int,
                                                          room: int, take: int) -> None:
    assert canonical_take(n_past, split, 60, room) == take


def test_exact_reuse_never_takes_a_whole_prompt() -> None:
    s = Slots(2, keep=True)
    s.kept[1][:], s.sealed[1] = [7, 8, 9], 3
    s.reserve(1)
    assert s.take_exact([7, 8, 9], 3) == (0, 0)  # its last token must be decoded again
