"""Every error the model pool raises, and what each promises to its caller.

    LocalError                 base of them all; the gateway translates each once
    ├── UnknownModel           no local model of that name
    ├── InvalidRequest         this model cannot serve the request as asked (too long for
    │                          its context, past a limit of local_models.limits, refused by
    │                          the chat template); another model or target may
    ├── ModelUnavailable       the model cannot be loaded (bad file, failed start, load
    │   │                      timeout); a failed load is not retried for a while
    │   └── NoRoom             it does not fit the memory budget or the free memory above
    │                          the floor now; not remembered: the next request tries again
    ├── WorkerCrashed          the worker died or failed internally under this request;
    │   │                      the next request starts a new worker
    │   └── WorkerLost         the same death, already reported to another request as
    │                          WorkerCrashed (so health counts one death once)
    └── Overloaded             the model's admission queue is full; ``retry_after_s`` says
                               when to try again
"""

from __future__ import annotations

__all__ = [
    "InvalidRequest",
    "LocalError",
    "ModelUnavailable",
    "NoRoom",
    "Overloaded",
    "UnknownModel",
    "WorkerCrashed",
    "WorkerLost",
]


class LocalError(Exception):
    """Base of every error the pool raises."""


class UnknownModel(LocalError):
    """No local model has this name."""


class InvalidRequest(LocalError):
    """The model cannot serve this request as asked (too long, template refused it)."""


class ModelUnavailable(LocalError):
    """The model cannot be loaded (bad file, worker failed to start; :class:`NoRoom`: no
    memory for it now)."""


class NoRoom(ModelUnavailable):
    """The model does not fit the memory budget or the free memory above the floor now;
    it may once other models finish or the host frees memory."""


class WorkerCrashed(LocalError):
    """The worker died or failed internally while serving the request."""


class WorkerLost(WorkerCrashed):
    """The worker died under this request, and another request already reported that same
    death as :class:`WorkerCrashed`."""


class Overloaded(LocalError):
    """The model's worker and its queue are full; ``retry_after_s`` estimates when a slot
    frees (from the model's average request time)."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
