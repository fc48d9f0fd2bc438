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
  Retry-After estimate) is raised at once. Embeddings count toward that bound but hold no
  sequence (the worker embeds between decode steps), so they never wait for one.
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
* Each model is in one :class:`~local_models.state.ModelState` (stopped, loading, ready,
  unloading, failed), moved only by :func:`~local_models.state.next_state`; ``loading``
  covers the load while it holds the pool's load lock (making room included).
* :meth:`ModelPool.status` reports, per model, its state and measured speed for routing:
  EWMAs (weight 0.2, the first sample sets them) of time to first token, per-sequence decode
  speed and completion length over generations that ended normally (not cancelled, not
  failed), of request duration over every request, and the duration of the last successful
  load; and counters since the pool started (loads, failed loads, unloads, crashes of ready
  workers) for metrics.
* :meth:`ModelPool.set_priority` sets the niceness and CPU set of every thread of every
  worker and the niceness of its scheduler autogroup (:mod:`local_models.priority`), and
  the number of llama.cpp decode threads, now and for workers started later. Failures are
  logged once per distinct message on the ``local_models.pool`` logger, never raised.

All errors raised are :class:`~local_models.errors.LocalError` subclasses
(:mod:`local_models.errors`); the gateway translates them once.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import os
import sys
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field

import msgspec
import psutil

from local_models import limits, priority, process
from local_models import protocol as p
from local_models.catalog import CatalogEntry
from local_models.embedder import LAST_N_CTX
from local_models.errors import (
    InvalidRequest,
    LocalError,
    ModelUnavailable,
    NoRoom,
    Overloaded,
    UnknownModel,
)
from local_models.eviction import LoadPlan, Resident, plan_load
from local_models.priority import Baseline, Priority
from local_models.process import Answer, Worker
from local_models.state import Event, ModelState, ModelStatus, next_state

__all__ = ["ModelPool", "PoolSettings"]

log = logging.getLogger(__name__)

_EWMA_WEIGHT = 0.2


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


