"""CPU used meanwhile by processes that are not part of the benchmark.

The benchmark machines are shared, and a llama.cpp process whose threads share the cores
with someone else's work slows down far more than its share; so the scripts measure, next
to each result, how many cores other processes used while it ran.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Sequence
from pathlib import Path

import psutil


def busy_s() -> float:
    """CPU seconds the whole machine has spent busy since boot."""
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + t.irq + t.softirq


def tree_cpu_s(pids: Sequence[int], names: dict[int, str] | None = None, *,
               reaped_children: bool = True) -> dict[int, float]:
    """CPU seconds of ``pids`` and all their descendants, by pid (and into ``names``, a
    short name of each process). This process, when listed, counts with the children it
    has waited for when ``reaped_children``."""
    procs: dict[int, psutil.Process] = {}
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(pid)
            procs[pid] = root
            for child in root.children(recursive=True):
                procs[child.pid] = child
    out: dict[int, float] = {}
    for pid, proc in procs.items():
        if pid == os.getpid():
            t0 = os.times()
            out[pid] = t0.user + t0.system
            if reaped_children:
                out[pid] += t0.children_user + t0.children_system
            continue
        with contextlib.suppress(psutil.Error):
            t = proc.cpu_times()
            out[pid] = t.user + t.system
            if names is not None:
                names[pid] = short_name(proc)
    return out


def short_name(proc: psutil.Process) -> str:
    """``local_models.worker`` for ``python -m local_models.worker``, else the program."""
    cmd = proc.cmdline()
    if "-m" in cmd[:-1]:
        return cmd[cmd.index("-m") + 1]
    return Path(cmd[0]).name if cmd else proc.name()


class CpuMeter:
    """How much CPU processes other than ours (this script and ``pids``, each with all its
    descendants) used between start() (or construction) and other_cores().

    ``reaped_children``: whether the CPU time of this script's children that it has
    already waited for counts as ours (for children that run and exit within the
    measure, such as local.py's raw decode)."""

    def __init__(self, pids: Sequence[int], *, reaped_children: bool = True) -> None:
        self.pids = [os.getpid(), *pids]
        self.reaped_children = reaped_children
        self.start()

    def start(self) -> None:
        self._t0 = time.monotonic()
        self._busy0 = busy_s()
        self._ours0 = tree_cpu_s(self.pids, reaped_children=self.reaped_children)

    def other_cores(self) -> float:
        """Cores (CPU seconds per second) used by other processes since start()."""
        wall = time.monotonic() - self._t0
        self._names: dict[int, str] = {}
        ours1 = tree_cpu_s(self.pids, self._names, reaped_children=self.reaped_children)
        self._ours = {pid: v - self._ours0.get(pid, 0.0) for pid, v in ours1.items()}
        self._wall = wall
        other = busy_s() - self._busy0 - sum(self._ours.values())
        return max(other, 0.0) / wall if wall > 0 else 0.0

    def ours(self) -> str:
        """The cores each of our processes used (after other_cores())."""
        by_name: dict[str, float] = {}
        for pid, cpu in self._ours.items():
            name = "benchmark client" if pid == os.getpid() else self._names.get(pid, "?")
            by_name[name] = by_name.get(name, 0.0) + cpu / self._wall
        return ", ".join(f"{name} {cores:.2f}" for name, cores in by_name.items())
