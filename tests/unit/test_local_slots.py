"""The engine's slot bookkeeping (pure): reservations, the longest-prefix choice, kept tokens."""

from __future__ import annotations

import pytest

from local_models.slots import Slots, common_prefix


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
