"""One worker process seen from the gateway: spawn, the load handshake, the frame channel,
and how its death reaches the requests in it.

Contract:

* :func:`start` spawns ``argv`` in its own session (a Ctrl-C in the terminal reaches the
  gateway only) with pipes for stdin, stdout and stderr, and returns a :class:`Worker`. Its
  reader task decodes the 4-byte length + msgpack frames of :mod:`local_models.protocol`
  from stdout: answers carrying a request id go to that request's queue in
  :attr:`Worker.streams`, stamped with their arrival time (``time.monotonic``: speed is the
  worker's, not the consumer's); the others go to :attr:`Worker.control`. Frames for a
  request id nobody waits for are dropped. Stderr lines are relayed to ours with a
  ``[local <name>]`` prefix, the last 20 kept for load errors.
* The end of stdout (exit, crash, a frame over ``MAX_FRAME`` or that does not decode) is the
  worker's death: :attr:`Worker.alive` turns False, ``None`` is put on the control queue and
  on every request queue (so no request hangs), and ``on_exit`` is called once, on the loop.
* :meth:`Worker.handshake` sends ``Load`` and returns ``Loaded``, or stops the worker and
  raises :class:`~local_models.errors.ModelUnavailable` naming the file and why (the
  worker's own message, a timeout, or how it ended with the last line of its stderr).
* :meth:`Worker.failure` turns an unexpected answer into the error for the request: one
  death is one event, so the first request to see it gets
  :class:`~local_models.errors.WorkerCrashed` and the others
  :class:`~local_models.errors.WorkerLost`.
* :meth:`Worker.send` never raises: a frame for a dead worker is dropped.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import signal
import sys
import time
from collections.abc import Callable, Sequence

import msgspec
import psutil

from local_models import protocol as p
from local_models.errors import (
    InvalidRequest,
    LocalError,
    ModelUnavailable,
    WorkerCrashed,
    WorkerLost,
)

__all__ = ["Answer", "Worker", "rss", "start", "unpack"]

Answer = tuple[float, p.FromWorker]
"""A worker's answer and when it arrived (``time.monotonic``)."""


async def start(name: str, argv: Sequence[str],
                on_exit: Callable[[Worker], None] | None = None) -> Worker:
    """Spawn a worker for model ``name``; ``on_exit`` is called once when it dies."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,  # a Ctrl-C in the terminal reaches the gateway only
    )
    return Worker(name, proc, on_exit)


class Worker:
    """A running worker process and the per-request queues of its answers."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process,
                 on_exit: Callable[[Worker], None] | None = None) -> None:
        self.name = name
        self.proc = proc
        self.loaded: p.Loaded | None = None
        self.streams: dict[int, asyncio.Queue[Answer | None]] = {}
        self.control: asyncio.Queue[p.FromWorker | None] = asyncio.Queue()
        self.alive = True
        self.death_reported = False
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=20)
        self._on_exit = on_exit
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

    async def handshake(self, load: p.Load, timeout_s: float) -> p.Loaded:
        """Send ``load`` and wait up to ``timeout_s`` for ``Loaded`` (kept in
        :attr:`loaded`); on anything else stop the worker and raise ModelUnavailable."""
        self.send(load)
        try:
            async with asyncio.timeout(timeout_s):
                answer = await self.control.get()
        except TimeoutError:
            await self.stop(grace_s=0)
            raise ModelUnavailable(
                f"{load.path}: loading took longer than {timeout_s:g} s"
            ) from None
        if isinstance(answer, p.Loaded):
            self.loaded = answer
            return answer
        await self.stop(grace_s=1.0)
        if isinstance(answer, p.LoadFailed):
            raise ModelUnavailable(answer.message)
        detail = next((line for line in reversed(self.stderr_tail) if line.strip()), "")
        raise ModelUnavailable(
            f"{load.path}: the worker stopped while loading ({await self.how()})"
            + (f": {detail}" if detail else "")
        )

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
            if self._on_exit is not None:
                self._on_exit(self)

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

    async def how(self) -> str:
        """How the worker ended, waiting at most 5 s for it to."""
        try:
            return await asyncio.wait_for(self.death(), 5.0)
        except TimeoutError:
            return "not answering"

    async def stop(self, grace_s: float = 5.0) -> None:
        """Ask the worker to shut down, kill it after ``grace_s``, and wait for it."""
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

    async def failure(self, msg: p.FromWorker | None) -> LocalError:
        """The error for an answer that is not the expected one (None: the worker died)."""
        if isinstance(msg, p.Failed):
            if msg.kind == "invalid":
                return InvalidRequest(msg.message)
            return WorkerCrashed(f"local model '{self.name}': {msg.message}")
        if msg is None:
            how = await self.how()
            if self.death_reported:
                return WorkerLost(f"local model '{self.name}' worker stopped ({how})")
            self.death_reported = True
            return WorkerCrashed(f"local model '{self.name}' worker stopped ({how})")
        return WorkerCrashed(
            f"local model '{self.name}' answered out of order ({type(msg).__name__})")


def unpack(answer: Answer | None) -> tuple[float, p.FromWorker | None]:
    """An answer and its arrival time; None (the worker died) arrives now."""
    return answer if answer is not None else (time.monotonic(), None)


def rss(pid: int) -> int:
    """Resident bytes of ``pid`` that its exit returns (not the file-backed pages of the
    mapped model, which available memory already counts as reclaimable); 0 when it is gone."""
    try:
        info = psutil.Process(pid).memory_info()
    except psutil.Error:
        return 0
    return int(info.rss - getattr(info, "shared", 0))
