"""Host resources, sampled with psutil (and NVML when a driver is present) into snapshots.

Contract:

* :class:`Sampler` reads the host once per :meth:`Sampler.sample` call and returns an
  immutable :class:`ResourceSnapshot`. It blocks (it reads ``/proc`` and may call NVML):
  call it from one thread at a time, never from the event loop.
* CPU figures are shares of the *whole host* (every logical CPU), 0..100, measured since the
  previous sample (the first covers the time since the Sampler was made; a worker seen for
  the first time reports its average since it started). One busy core on a 2-CPU host is 50.
  ``others_cpu_percent`` is the host's demand without this process and its local workers:
  what the app next to the sidecar is using.
* Workers are given per sample as ``(model name, pid)``. A pid that exited, turned zombie
  or was reused by an unrelated process is skipped; nothing is raised for it.
* GPUs: ``gpus`` is ``None`` when NVML cannot be used (``pynvml`` missing, no driver); that
  is decided once, at the first sample, and never retried. ``()`` means NVML works and sees
  no GPU. A GPU whose query fails is left out of that sample.
* :class:`Monitor` runs a Sampler every ``interval_s`` in a background task on the event
  loop; the request path reads :attr:`Monitor.latest` and never waits for a sample. Only
  ``Sampler.sample`` runs in a worker thread; ``workers()`` and ``on_sample`` run on the
  loop. A failing sample or ``on_sample`` is logged and the loop goes on; a failed sample
  keeps the previous snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import msgspec
import psutil

log = logging.getLogger("sidecar.host.sampler")


class WorkerUsage(msgspec.Struct, frozen=True):
    """One local model's worker process."""

    name: str
    pid: int
    cpu_percent: float  # share of the whole host's CPU capacity, 0..100
    rss_bytes: int
    nice: int | None  # None when it could not be read


class GpuUsage(msgspec.Struct, frozen=True):
    index: int
    name: str
    memory_total_bytes: int
    memory_used_bytes: int
    utilization_percent: float


class ResourceSnapshot(msgspec.Struct, frozen=True):
    """The host at one moment. CPU percentages are 0..100 over all logical CPUs."""

    taken_at: float  # the Sampler's clock (time.monotonic by default)
    cpu_count: int  # logical CPUs
    cpu_percent: float  # whole host busy since the previous sample
    sidecar_cpu_percent: float  # this process and its workers
    others_cpu_percent: float  # max(0, cpu_percent - sidecar_cpu_percent): the host app
    load_avg: tuple[float, float, float]
    memory_total_bytes: int
    memory_available_bytes: int
    swap_total_bytes: int
    swap_used_bytes: int
    workers: tuple[WorkerUsage, ...]
    gpus: tuple[GpuUsage, ...] | None  # None: no NVML; (): NVML works, no GPU


class _HostTimes(NamedTuple):
    busy: float
    total: float


def _host_times() -> _HostTimes:
    """Busy and total CPU seconds over all CPUs, counted as ``psutil.cpu_percent`` does."""
    t = psutil.cpu_times()
    total = sum(t)
    # Linux counts guest time inside user and nice as well.
    total -= getattr(t, "guest", 0.0) + getattr(t, "guest_nice", 0.0)
    idle = t.idle + getattr(t, "iowait", 0.0)
    return _HostTimes(total - idle, total)


def _lifetime_percent(proc: psutil.Process) -> float:
    """CPU use since the process started, in % of one CPU (call inside ``oneshot``)."""
    times = proc.cpu_times()
    started = proc.create_time()
    if hasattr(time, "CLOCK_BOOTTIME"):
        # Linux: psutil dates a start from the boot time in /proc/stat, in whole seconds;
        # "now" on the same basis cancels that error, which matters for a young worker.
        age = psutil.boot_time() + time.clock_gettime(time.CLOCK_BOOTTIME) - started
    else:
        age = time.time() - started
    return 100.0 * (times.user + times.system) / age if age > 0 else 0.0


def _clamp_percent(value: float) -> float:
    return min(100.0, max(0.0, value))


