"""CPU priority of worker processes: niceness, CPU set and scheduler autogroup.

Contract:

* :class:`Priority` is what the gateway asks for (each field None: the worker's own);
  :func:`effective` resolves it against the :class:`Baseline` (the gateway's niceness and
  CPU set when the pool was built). Both are pure.
* :func:`apply` sets the niceness and CPU set of every thread of a process (on Linux both
  are per thread; threads created later inherit them from their creator) and the niceness of
  the process's autogroup (a worker leads its own session, and with autogroups on only the
  group's niceness weighs against other sessions). It never raises: every failure (lowering
  niceness without CAP_SYS_NICE, an invalid CPU id, a process or thread that exited
  meanwhile) goes to ``report(level, message)`` as one line. It does not block beyond a few
  ``/proc`` reads and writes.
* Decode threads (``Priority.threads``) are the worker's to apply (a protocol message, sent
  by the pool); this module only carries the number.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import msgspec

__all__ = ["Baseline", "Priority", "Report", "apply", "effective"]

Report = Callable[[int, str], None]
"""Receives a failure: a ``logging`` level and a one-line message."""


class Priority(msgspec.Struct, frozen=True):
    """What to give every worker; None in a field restores the worker's own."""

    nice: int | None = None
    cpus: tuple[int, ...] | None = None
    threads: int | None = None
    """llama.cpp decode threads; None: the number the worker loaded with."""

    @classmethod
    def of(cls, nice: int | None, cpus: Sequence[int] | None,
           threads: int | None = None) -> Priority:
        return cls(nice, tuple(cpus) if cpus is not None else None, threads)

    @property
    def requested(self) -> bool:
        """Whether it asks for anything beyond a worker's own."""
        return (self.nice, self.cpus, self.threads) != (None, None, None)


class Baseline(msgspec.Struct, frozen=True):
    """The niceness and CPU set a worker gets when nothing else is asked for."""

    nice: int
    cpus: tuple[int, ...]

    @classmethod
    def of_this_process(cls) -> Baseline:
        return cls(os.getpriority(os.PRIO_PROCESS, 0), tuple(sorted(os.sched_getaffinity(0))))


def effective(priority: Priority, baseline: Baseline) -> tuple[int, tuple[int, ...]]:
    """The niceness and CPU set to set: what was asked for, the baseline where it was None."""
    return (baseline.nice if priority.nice is None else priority.nice,
            baseline.cpus if priority.cpus is None else priority.cpus)


def apply(pid: int, what: str, nice: int, cpus: tuple[int, ...], report: Report) -> None:
    """Set ``nice`` and ``cpus`` on every thread of ``pid`` and ``nice`` on its autogroup;
    ``what`` names the process in reported failures."""
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except (OSError, ValueError) as e:
        report(logging.DEBUG, f"{what}: cannot list the worker's threads: {e}")
        return
    autogroup = Path(f"/proc/{pid}/autogroup")
    if autogroup.exists():
        # The worker leads its own session, so its own scheduler autogroup: with autogroups
        # on, thread niceness only ranks threads inside the group, and it is the group's
        # niceness that weighs it against the host app's group. Raising it back to 0 needs
        # no privilege.
        _try(report, what, f"set its autogroup's niceness {nice}",
             functools.partial(autogroup.write_text, str(nice)))
    for tid in tids:
        _try(report, what, f"set niceness {nice}",
             functools.partial(os.setpriority, os.PRIO_PROCESS, tid, nice))
        _try(report, what, f"set CPUs {','.join(map(str, cpus))}",
             functools.partial(os.sched_setaffinity, tid, cpus))


def _try(report: Report, what: str, action: str, call: Callable[[], object]) -> None:
    try:
        call()
    except ProcessLookupError:
        report(logging.DEBUG, f"{what}: a worker thread exited meanwhile")
    except OSError as e:
        report(logging.WARNING, f"{what}: cannot {action}: {e.strerror or e}")
    except (ValueError, OverflowError) as e:
        report(logging.WARNING, f"{what}: cannot {action}: {e}")
