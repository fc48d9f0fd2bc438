"""The model state machine (local_models.state): every transition the pool relies on, and
every other pair refused."""

from __future__ import annotations

import itertools

import pytest

from local_models import ModelState
from local_models.state import Event, InvalidTransition, next_state

S, E = ModelState, Event

ALLOWED = {
    (S.STOPPED, E.LOAD): S.LOADING,
    (S.FAILED, E.LOAD): S.LOADING,
    (S.LOADING, E.LOADED): S.READY,
    (S.LOADING, E.LOAD_FAILED): S.FAILED,
    (S.LOADING, E.LOAD_ABANDONED): S.STOPPED,
    (S.READY, E.UNLOAD): S.UNLOADING,
    (S.UNLOADING, E.UNLOADED): S.STOPPED,
    (S.READY, E.WORKER_EXITED): S.STOPPED,
}


@pytest.mark.parametrize(("state", "event"), list(ALLOWED))
def test_allowed_transitions(state: ModelState, event: Event) -> None:
    assert next_state(state, event) is ALLOWED[state, event]


@pytest.mark.parametrize(
    ("state", "event"),
    [pair for pair in itertools.product(ModelState, Event) if pair not in ALLOWED],
)
def test_every_other_transition_is_refused(state: ModelState, event: Event) -> None:
    with pytest.raises(InvalidTransition, match=f"{event.value} cannot happen while "
                                                f"{state.value}"):
        next_state(state, event)


def test_lifecycles() -> None:
    def run(state: ModelState, *events: Event) -> list[ModelState]:
        seen = [state]
        for event in events:
            seen.append(next_state(seen[-1], event))
        return seen

    # load, serve, unload, load again
    assert run(S.STOPPED, E.LOAD, E.LOADED, E.UNLOAD, E.UNLOADED, E.LOAD, E.LOADED) == [
        S.STOPPED, S.LOADING, S.READY, S.UNLOADING, S.STOPPED, S.LOADING, S.READY]
    # a failed load is retried later; no room is no verdict; a crash stops the model
    assert run(S.STOPPED, E.LOAD, E.LOAD_FAILED, E.LOAD, E.LOAD_ABANDONED, E.LOAD, E.LOADED,
               E.WORKER_EXITED) == [
        S.STOPPED, S.LOADING, S.FAILED, S.LOADING, S.STOPPED, S.LOADING, S.READY, S.STOPPED]


def test_states_read_as_their_names_in_status_bodies() -> None:
    import msgspec

    assert [str(s) for s in ModelState] == ["stopped", "loading", "ready", "unloading",
                                            "failed"]
    assert msgspec.json.encode({"state": S.READY}) == b'{"state":"ready"}'
