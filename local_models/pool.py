"""Supervises one worker process per loaded model: load, unload, admission, crash recovery.

Contract:

* :meth:`ModelPool.generate` and :meth:`ModelPool.embed` load the model on first use (one
  load at a time; concurrent first requests share it). A load must fit two limits: the
  loaded models' estimated memory stays within the budget, and the host's available memory
  (psutil, or the ``available_memory`` given) minus the model's estimate stays at or above
  ``memory_floor_bytes``. To fit, idle models are unloaded first, least recently used first
  and no more than needed (:func:`~local_models.eviction.plan_load` decides, counting what
  each would free by its measured RSS); after unloading, available memory is read once more
  as a final check. If the limits cannot be met the load is refused with :class:`NoRoom`
  (a :class:`ModelUnavailable`) naming the limit, and nothing is unloaded. A refusal for
  lack of room is not remembered as a failed load: the next request tries again.
* Admission: at most ``n_parallel`` generations of a model are in its worker at once; up to
  ``max_queue`` more wait here in arrival order; beyond that :class:`Overloaded` (with a
  Retry-After estimate) is raised at once.
* Requests beyond :mod:`local_models.limits` (messages, characters against the model's
  context, embedding inputs) raise :class:`InvalidRequest` naming the limit before anything
  is queued or sent; seeds are masked to 32 bits and ``max_tokens`` clamped, so any integer
  can be sent.
* A worker that dies (crash, SIGKILL, out of memory) fails every request in it at once,
  never a hang; the next request starts a new worker. One death is one event: the first
  request to see it gets :class:`WorkerCrashed`, the others :class:`WorkerLost` (a
  subclass), so health counts the death once.
  A model whose load failed is not retried for ``retry_failed_load_s``.
* Closing a generation or an embedding early (the consumer stops iterating, is cancelled,
  or its deadline passes) sends ``Cancel`` so the worker frees the sequence at its next
  decode step (an embedding stops before its next input).
* Models idle for ``idle_unload_s`` are unloaded by a background task;
  :meth:`ModelPool.unload_idle` unloads idle ones at once (the host needs its memory).
* :meth:`ModelPool.status` reports, per model, measured speed for routing: EWMAs (weight
  0.2, the first sample sets them) of time to first token, per-sequence decode speed and
  completion length over generations that ended normally (not cancelled, not failed),
  of request duration over every request, and the duration of the last successful load.
* :meth:`ModelPool.set_priority` sets the niceness and CPU set of every thread of every
  worker (on Linux both are per thread; llama.cpp's threads exist once it has loaded and
  decoded), and the niceness of the worker's scheduler autogroup (each worker leads its own
  session; with autogroups on, only the group's niceness weighs against other sessions),
  now and for workers started later. Failures are logged once per distinct
  message on the ``local_models.pool`` logger, never raised.

All errors raised are :class:`LocalError` subclasses; the gateway translates them once.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import itertools
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import psutil

from local_models import limits
from local_models import protocol as p
from local_models.catalog import CatalogEntry
from local_models.eviction import LoadPlan, Resident, plan_load

log = logging.getLogger(__name__)

_EWMA_WEIGHT = 0.2


class LocalError(Exception):
    """Base of every error the pool raises."""


class UnknownModel(LocalError):
    pass


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
    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class PoolSettings(msgspec.Struct, frozen=True, kw_only=True):
    memory_budget_bytes: int
    """Sum of the estimated memory of loaded models never exceeds this."""
    memory_floor_bytes: int = 0
    """A load must leave this much memory available to the host (its estimate counted)."""
    idle_unload_s: float = 600.0
    """0 keeps models loaded until shutdown."""
    max_queue: int = 32
    n_threads: int = 0
    """0: one per physical core."""
    load_timeout_s: float = 120.0
    retry_failed_load_s: float = 10.0
    worker_command: tuple[str, ...] = ()
    """argv of a worker; empty means ``python -m local_models.worker``."""


class ModelStatus(msgspec.Struct, frozen=True):
    name: str
    loaded: bool
    pid: int | None
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


_Answer = tuple[float, p.FromWorker]
"""A worker's answer and when it arrived (``time.monotonic``)."""


