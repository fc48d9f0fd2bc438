"""The life of one local model in the pool, as a pure state machine.

    STOPPED --LOAD--> LOADING --LOADED--> READY --UNLOAD--> UNLOADING --UNLOADED--> STOPPED
    FAILED  --LOAD--> LOADING --LOAD_FAILED--> FAILED
                      LOADING --LOAD_ABANDONED--> STOPPED   (no room, cancelled: not a failure)
                                READY --WORKER_EXITED--> STOPPED  (crash; the next request loads)

Contract: :func:`next_state` is a total function of (state, event) over the transitions
drawn above and raises :class:`InvalidTransition` for any other pair (a bug in the caller,
never a condition of the host). No I/O, no clock. ``FAILED`` is also where a model whose
catalog entry has an error starts (it never loads). The pool keeps one :class:`ModelState`
per model and reports it in its status views (:class:`ModelStatus`).
"""

from __future__ import annotations

import enum

import msgspec

__all__ = ["Event", "InvalidTransition", "ModelState", "ModelStatus", "next_state"]


class ModelState(enum.StrEnum):
    STOPPED = "stopped"
    """No worker serves the model; the next request loads it."""
    LOADING = "loading"
    """A worker is being started (or is waiting for the load lock or for room)."""
    READY = "ready"
    """A loaded worker serves the model's requests."""
    UNLOADING = "unloading"
    """The worker is being stopped (idle unload, eviction, shutdown)."""
    FAILED = "failed"
    """The last load failed (or the catalog entry is broken); see the model's last error."""


class Event(enum.Enum):
    LOAD = "load"
    """A request found no ready worker and starts a load."""
    LOADED = "loaded"
    """The worker answered ``Loaded``."""
    LOAD_FAILED = "load_failed"
    """The load failed (bad file, worker died or timed out while loading)."""
    LOAD_ABANDONED = "load_abandoned"
    """The load ended without a verdict on the model: no room now, or cancelled."""
    UNLOAD = "unload"
    """The pool starts stopping a ready worker."""
    UNLOADED = "unloaded"
    """That worker has exited."""
    WORKER_EXITED = "worker_exited"
    """A ready worker ended on its own (crash, signal, out of memory)."""


class InvalidTransition(ValueError):
    """``event`` cannot happen in ``state``: the caller's bookkeeping is wrong."""


_TRANSITIONS: dict[tuple[ModelState, Event], ModelState] = {
    (ModelState.STOPPED, Event.LOAD): ModelState.LOADING,
    (ModelState.FAILED, Event.LOAD): ModelState.LOADING,
    (ModelState.LOADING, Event.LOADED): ModelState.READY,
    (ModelState.LOADING, Event.LOAD_FAILED): ModelState.FAILED,
    (ModelState.LOADING, Event.LOAD_ABANDONED): ModelState.STOPPED,
    (ModelState.READY, Event.UNLOAD): ModelState.UNLOADING,
    (ModelState.UNLOADING, Event.UNLOADED): ModelState.STOPPED,
    (ModelState.READY, Event.WORKER_EXITED): ModelState.STOPPED,
}


def next_state(state: ModelState, event: Event) -> ModelState:
    """The state after ``event`` in ``state``; :class:`InvalidTransition` if it cannot
    happen there."""
    try:
        return _TRANSITIONS[state, event]
    except KeyError:
        raise InvalidTransition(f"{event.value} cannot happen while {state.value}") from None


class ModelStatus(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    state: ModelState
    loaded: bool
    """``state`` is ready: a live worker serves the model."""
    pid: int | None
    """The worker's, while the pool holds one (a dead one until it is reaped)."""
    in_flight: int
    queued: int
    estimated_bytes: int
    last_error: str | None
    n_parallel: int = 1
    """Generations the worker decodes together (admission allows this many at once)."""
    ttft_s: float | None = None
    """EWMA of seconds from sending a generation to its first text."""
    decode_tps: float | None = None
    """EWMA of one sequence's decode speed, tokens per second after the first."""
    avg_completion_tokens: float | None = None
    """EWMA of completion tokens per generation."""
    avg_duration_s: float | None = None
    """EWMA of whole requests, admission to end (loading included); None until one ended."""
    load_s: float | None = None
    """Seconds the last successful load took."""
    nice: int | None = None
    """Niceness requested for the worker's threads; None: the gateway's own (baseline)."""
    loads: int = 0
    """Successful loads since the pool started (a new worker after a crash counts)."""
    load_failures: int = 0
    """Loads that failed (a bad GGUF, a worker that died or timed out loading); refusals
    for lack of room and abandoned loads are not counted."""
    unloads: int = 0
    """Workers the pool stopped (idle, making room, host memory pressure, shutdown)."""
    crashes: int = 0
    """Ready workers that exited on their own (crash, SIGKILL, out of memory); the next
    request starts a new one."""