class Sampler:
    """Blocking; call :meth:`sample` from one thread at a time (the Monitor runs it in a
    worker thread). Holds a ``psutil.Process`` per listed pid between calls, because a
    process's CPU share is measured against its previous reading."""

    def __init__(
        self, *, nvml: bool = True, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._clock = clock
        self._cpu_count = psutil.cpu_count(logical=True) or os.cpu_count() or 1
        self._own = psutil.Process()
        self._own.cpu_percent(None)
        self._host_prev = _host_times()
        self._procs: dict[int, psutil.Process] = {}
        self._nvml_wanted = nvml
        self._nvml: Any = None  # the pynvml module once nvmlInit succeeded
        self._nvml_tried = False  # NVML is tried once, at the first sample

    def sample(self, workers: Sequence[tuple[str, int]]) -> ResourceSnapshot:
        """Read the host now. Blocks for a few hundred microseconds, more with NVML."""
        gpus = self._gpus()
        taken_at = self._clock()
        host = _host_times()
        d_total = host.total - self._host_prev.total
        cpu = 100.0 * (host.busy - self._host_prev.busy) / d_total if d_total > 0 else 0.0
        self._host_prev = host
        ncpu = self._cpu_count

        own_pid = self._own.pid
        sidecar = self._own.cpu_percent(None) / ncpu
        usages = []
        listed: set[int] = set()
        for name, pid in workers:
            if pid in listed:
                continue
            listed.add(pid)
            usage = self._worker(name, pid)
            if usage is None:
                continue
            usages.append(usage)
            if pid != own_pid:
                sidecar += usage.cpu_percent
        for pid in self._procs.keys() - listed:
            del self._procs[pid]

        cpu = _clamp_percent(cpu)
        sidecar = _clamp_percent(sidecar)
        mem = psutil.virtual_memory()
        swap = psutil.swap_memory()
        load1, load5, load15 = psutil.getloadavg()
        return ResourceSnapshot(
            taken_at=taken_at,
            cpu_count=ncpu,
            cpu_percent=cpu,
            sidecar_cpu_percent=sidecar,
            others_cpu_percent=max(0.0, cpu - sidecar),
            load_avg=(load1, load5, load15),
            memory_total_bytes=mem.total,
            memory_available_bytes=mem.available,
            swap_total_bytes=swap.total,
            swap_used_bytes=swap.used,
            workers=tuple(usages),
            gpus=gpus,
        )

    def _worker(self, name: str, pid: int) -> WorkerUsage | None:
        proc = self._procs.get(pid)
        try:
            # is_running() also compares creation times, so a reused pid is not mistaken
            # for the worker that had it (its CPU reading would be against another process).
            first = proc is None or not proc.is_running()
            if proc is None or first:
                proc = self._procs[pid] = psutil.Process(pid)
            with proc.oneshot():
                if proc.status() == psutil.STATUS_ZOMBIE:
                    del self._procs[pid]
                    return None
                cpu = proc.cpu_percent(None) / self._cpu_count
                if first:
                    # No previous reading yet: use the average over the process's life, so
                    # a new worker's load is not counted as the host app's for one sample.
                    cpu = _lifetime_percent(proc) / self._cpu_count
                rss = proc.memory_info().rss
            try:
                nice: int | None = proc.nice()
            except psutil.AccessDenied:
                nice = None
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            self._procs.pop(pid, None)
            return None
        return WorkerUsage(name=name, pid=pid, cpu_percent=_clamp_percent(cpu),
                           rss_bytes=rss, nice=nice)

    def _gpus(self) -> tuple[GpuUsage, ...] | None:
        if not self._nvml_tried:
            self._nvml_tried = True
            if self._nvml_wanted:
                self._nvml = _nvml_init()
        nv = self._nvml
        if nv is None:
            return None
        try:
            count = int(nv.nvmlDeviceGetCount())
        except nv.NVMLError as e:
            log.debug("nvmlDeviceGetCount failed: %s", e)
            return ()
        gpus = []
        for index in range(count):
            try:
                handle = nv.nvmlDeviceGetHandleByIndex(index)
                name = nv.nvmlDeviceGetName(handle)
                memory = nv.nvmlDeviceGetMemoryInfo(handle)
                util = nv.nvmlDeviceGetUtilizationRates(handle)
            except nv.NVMLError as e:
                log.debug("GPU %d left out of the sample: %s", index, e)
                continue
            gpus.append(GpuUsage(
                index=index,
                name=name.decode(errors="replace") if isinstance(name, bytes) else str(name),
                memory_total_bytes=int(memory.total),
                memory_used_bytes=int(memory.used),
                utilization_percent=float(util.gpu),
            ))
        return tuple(gpus)

    def close(self) -> None:
        """Shut NVML down if it was started. Idempotent; later samples report no GPUs."""
        nv, self._nvml = self._nvml, None
        self._nvml_tried = True
        if nv is not None:
            try:
                nv.nvmlShutdown()
            except nv.NVMLError as e:
                log.debug("nvmlShutdown failed: %s", e)


def _nvml_init() -> Any:
    """The initialised ``pynvml`` module, or None when NVML cannot be used on this host."""
    try:
        import pynvml  # type: ignore[import-untyped]  # nvidia-ml-py ships no type hints
    except ImportError:
        log.info("pynvml is not installed: no GPU figures")
        return None
    try:
        pynvml.nvmlInit()
    except (pynvml.NVMLError, OSError) as e:
        log.info("NVML unavailable, no GPU figures: %s", e)
        return None
    return pynvml


class Monitor:
    """Samples every ``interval_s`` in a background task; the request path only reads
    :attr:`latest`. Owned by one event loop; not thread-safe."""

    def __init__(
        self,
        sampler: Sampler,
        interval_s: float,
        workers: Callable[[], Sequence[tuple[str, int]]],
        on_sample: Callable[[ResourceSnapshot], None] | None = None,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self._sampler = sampler
        self._interval_s = interval_s
        self._workers = workers
        self._on_sample = on_sample
        self._latest: ResourceSnapshot | None = None
        self._task: asyncio.Task[None] | None = None
        # Held by the thread running sample() or close(): close waits for an in-flight
        # sample that cancelling the task cannot stop.
        self._sampler_lock = threading.Lock()
        self._closed = False
        self._failing = False

    @property
    def latest(self) -> ResourceSnapshot:
        """The newest snapshot. Raises RuntimeError before :meth:`start`."""
        if self._latest is None:
            raise RuntimeError("Monitor.start() has not run")
        return self._latest

    async def start(self) -> None:
        """Take the first sample (in a thread; its errors propagate), then start sampling
        every ``interval_s``. Call from the running loop, once."""
        if self._task is not None or self._closed:
            raise RuntimeError("Monitor already started or closed")
        self._set(await self._sample(self._workers()))
        self._task = asyncio.get_running_loop().create_task(self._run(), name="monitor")

    async def aclose(self) -> None:
        """Stop sampling and close the sampler (after any sample still running in its
        thread). Idempotent; :attr:`latest` keeps the last snapshot."""
        if self._closed:
            return
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await asyncio.to_thread(self._close_sampler)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time() + self._interval_s
        while True:
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            try:
                snapshot = await self._sample(self._workers())
            except Exception:
                self._log_failure("resource sample failed; keeping the previous snapshot")
            else:
                self._set(snapshot)
            # Keep to the grid; if a sample overran whole intervals, skip those ticks
            # rather than sampling back to back.
            next_at += self._interval_s
            now = loop.time()
            if next_at < now:
                next_at += (now - next_at) // self._interval_s * self._interval_s
                if next_at < now:
                    next_at += self._interval_s

    def _set(self, snapshot: ResourceSnapshot) -> None:
        self._latest = snapshot
        if self._on_sample is not None:
            try:
                self._on_sample(snapshot)
            except Exception:
                self._log_failure("on_sample failed")
                return
        if self._failing:
            self._failing = False
            log.info("resource monitor recovered")

    def _log_failure(self, message: str) -> None:
        # A fault that repeats every interval is logged once, with its traceback, until a
        # sample goes through cleanly again.
        if self._failing:
            log.debug(message, exc_info=True)
        else:
            self._failing = True
            log.exception(message)

    async def _sample(self, workers: Sequence[tuple[str, int]]) -> ResourceSnapshot:
        return await asyncio.to_thread(self._sample_locked, list(workers))

    def _sample_locked(self, workers: Sequence[tuple[str, int]]) -> ResourceSnapshot:
        with self._sampler_lock:
            return self._sampler.sample(workers)

    def _close_sampler(self) -> None:
        with self._sampler_lock:
            self._sampler.close()