@dataclass(eq=False)
class _Model:
    entry: CatalogEntry
    state: ModelState = field(init=False)
    worker: Worker | None = None
    """The ready state's worker; after it exits on its own, the dead one until reaped."""
    loading: asyncio.Future[Worker] | None = None
    """The load requested and not yet finished, shared by every request waiting for it."""
    in_flight: int = 0
    queued: int = 0
    last_used: float = field(default_factory=time.monotonic)
    error: str | None = None
    """Why the last load failed; cleared by a successful load."""
    failed_at: float = 0.0
    avg_duration_s: float | None = None
    ttft_s: float | None = None
    decode_tps: float | None = None
    avg_completion_tokens: float | None = None
    load_s: float | None = None
    loads: int = 0
    load_failures: int = 0
    unloads: int = 0
    crashes: int = 0
    slots: asyncio.Semaphore = field(init=False)
    several: asyncio.Lock = field(default_factory=asyncio.Lock)
    """Held while a request for several choices takes its slots one by one (two such
    requests holding part of what each needs would wait for each other for ever)."""

    def __post_init__(self) -> None:
        self.slots = asyncio.Semaphore(self.n_parallel)
        # a broken catalog entry never loads
        self.state = ModelState.STOPPED if self.entry.error is None else ModelState.FAILED

    def advance(self, event: Event) -> None:
        self.state = next_state(self.state, event)

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
        self._preloads: set[asyncio.Task[None]] = set()
        self._threads = (settings.n_threads or psutil.cpu_count(logical=False)
                         or os.cpu_count() or 1)
        self._available_memory = available_memory or _available_memory
        self._workers: set[Worker] = set()  # every started worker, loading ones included
        self._priority = Priority()
        self._baseline = Baseline.of_this_process()
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
            name=m.entry.name, state=m.state, loaded=m.state is ModelState.READY,
            pid=m.worker.pid if m.worker is not None else None,
            in_flight=m.in_flight, queued=m.queued, estimated_bytes=m.estimate,
            last_error=m.error or m.entry.error, n_parallel=m.n_parallel,
            ttft_s=m.ttft_s, decode_tps=m.decode_tps,
            avg_completion_tokens=m.avg_completion_tokens,
            avg_duration_s=m.avg_duration_s, load_s=m.load_s, nice=self._priority.nice,
            loads=m.loads, load_failures=m.load_failures, unloads=m.unloads,
            crashes=m.crashes,
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
        self._priority = Priority.of(nice, cpus, threads)
        self._workers = {w for w in self._workers if w.proc.returncode is None}
        for worker in self._workers:
            self._apply_priority(worker)

    def start(self) -> None:
        """Start the idle-unload task (call from the running loop)."""
        if self.settings.idle_unload_s > 0 and self._reaper is None:
            self._reaper = asyncio.create_task(self._reap_idle(), name="local-reaper")

    def preload(self, names: Iterable[str]) -> None:
        """Start loading the models ``names`` now, in the background (call from the running
        loop), so that no first request pays the load; one that comes while it loads waits
        for that load. A model that cannot load is logged and loads on a request as usual;
        unknown names and unusable models are skipped. :meth:`aclose` cancels what still
        loads."""
        for name in names:
            model = self._models.get(name)
            if model is None or model.entry.error is not None:
                continue
            task = asyncio.create_task(self._preload(model), name=f"local-preload-{name}")
            self._preloads.add(task)
            task.add_done_callback(self._preloads.discard)

    async def _preload(self, model: _Model) -> None:
        try:
            await self._ensure_loaded(model)
        except Exception as e:  # nobody awaits this task: say it here
            log.warning("preloading local model '%s' failed: %s", model.entry.name, e)

    async def aclose(self) -> None:
        for task in list(self._preloads):
            task.cancel()
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
        grammar: str | None = None,
        n: int = 1,
        logprobs: int | None = None,
    ) -> AsyncGenerator[p.Tokens | p.Done, None]:
        """Yield text deltas (each of one choice, with its log-probabilities when
        ``logprobs`` is set), then one :class:`~local_models.protocol.Done` with the usage.
        ``grammar``: GBNF every choice follows; ``n`` choices take ``n`` of the model's
        parallel sequences (at most ``n_parallel``)."""
        refusal = limits.generate_refusal(self._n_ctx(name), messages, prompt)
        n_parallel = self._model(name).n_parallel
        if refusal is None and not 1 <= n <= n_parallel:
            refusal = f"n = {n}: this model answers 1 to {n_parallel} choices per request"
        if refusal is not None:
            raise InvalidRequest(refusal)
        sampling = sampling or p.Sampling()
        sampling = msgspec.structs.replace(sampling, seed=limits.mask_seed(sampling.seed))
        async with self._request(name, n) as (model, worker, rid, answers):
            finished = False
            first: float | None = None
            try:
                sent = time.monotonic()
                worker.send(p.Generate(
                    rid, tuple(messages) if messages is not None else None, prompt,
                    limits.clamp_max_tokens(max_tokens), tuple(stop), sampling, grammar, n,
                    logprobs,
                ))
                while True:
                    arrived, msg = process.unpack(await answers.get())
                    if isinstance(msg, p.Tokens):
                        if first is None:
                            first = arrived
                        yield msg
                        continue
                    finished = True
                    if isinstance(msg, p.Done):
                        if msg.finish_reason != "cancelled":
                            model.record_generation(sent, first, arrived,
                                                    msg.completion_tokens // n)
                        yield msg
                        return
                    raise await worker.failure(msg)
            finally:
                if not finished:
                    worker.send(p.Cancel(rid))

    async def embed(self, name: str, inputs: Sequence[str | tuple[int, ...]],
                    pooling: p.Pooling = "mean") -> p.Embeddings:
        """The vectors of ``inputs`` (texts, or token ids used as they are), pooled as
        ``pooling`` says (last: at most :data:`~local_models.embedder.LAST_N_CTX` tokens)."""
        n_ctx = self._n_ctx(name) if pooling == "mean" else min(self._n_ctx(name), LAST_N_CTX)
        refusal = limits.embed_refusal(n_ctx, inputs)
        if refusal is not None:
            raise InvalidRequest(refusal)
        async with self._request(name, 0) as (_, worker, rid, answers):
            try:
                worker.send(p.Embed(rid, tuple(inputs), pooling))
                _, msg = process.unpack(await answers.get())
            except BaseException:  # cancelled or past its deadline: stop the worker's part
                worker.send(p.Cancel(rid))
                raise
            if isinstance(msg, p.Embeddings):
                return msg
            raise await worker.failure(msg)

    def _n_ctx(self, name: str) -> int:
        """The context per sequence a request of ``name`` must fit: the loaded worker's, else
        the configured one (a worker never gets more)."""
        model = self._model(name)
        if model.worker is not None and model.worker.loaded is not None:
            return model.worker.loaded.n_ctx
        return model.entry.spec.n_ctx

    @contextlib.asynccontextmanager
    async def _request(self, name: str, slots: int = 1) -> AsyncIterator[
            tuple[_Model, Worker, int, asyncio.Queue[Answer | None]]]:
        """Admission for ``slots`` sequences (0: holds none, counted as one), a loaded
        worker, a request id and its answers' queue; all freed however it ends."""
        model = self._model(name)
        await self._admit(model, slots)
        started = time.monotonic()
        try:
            worker = await self._ensure_loaded(model)
            rid = next(self._ids)
            answers: asyncio.Queue[Answer | None] = asyncio.Queue()
            worker.streams[rid] = answers
            try:
                yield model, worker, rid, answers
            finally:
                worker.streams.pop(rid, None)
        finally:
            for _ in range(slots):
                model.slots.release()
            model.in_flight -= max(slots, 1)
            model.last_used = time.monotonic()
            model.avg_duration_s = _ewma(model.avg_duration_s, model.last_used - started)

    def _model(self, name: str) -> _Model:
        model = self._models.get(name)
        if model is None:
            raise UnknownModel(f"no local model named '{name}'")
        if model.entry.error is not None:
            raise ModelUnavailable(model.entry.error)
        return model

    async def _admit(self, model: _Model, slots: int = 1) -> None:
        """Wait for ``slots`` of the model's sequences (0: none, counted as one), or raise
        Overloaded at once when the queue is full (running or waiting, every one counts)."""
        n_parallel = model.n_parallel
        # Count who is present, not the semaphore: a waiter woken by a freed slot is still
        # counted as queued until it runs, and a newcomer then is within the bound.
        counted = max(slots, 1)
        if model.in_flight + model.queued + counted > n_parallel + self.settings.max_queue:
            duration = model.avg_duration_s if model.avg_duration_s is not None else 1.0
            wait = duration * (model.queued + n_parallel) / n_parallel
            raise Overloaded(
                f"local model '{model.entry.name}' is busy ({n_parallel} running, "
                f"{model.queued} queued)",
                retry_after_s=max(1.0, round(wait, 1)),
            )
        if slots == 0:
            model.in_flight += 1
            return
        model.queued += slots
        taken = 0
        try:
            if slots == 1:
                await model.slots.acquire()
                taken = 1
            else:
                async with model.several:
                    while taken < slots:
                        await model.slots.acquire()
                        taken += 1
        except BaseException:
            for _ in range(taken):
                model.slots.release()
            raise
        finally:
            model.queued -= slots
        model.in_flight += slots

    # --- loading and unloading ----------------------------------------------------------

    async def _ensure_loaded(self, model: _Model) -> Worker:
        if model.state is ModelState.READY:
            assert model.worker is not None
            return model.worker
        if model.loading is None:
            since = time.monotonic() - model.failed_at
            if (model.state is ModelState.FAILED and model.error is not None
                    and since < self.settings.retry_failed_load_s):
                raise ModelUnavailable(model.error)
            model.loading = asyncio.ensure_future(self._load(model))
            model.loading.add_done_callback(lambda f: _loaded(model, f))
        return await asyncio.shield(model.loading)

    async def _load(self, model: _Model) -> Worker:
        async with self._load_lock:
            if model.worker is not None:
                await self._unload(model)  # a dead worker: reap it before starting anew
            model.advance(Event.LOAD)
            try:
                # No room is not a failed load: once the busy models finish, it may load.
                await self._make_room(model)
                try:
                    worker = await self._spawn(model)
                except LocalError as e:
                    model.error, model.failed_at = str(e), time.monotonic()
                    model.load_failures += 1
                    model.advance(Event.LOAD_FAILED)
                    raise
            except BaseException:
                if model.state is ModelState.LOADING:  # no room, cancelled: no verdict
                    model.advance(Event.LOAD_ABANDONED)
                raise
            model.error = None
            model.worker = worker
            model.last_used = time.monotonic()
            model.loads += 1
            model.advance(Event.LOADED)
            if not worker.alive:  # it died between its answer and now
                model.crashes += 1
                model.advance(Event.WORKER_EXITED)
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
                                      0 if busy else process.rss(m.worker.pid), busy,
                                      m.last_used))
        return plan_load(
            model.entry.name, model.estimate,
            budget_bytes=self.settings.memory_budget_bytes,
            available_bytes=self._available_memory(),
            floor_bytes=self.settings.memory_floor_bytes,
            residents=residents,
        )

    async def _spawn(self, model: _Model) -> Worker:
        entry = model.entry
        argv = self.settings.worker_command or (sys.executable, "-m", "local_models.worker")
        started = time.monotonic()
        worker = await process.start(entry.name, argv,
                                     functools.partial(_worker_exited, model))
        self._workers.add(worker)
        if self._priority.requested:
            self._apply_priority(worker)  # threads it starts from now on inherit it
        load = p.Load(
            path=entry.path,
            n_ctx=entry.spec.n_ctx,
            n_parallel=model.n_parallel,
            n_gpu_layers=entry.spec.n_gpu_layers,
            n_threads=self._threads,
            n_layers=entry.info.n_layers if entry.info is not None else 0,
        )
        try:
            await worker.handshake(load, self.settings.load_timeout_s)
        except ModelUnavailable:
            self._workers.discard(worker)
            raise
        model.load_s = time.monotonic() - started
        if self._priority.requested:
            self._apply_priority(worker)  # threads started before the first application
        return worker

    async def _unload(self, model: _Model) -> None:
        """Stop the model's worker (a ready one: through unloading to stopped; a dead one
        is only reaped)."""
        worker, model.worker = model.worker, None
        if worker is None:
            return
        stopping = model.state is ModelState.READY
        if stopping:
            model.unloads += 1
            model.advance(Event.UNLOAD)
        self._workers.discard(worker)
        try:
            await worker.stop()
        finally:
            if stopping:
                model.advance(Event.UNLOADED)

    # --- CPU priority -------------------------------------------------------------------

    def _apply_priority(self, worker: Worker) -> None:
        """Give ``worker`` what :meth:`set_priority` asked for (the baselines where it asked
        for None): niceness and affinity on every thread, decode threads once loaded (a
        loading worker gets them when it is)."""
        if worker.loaded is not None:
            worker.send(p.SetThreads(self._priority.threads or 0))
        nice, cpus = priority.effective(self._priority, self._baseline)
        priority.apply(worker.pid, f"local model '{worker.name}'", nice, cpus, self._log_once)

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
    """Holds a worker (a dead one counts: reaping it is free) with nothing running, queued
    or loading."""
    return (model.worker is not None and model.in_flight == 0 and model.queued == 0
            and model.loading is None)


def _worker_exited(model: _Model, worker: Worker) -> None:
    """A worker's death: the model's ready worker dying on its own stops the model (the
    pool's own stops and loading workers are the unload's and the load's business)."""
    if model.worker is worker:
        model.crashes += 1
        model.advance(Event.WORKER_EXITED)


def _loaded(model: _Model, future: asyncio.Future[Worker]) -> None:
    model.loading = None
    if not future.cancelled():
        future.exception()  # retrieved here: every waiter may have gone away meanwhile


def _ewma(average: float | None, sample: float) -> float:
    return sample if average is None else average + _EWMA_WEIGHT * (sample - average)


def _available_memory() -> int:
    return int(psutil.virtual_memory().available)
