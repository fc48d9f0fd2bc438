"""Supervises one worker process per loaded model: load, unload, admission, crash recovery.

Contract:

* :meth:`ModelPool.generate` and :meth:`ModelPool.embed` load the model on first use (one
  load at a time; concurrent first requests share it). Loading a model that would push the
  loaded models' estimated memory past the budget first unloads idle models, least recently
  used first; if that cannot make room the load is refused with :class:`ModelUnavailable`.
* Admission: at most ``n_parallel`` generations of a model are in its worker at once; up to
  ``max_queue`` more wait here in arrival order; beyond that :class:`Overloaded` (with a
  Retry-After estimate) is raised at once.
* A worker that dies (crash, SIGKILL, out of memory) fails every request in it with
  :class:`WorkerCrashed` at once, never a hang; the next request starts a new worker.
  A model whose load failed is not retried for ``retry_failed_load_s``.
* Closing a generation early (the consumer stops iterating, is cancelled, or its deadline
  passes) sends ``Cancel`` so the worker frees the sequence at its next decode step.
* Models idle for ``idle_unload_s`` are unloaded by a background task.

All errors raised are :class:`LocalError` subclasses; the gateway translates them once.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import os
import signal
import sys
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass, field

import msgspec
import psutil

from local_models import protocol as p
from local_models.catalog import CatalogEntry


class LocalError(Exception):
    """Base of every error the pool raises."""


class UnknownModel(LocalError):
    pass


class InvalidRequest(LocalError):
    """The model cannot serve this request as asked (too long, template refused it)."""


class ModelUnavailable(LocalError):
    """The model cannot be loaded (bad file, memory budget, worker failed to start)."""


class WorkerCrashed(LocalError):
    """The worker died or failed internally while serving the request."""


class Overloaded(LocalError):
    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class PoolSettings(msgspec.Struct, frozen=True, kw_only=True):
    memory_budget_bytes: int
    """Sum of the estimated memory of loaded models never exceeds this."""
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


class _Worker:
    """A running worker process and the per-request queues of its answers."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process) -> None:
        self.name = name
        self.proc = proc
        self.loaded: p.Loaded | None = None
        self.streams: dict[int, asyncio.Queue[p.FromWorker | None]] = {}
        self.control: asyncio.Queue[p.FromWorker | None] = asyncio.Queue()
        self.alive = True
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
                target = self.control if rid is None else self.streams.get(rid)
                if target is not None:
                    target.put_nowait(msg)
        except (asyncio.IncompleteReadError, ConnectionError, msgspec.DecodeError,
                msgspec.ValidationError):
            pass
        finally:
            self.alive = False
            for q in [self.control, *self.streams.values()]:
                q.put_nowait(None)

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
    slots: asyncio.Semaphore
    worker: _Worker | None = None
    loading: asyncio.Future[_Worker] | None = None
    in_flight: int = 0
    queued: int = 0
    last_used: float = field(default_factory=time.monotonic)
    failed: str | None = None
    failed_at: float = 0.0
    avg_duration_s: float = 1.0

    @property
    def estimate(self) -> int:
        return self.entry.memory.total if self.entry.memory is not None else 0