class _Worker:
    """A running worker process and the per-request queues of its answers."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process) -> None:
        self.name = name
        self.proc = proc
        self.loaded: p.Loaded | None = None
        self.streams: dict[int, asyncio.Queue[_Answer | None]] = {}
        self.control: asyncio.Queue[p.FromWorker | None] = asyncio.Queue()
        self.alive = True
        self.death_reported = False
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=20)
        self.tasks = [
            asyncio.create_task(self._read(), name=f"local-{name}-reader"),
            asyncio.create_task(self._relay_stderr(), name=f"local-{name}-stderr"),
        ]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def send(self, message: p.ToWorker) -> None:
        if self.alive and self.proc.stdin is not None and not self.proc.stdin.is_closing():
            self.proc.stdin.write(p.frame(message))

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        reader = self.proc.stdout
        try:
            while True:
                header = await reader.readexactly(p.HEADER.size)
                (size,) = p.HEADER.unpack(header)
                if size > p.MAX_FRAME:
                    break
                msg = p.from_worker_decoder.decode(await reader.readexactly(size))
                rid = getattr(msg, "id", None)
                if rid is None:
                    self.control.put_nowait(msg)
                elif (stream := self.streams.get(rid)) is not None:
                    # stamped here, not when the consumer takes it: speed is the worker's
                    stream.put_nowait((time.monotonic(), msg))
        except (asyncio.IncompleteReadError, ConnectionError, msgspec.DecodeError,
                msgspec.ValidationError):
            pass
        finally:
            self.alive = False
            self.control.put_nowait(None)
            for stream in self.streams.values():
                stream.put_nowait(None)

    async def _relay_stderr(self) -> None:
        assert self.proc.stderr is not None
        async for raw in self.proc.stderr:
            line = raw.decode("utf-8", errors="replace").rstrip()
            self.stderr_tail.append(line)
            print(f"[local {self.name}] {line}", file=sys.stderr, flush=True)

    async def death(self) -> str:
        """Wait for the process to exit and describe how it ended."""
        rc = await self.proc.wait()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if rc < 0:
            with contextlib.suppress(ValueError):
                return f"killed by {signal.Signals(-rc).name}"
        return f"exit status {rc}"

    async def stop(self, grace_s: float = 5.0) -> None:
        if self.proc.returncode is None:
            self.send(p.Shutdown())
            if self.proc.stdin is not None:
                self.proc.stdin.close()
            try:
                await asyncio.wait_for(self.proc.wait(), grace_s)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        for task in self.tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


@dataclass(eq=False)
class _Model:
    entry: CatalogEntry
    worker: _Worker | None = None
    loading: asyncio.Future[_Worker] | None = None
    in_flight: int = 0
    queued: int = 0
    last_used: float = field(default_factory=time.monotonic)
    failed: str | None = None
    failed_at: float = 0.0
    avg_duration_s: float | None = None
    ttft_s: float | None = None
    decode_tps: float | None = None
    avg_completion_tokens: float | None = None
    load_s: float | None = None
    slots: asyncio.Semaphore = field(init=False)

    def __post_init__(self) -> None:
        self.slots = asyncio.Semaphore(self.n_parallel)

    @property
    def estimate(self) -> int:
        return self.entry.memory.total if self.entry.memory is not None else 0

    @property
    def n_parallel(self) -> int:
        return max(self.entry.spec.n_parallel, 1)

    def record_generation(self, sent: float, first: float | None, done: float,
                          completion_tokens: int) -> None:
        """Feed the speed EWMAs with one generation that ended normally."""
        if first is not None:
            self.ttft_s = _ewma(self.ttft_s, first - sent)
            if completion_tokens >= 2 and done > first:
                self.decode_tps = _ewma(self.decode_tps, (completion_tokens - 1) / (done - first))
        self.avg_completion_tokens = _ewma(self.avg_completion_tokens, float(completion_tokens))


class ModelPool:
    """The local models of one gateway. Use from one event loop; call :meth:`aclose`.

    ``available_memory`` returns the bytes the host has available (default: psutil's
    ``virtual_memory().available``); it is called on the event loop while planning a load,
    so it must not block for long."""

    def __init__(self, entries: Sequence[CatalogEntry], settings: PoolSettings, *,
                 available_memory: Callable[[], int] | None = None) -> None:
        self.settings = settings
        self._models = {
            e.name: _Model(e) for e in entries
        }
        self._ids = itertools.count(1)
        self._load_lock = asyncio.Lock()
        self._reaper: asyncio.Task[None] | None = None
        self._threads = (settings.n_threads or psutil.cpu_count(logical=False)
                         or os.cpu_count() or 1)
        self._available_memory = available_memory or _available_memory
        self._workers: set[_Worker] = set()  # every started worker, loading ones included
        self._nice: int | None = None
        self._cpus: tuple[int, ...] | None = None
        self._decode_threads: int | None = None
        self._base_nice = os.getpriority(os.PRIO_PROCESS, 0)
        self._base_cpus = tuple(sorted(os.sched_getaffinity(0)))
        self._logged: set[str] = set()

    def names(self) -> list[str]:
        return list(self._models)

    def entry(self, name: str) -> CatalogEntry | None:
        model = self._models.get(name)
        return model.entry if model is not None else None

    def status(self) -> list[ModelStatus]:
        return [self._status(m) for m in self._models.values()]

    def model_status(self, name: str) -> ModelStatus | None:
        """One model's status (None: no such model); cheap enough for every request."""
        model = self._models.get(name)
        return self._status(model) if model is not None else None

    def worker_pids(self) -> list[tuple[str, int]]:
        """(model, pid) of every started worker, loading ones included."""
        return [(w.name, w.pid) for w in self._workers if w.proc.returncode is None]

    def _status(self, m: _Model) -> ModelStatus:
        return ModelStatus(
            name=m.entry.name, loaded=m.worker is not None and m.worker.alive,
            pid=m.worker.pid if m.worker is not None else None,
            in_flight=m.in_flight, queued=m.queued, estimated_bytes=m.estimate,
            last_error=m.failed or m.entry.error, n_parallel=m.n_parallel,
            ttft_s=m.ttft_s, decode_tps=m.decode_tps,
            avg_completion_tokens=m.avg_completion_tokens,
            avg_duration_s=m.avg_duration_s, load_s=m.load_s, nice=self._nice,
        )

    def set_priority(self, nice: int | None, cpus: Sequence[int] | None,
                     threads: int | None = None) -> None:
        """Apply to every live worker now and to workers started later: nice None restores the
        niceness the worker started with; cpus None restores the CPU set it started with;
        threads (llama.cpp decode threads) None restores the number it loaded with.

        Both are set on every thread of each worker (Linux keeps them per thread; threads
        created later inherit them from their creator). The baselines are the gateway's own
        niceness and CPU set when the pool was built. Never raises: failures (lowering
        niceness without CAP_SYS_NICE, an invalid CPU id, a worker that exited meanwhile)
        are logged once per distinct message. Does not block."""
        self._nice = nice
        self._cpus = tuple(cpus) if cpus is not None else None
        self._decode_threads = threads
        self._workers = {w for w in self._workers if w.proc.returncode is None}
        for worker in self._workers:
            self._apply_priority(worker)

    def start(self) -> None:
        """Start the idle-unload task (call from the running loop)."""
        if self.settings.idle_unload_s > 0 and self._reaper is None:
            self._reaper = asyncio.create_task(self._reap_idle(), name="local-reaper")

    async def aclose(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        await asyncio.gather(*(self._unload(m) for m in self._models.values()))

    # --- requests -----------------------------------------------------------------------

    async def generate(
        self,
        name: str,
        *,
        messages: Sequence[p.ChatMessage] | None = None,
        prompt: str | None = None,
        max_tokens: int | None = None,
        stop: Sequence[str] = (),
        sampling: p.Sampling | None = None,
    ) -> AsyncGenerator[str | p.Done, None]:
        """Yield text deltas, then one :class:`~local_models.protocol.Done` with the usage."""
        refusal = limits.generate_refusal(self._n_ctx(name), messages, prompt)
        if refusal is not None:
            raise InvalidRequest(refusal)
        sampling = sampling or p.Sampling()
        sampling = msgspec.structs.replace(sampling, seed=limits.mask_seed(sampling.seed))
        async with self._request(name) as (model, worker, rid, answers):
            finished = False
            first: float | None = None
            try:
                sent = time.monotonic()
                worker.send(p.Generate(
                    rid, tuple(messages) if messages is not None else None, prompt,
                    limits.clamp_max_tokens(max_tokens), tuple(stop), sampling,
                ))
                while True:
                    arrived, msg = _unpack(await answers.get())
                    if isinstance(msg, p.Tokens):
                        if first is None:
                            first = arrived
                        yield msg.text
                        continue
                    finished = True
                    if isinstance(msg, p.Done):
                        if msg.finish_reason != "cancelled":
                            model.record_generation(sent, first, arrived,
                                                    msg.completion_tokens)
                        yield msg
                        return
                    raise await _failure(name, worker, msg)
            finally:
                if not finished:
                    worker.send(p.Cancel(rid))

    async def embed(self, name: str, inputs: Sequence[str]) -> p.Embeddings:
        refusal = limits.embed_refusal(self._n_ctx(name), inputs)
        if refusal is not None:
            raise InvalidRequest(refusal)
        async with self._request(name) as (_, worker, rid, answers):
            try:
                worker.send(p.Embed(rid, tuple(inputs)))
                _, msg = _unpack(await answers.get())
            except BaseException:  # cancelled or past its deadline: stop the worker's part
                worker.send(p.Cancel(rid))
                raise
            if isinstance(msg, p.Embeddings):
                return msg
            raise await _failure(name, worker, msg)

    def _n_ctx(self, name: str) -> int:
        """The context per sequence a request of ``name`` must fit: the loaded worker's, else
        the configured one (a worker never gets more)."""
        model = self._model(name)
        if model.worker is not None and model.worker.loaded is not None:
            return model.worker.loaded.n_ctx
        return model.entry.spec.n_ctx

    @contextlib.asynccontextmanager
    async def _request(self, name: str) -> AsyncIterator[
            tuple[_Model, _Worker, int, asyncio.Queue[_Answer | None]]]:
        """Admission, a loaded worker, a request id and the queue of its answers; the
        slot is freed and the queue dropped however the request ends."""
        model = self._model(name)
        await self._admit(model)
        started = time.monotonic()
        try:
            worker = await self._ensure_loaded(model)
            rid = next(self._ids)
            answers: asyncio.Queue[_Answer | None] = asyncio.Queue()
            worker.streams[rid] = answers
            try:
                yield model, worker, rid, answers
            finally:
                worker.streams.pop(rid, None)
        finally:
            model.slots.release()
            model.in_flight -= 1
            model.last_used = time.monotonic()
            model.avg_duration_s = _ewma(model.avg_duration_s, model.last_used - started)

    def _model(self, name: str) -> _Model:
        model = self._models.get(name)
        if model is None:
            raise UnknownModel(f"no local model named '{name}'")
        if model.entry.error is not None:
            raise ModelUnavailable(model.entry.error)
        return model

    async def _admit(self, model: _Model) -> None:
        n_parallel = model.n_parallel
        # Count who is present, not the semaphore: a waiter woken by a freed slot is still
        # counted as queued until it runs, and a newcomer then is within the bound.
        if model.in_flight + model.queued >= n_parallel + self.settings.max_queue:
            duration = model.avg_duration_s if model.avg_duration_s is not None else 1.0
            wait = duration * (model.queued + n_parallel) / n_parallel
            raise Overloaded(
                f"local model '{model.entry.name}' is busy ({n_parallel} running, "
                f"{model.queued} queued)",
                retry_after_s=max(1.0, round(wait, 1)),
            )
        model.queued += 1
        try:
            await model.slots.acquire()
        finally:
            model.queued -= 1
        model.in_flight += 1

    # --- loading and unloading ----------------------------------------------------------

    async def _ensure_loaded(self, model: _Model) -> _Worker:
        if model.worker is not None and model.worker.alive:
            return model.worker
        if model.loading is None:
            since = time.monotonic() - model.failed_at
            if model.failed and since < self.settings.retry_failed_load_s:
                raise ModelUnavailable(model.failed)
            model.loading = asyncio.ensure_future(self._load(model))
            model.loading.add_done_callback(lambda f: _loaded(model, f))
        return await asyncio.shield(model.loading)

    async def _load(self, model: _Model) -> _Worker:
        async with self._load_lock:
            if model.worker is not None:
                await self._unload(model)  # a dead worker: reap it before starting anew
            # No room is not a failed load: once the busy models finish, it may load.
            await self._make_room(model)
            try:
                worker = await self._spawn(model)
            except LocalError as e:
                model.failed, model.failed_at = str(e), time.monotonic()
                raise
            model.failed = None
            model.worker = worker
            model.last_used = time.monotonic()
            return worker

    async def _make_room(self, model: _Model) -> None:
        """Unload the idle models the plan names; ModelUnavailable when it cannot fit."""
        plan = self._plan_load(model, may_unload=True)
        if plan.refusal is not None:
            raise NoRoom(plan.refusal)
        for victim in plan.unload:
            await self._unload(self._models[victim])
        if plan.unload:
            # What unloading actually returned may differ from the RSS that was counted.
            final = self._plan_load(model, may_unload=False)
            if final.refusal is not None:
                raise NoRoom(final.refusal)

    def _plan_load(self, model: _Model, *, may_unload: bool) -> LoadPlan:
        residents = []
        for m in self._models.values():
            if m.worker is None or m is model:
                continue
            busy = not may_unload or not _idle(m)  # only an idle model's RSS is ever counted
            residents.append(Resident(m.entry.name, m.estimate,
                                      0 if busy else _rss(m.worker.pid), busy, m.last_used))
        return plan_load(
            model.entry.name, model.estimate,
            budget_bytes=self.settings.memory_budget_bytes,
            available_bytes=self._available_memory(),
            floor_bytes=self.settings.memory_floor_bytes,
            residents=residents,
        )

    async def _spawn(self, model: _Model) -> _Worker:
        entry = model.entry
        argv = self.settings.worker_command or (sys.executable, "-m", "local_models.worker")
        started = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,  # a Ctrl-C in the terminal reaches the gateway only
        )
        worker = _Worker(entry.name, proc)
        self._workers.add(worker)
        if self._priority_set:
            self._apply_priority(worker)  # threads it starts from now on inherit it
        worker.send(p.Load(
            path=entry.path,
            n_ctx=entry.spec.n_ctx,
            n_parallel=model.n_parallel,
            n_gpu_layers=entry.spec.n_gpu_layers,
            n_threads=self._threads,
            n_layers=entry.info.n_layers if entry.info is not None else 0,
        ))
        try:
            async with asyncio.timeout(self.settings.load_timeout_s):
                answer = await worker.control.get()
        except TimeoutError:
            self._workers.discard(worker)
            await worker.stop(grace_s=0)
            raise ModelUnavailable(
                f"{entry.path}: loading took longer than {self.settings.load_timeout_s:g} s"
            ) from None
        if isinstance(answer, p.Loaded):
            worker.loaded = answer
            model.load_s = time.monotonic() - started
            if self._priority_set:
                self._apply_priority(worker)  # threads started before the first application
            return worker
        self._workers.discard(worker)
        await worker.stop(grace_s=1.0)
        if isinstance(answer, p.LoadFailed):
            raise ModelUnavailable(answer.message)
        detail = next((line for line in reversed(worker.stderr_tail) if line.strip()), "")
        raise ModelUnavailable(
            f"{entry.path}: the worker stopped while loading ({await _how(worker)})"
            + (f": {detail}" if detail else "")
        )

    async def _unload(self, model: _Model) -> None:
        worker, model.worker = model.worker, None
        if worker is not None:
            self._workers.discard(worker)
            await worker.stop()

    # --- CPU priority -------------------------------------------------------------------

    @property
    def _priority_set(self) -> bool:
        """Whether :meth:`set_priority` asks for anything beyond a worker's own."""
        return (self._nice, self._cpus, self._decode_threads) != (None, None, None)

    def _apply_priority(self, worker: _Worker) -> None:
        """Give ``worker`` what :meth:`set_priority` asked for (the baselines where it asked
        for None): niceness and affinity on every thread, decode threads once loaded (a
        loading worker gets them when it is)."""
        nice = self._base_nice if self._nice is None else self._nice
        cpus = self._base_cpus if self._cpus is None else self._cpus
        if worker.loaded is not None:
            worker.send(p.SetThreads(self._decode_threads or 0))
        what = f"local model '{worker.name}'"
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{worker.pid}/task")]
        except (OSError, ValueError) as e:
            self._log_once(logging.DEBUG, f"{what}: cannot list the worker's threads: {e}")
            return
        autogroup = Path(f"/proc/{worker.pid}/autogroup")
        if autogroup.exists():
            # The worker leads its own session, so its own scheduler autogroup: with
            # autogroups on, thread niceness only ranks threads inside the group, and it is
            # the group's niceness that weighs it against the host app's group. Raising it
            # back to 0 needs no privilege.
            self._try(what, f"set its autogroup's niceness {nice}",
                      functools.partial(autogroup.write_text, str(nice)))
        for tid in tids:
            self._try(what, f"set niceness {nice}",
                      functools.partial(os.setpriority, os.PRIO_PROCESS, tid, nice))
            self._try(what, f"set CPUs {','.join(map(str, cpus))}",
                      functools.partial(os.sched_setaffinity, tid, cpus))

    def _try(self, what: str, action: str, call: Callable[[], object]) -> None:
        try:
            call()
        except ProcessLookupError:
            self._log_once(logging.DEBUG, f"{what}: a worker thread exited meanwhile")
        except OSError as e:
            self._log_once(logging.WARNING, f"{what}: cannot {action}: {e.strerror or e}")
        except (ValueError, OverflowError) as e:
            self._log_once(logging.WARNING, f"{what}: cannot {action}: {e}")

    def _log_once(self, level: int, message: str) -> None:
        if message not in self._logged:
            self._logged.add(message)
            log.log(level, message)

    async def unload_idle(self, idle_for_s: float = 0.0) -> list[str]:
        """Unload every loaded model with nothing running or queued for ``idle_for_s``
        seconds or more (0: now); returns their names. Their memory goes back to the host."""
        now = time.monotonic()
        done = []
        for model in self._models.values():
            if _idle(model) and now - model.last_used >= idle_for_s:
                async with self._load_lock:
                    if _idle(model):  # a request may have come while waiting for the lock
                        await self._unload(model)
                        done.append(model.entry.name)
        return done

    async def _reap_idle(self) -> None:
        period = max(0.05, min(self.settings.idle_unload_s / 4, 5.0))
        while True:
            await asyncio.sleep(period)
            await self.unload_idle(self.settings.idle_unload_s)