class ModelPool:
    """The local models of one gateway. Use from one event loop; call :meth:`aclose`."""

    def __init__(self, entries: Sequence[CatalogEntry], settings: PoolSettings) -> None:
        self.settings = settings
        self._models = {
            e.name: _Model(e, asyncio.Semaphore(max(e.spec.n_parallel, 1))) for e in entries
        }
        self._ids = itertools.count(1)
        self._load_lock = asyncio.Lock()
        self._reaper: asyncio.Task[None] | None = None
        self._threads = (settings.n_threads or psutil.cpu_count(logical=False)
                         or os.cpu_count() or 1)

    def names(self) -> list[str]:
        return list(self._models)

    def entry(self, name: str) -> CatalogEntry | None:
        model = self._models.get(name)
        return model.entry if model is not None else None

    def status(self) -> list[ModelStatus]:
        return [
            ModelStatus(
                name, m.worker is not None and m.worker.alive,
                m.worker.pid if m.worker is not None else None,
                m.in_flight, m.queued, m.estimate, m.failed or m.entry.error,
            )
            for name, m in self._models.items()
        ]

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
        async with self._request(name) as (worker, rid, answers):
            finished = False
            try:
                worker.send(p.Generate(
                    rid, tuple(messages) if messages is not None else None, prompt,
                    max_tokens, tuple(stop), sampling or p.Sampling(),
                ))
                while True:
                    msg = await answers.get()
                    if isinstance(msg, p.Tokens):
                        yield msg.text
                        continue
                    finished = True
                    if isinstance(msg, p.Done):
                        yield msg
                        return
                    raise await _failure(name, worker, msg)
            finally:
                if not finished:
                    worker.send(p.Cancel(rid))

    async def embed(self, name: str, inputs: Sequence[str]) -> p.Embeddings:
        async with self._request(name) as (worker, rid, answers):
            worker.send(p.Embed(rid, tuple(inputs)))
            msg = await answers.get()
            if isinstance(msg, p.Embeddings):
                return msg
            raise await _failure(name, worker, msg)

    @contextlib.asynccontextmanager
    async def _request(self, name: str) -> AsyncIterator[
            tuple[_Worker, int, asyncio.Queue[p.FromWorker | None]]]:
        """Admission, a loaded worker, a request id and the queue of its answers; the
        slot is freed and the queue dropped however the request ends."""
        model = self._model(name)
        await self._admit(model)
        started = time.monotonic()
        try:
            worker = await self._ensure_loaded(model)
            rid = next(self._ids)
            answers: asyncio.Queue[p.FromWorker | None] = asyncio.Queue()
            worker.streams[rid] = answers
            try:
                yield worker, rid, answers
            finally:
                worker.streams.pop(rid, None)
        finally:
            model.slots.release()
            model.in_flight -= 1
            model.last_used = time.monotonic()
            model.avg_duration_s += 0.2 * (model.last_used - started - model.avg_duration_s)

    def _model(self, name: str) -> _Model:
        model = self._models.get(name)
        if model is None:
            raise UnknownModel(f"no local model named '{name}'")
        if model.entry.error is not None:
            raise ModelUnavailable(model.entry.error)
        return model

    async def _admit(self, model: _Model) -> None:
        n_parallel = max(model.entry.spec.n_parallel, 1)
        if model.slots.locked() and model.queued >= self.settings.max_queue:
            wait = model.avg_duration_s * (model.queued + n_parallel) / n_parallel
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
        budget = self.settings.memory_budget_bytes
        if model.estimate > budget:
            raise ModelUnavailable(
                f"local model '{model.entry.name}' needs about {_mib(model.estimate)} MiB; "
                f"the memory budget is {_mib(budget)} MiB"
            )
        loaded = [m for m in self._models.values() if m.worker is not None and m is not model]
        used = sum(m.estimate for m in loaded)
        for victim in sorted(loaded, key=lambda m: m.last_used):
            if used + model.estimate <= budget:
                break
            if victim.in_flight == 0 and victim.queued == 0:
                await self._unload(victim)
                used -= victim.estimate
        if used + model.estimate > budget:
            raise ModelUnavailable(
                f"local model '{model.entry.name}' needs about {_mib(model.estimate)} MiB; "
                f"{_mib(used)} MiB of the {_mib(budget)} MiB budget is held by busy models"
            )

    async def _spawn(self, model: _Model) -> _Worker:
        entry = model.entry
        argv = self.settings.worker_command or (sys.executable, "-m", "local_models.worker")
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,  # a Ctrl-C in the terminal reaches the gateway only
        )
        worker = _Worker(entry.name, proc)
        worker.send(p.Load(
            path=entry.path,
            n_ctx=entry.spec.n_ctx,
            n_parallel=max(entry.spec.n_parallel, 1),
            n_gpu_layers=entry.spec.n_gpu_layers,
            n_threads=self._threads,
            n_layers=entry.info.n_layers if entry.info is not None else 0,
        ))
        try:
            async with asyncio.timeout(self.settings.load_timeout_s):
                answer = await worker.control.get()
        except TimeoutError:
            await worker.stop(grace_s=0)
            raise ModelUnavailable(
                f"{entry.path}: loading took longer than {self.settings.load_timeout_s:g} s"
            ) from None
        if isinstance(answer, p.Loaded):
            worker.loaded = answer
            return worker
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
            await worker.stop()

    async def _reap_idle(self) -> None:
        period = max(0.05, min(self.settings.idle_unload_s / 4, 5.0))
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for model in self._models.values():
                if (model.worker is not None and model.in_flight == 0 and model.queued == 0
                        and model.loading is None
                        and now - model.last_used >= self.settings.idle_unload_s):
                    async with self._load_lock:
                        if model.in_flight == 0 and model.loading is None:
                            await self._unload(model)


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
        return WorkerCrashed(f"local model '{name}' worker stopped ({await _how(worker)})")
    return WorkerCrashed(f"local model '{name}' answered out of order ({type(msg).__name__})")


def _mib(n: int) -> int:
    return (n + (1 << 20) - 1) >> 20