def _idle(model: _Model) -> bool:
    return (model.worker is not None and model.in_flight == 0 and model.queued == 0
            and model.loading is None)


def _loaded(model: _Model, future: asyncio.Future[_Worker]) -> None:
    model.loading = None
    if not future.cancelled():
        future.exception()  # retrieved here: every waiter may have gone away meanwhile


async def _how(worker: _Worker) -> str:
    try:
        return await asyncio.wait_for(worker.death(), 5.0)
    except TimeoutError:
        return "not answering"


async def _failure(name: str, worker: _Worker, msg: p.FromWorker | None) -> LocalError:
    """The error for an answer that is not the expected one (None: the worker died)."""
    if isinstance(msg, p.Failed):
        if msg.kind == "invalid":
            return InvalidRequest(msg.message)
        return WorkerCrashed(f"local model '{name}': {msg.message}")
    if msg is None:
        how = await _how(worker)
        if worker.death_reported:
            return WorkerLost(f"local model '{name}' worker stopped ({how})")
        worker.death_reported = True
        return WorkerCrashed(f"local model '{name}' worker stopped ({how})")
    return WorkerCrashed(f"local model '{name}' answered out of order ({type(msg).__name__})")


def _unpack(answer: _Answer | None) -> tuple[float, p.FromWorker | None]:
    """An answer and its arrival time; None (the worker died) arrives now."""
    return answer if answer is not None else (time.monotonic(), None)


def _ewma(average: float | None, sample: float) -> float:
    return sample if average is None else average + _EWMA_WEIGHT * (sample - average)


def _available_memory() -> int:
    return int(psutil.virtual_memory().available)


def _rss(pid: int) -> int:
    """Resident bytes of ``pid`` that its exit returns (not the file-backed pages of the
    mapped model, which available memory already counts as reclaimable); 0 when it is gone."""
    try:
        info = psutil.Process(pid).memory_info()
    except psutil.Error:
        return 0
    return int(info.rss - getattr(info, "shared", 0))
