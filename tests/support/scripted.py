"""A scripted in-process Provider: real code of the Provider protocol, answers chosen per call.

:class:`ScriptedProvider` implements :class:`sidecar.providers.base.Provider` with no I/O,
so the gateway pipeline can be driven through failover, retries, circuits and deadlines in
milliseconds. Each call takes the next step of its model's script (then the model's
default, then :class:`Answer`)::

    Answer(text, frames, prompt_tokens, completion_tokens)  a reply with that usage; a
                                                            stream of ``frames`` content
                                                            chunks and a finish chunk, the
                                                            usage left in the meter
    Fail(error_class, retry_after_s=..., status=...)        raise a fresh UpstreamError of
                                                            that class (streams: at the first
                                                            frame, as real providers do)
    Hang(after_frames=0)                                    wait until cancelled (streams:
                                                            after that many content chunks)
    FailAfter(frames, error_class, ...)                     streams: that many content
                                                            chunks, then the error;
                                                            send: the error

Every call is recorded (:attr:`ScriptedProvider.calls`) with how it ended: ``ok``,
``error``, ``cancelled`` (the caller's task was cancelled) or ``closed`` (a stream the
caller closed before its end). :meth:`ScriptedProvider.wait_for` waits for a number of
calls to have started, so a test can act while a call hangs without sleeping.

Not thread-safe: one event loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections import deque
from collections.abc import AsyncGenerator, Iterable
from typing import Any

from sidecar.errors import UpstreamError, UpstreamRejected, rejected
from sidecar.providers.base import Reply
from sidecar.types import Call, Meter, Op, Usage


@dataclasses.dataclass(frozen=True)
class Answer:
    """Answer normally: ``text`` in one reply, or split over ``frames`` content chunks."""

    text: str = "Hello from scripted"
    frames: int = 3
    prompt_tokens: int = 3
    completion_tokens: int = 2


@dataclasses.dataclass(frozen=True)
class Fail:
    """Raise ``error`` (a class) for this call: built fresh, with the call's target."""

    error: type[UpstreamError]
    retry_after_s: float | None = None
    status: int | None = None
    """For :class:`~sidecar.errors.UpstreamRejected`: the provider's 4xx (default 400)."""


@dataclasses.dataclass(frozen=True)
class Hang:
    """Wait until cancelled or closed; streams first send ``after_frames`` content chunks."""

    after_frames: int = 0


@dataclasses.dataclass(frozen=True)
class FailAfter:
    """Streams: ``frames`` content chunks, then raise ``error``; non-stream: raise it."""

    frames: int
    error: type[UpstreamError]
    retry_after_s: float | None = None


Step = Answer | Fail | Hang | FailAfter


@dataclasses.dataclass
class Record:
    """One call as the provider saw it. ``outcome`` is None while it runs."""

    model: str
    op: Op
    stream: bool
    timeout_s: float
    call: Call
    step: Step
    outcome: str | None = None
    frames_sent: int = 0


class ScriptedProvider:
    """A Provider named ``name`` serving ``ops`` (default: all), answering from scripts."""

    native_messages = False

    def __init__(self, name: str, ops: Iterable[Op] = tuple(Op)) -> None:
        self.name = name
        self._ops = frozenset(ops)
        self._scripts: dict[str, deque[Step]] = {}
        self._defaults: dict[str, Step] = {}
        self.calls: list[Record] = []
        self.closed = False
        self._changed = asyncio.Event()

    # --- scripting and observing ---------------------------------------------------------

    def script(self, model: str, *steps: Step) -> None:
        """Append ``steps`` to ``model``'s queue."""
        self._scripts.setdefault(model, deque()).extend(steps)

    def default(self, model: str, step: Step) -> None:
        """What ``model`` does once its queue is empty (instead of :class:`Answer`)."""
        self._defaults[model] = step

    def calls_to(self, model: str) -> list[Record]:
        return [r for r in self.calls if r.model == model]

    async def wait_for(self, n: int, *, ended: bool = False) -> list[Record]:
        """Wait until ``n`` calls have started (``ended``: and ended); returns the calls."""
        while True:
            done = [r for r in self.calls if not ended or r.outcome is not None]
            if len(done) >= n:
                return self.calls
            self._changed.clear()
            await self._changed.wait()

    def _note(self) -> None:
        self._changed.set()

    def _next(self, model: str) -> Step:
        queue = self._scripts.get(model)
        if queue:
            return queue.popleft()
        return self._defaults.get(model, Answer())

    def _error(self, step: Fail | FailAfter, target: str) -> UpstreamError:
        message = f"{target}: scripted {step.error.__name__}"
        if issubclass(step.error, UpstreamRejected):
            status = step.status if isinstance(step, Fail) and step.status else 400
            return rejected(status, message, target=target)
        return step.error(message, target=target, retry_after_s=step.retry_after_s)

    # --- the Provider protocol -----------------------------------------------------------

    def supports(self, op: Op) -> bool:
        return op in self._ops

    async def send(self, call: Call, model: str, timeout_s: float,
                   meter: Meter | None = None) -> Reply:
        step = self._next(model)
        rec = Record(model, call.op, False, timeout_s, call, step)
        self.calls.append(rec)
        self._note()
        target = f"{self.name}/{model}"
        try:
            if isinstance(step, Fail | FailAfter):
                raise self._error(step, target)
            if isinstance(step, Hang):
                await asyncio.get_running_loop().create_future()
            assert isinstance(step, Answer)
            usage = _usage(step)
            body = {"id": "chatcmpl-scripted", "object": "chat.completion", "created": 0,
                    "model": model,
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": step.text}}],
                    "usage": {"prompt_tokens": usage.prompt_tokens,
                              "completion_tokens": usage.completion_tokens,
                              "total_tokens": usage.total_tokens}}
            rec.outcome = "ok"
            return Reply(json.dumps(body).encode(), usage)
        except asyncio.CancelledError:
            rec.outcome = "cancelled"
            raise
        except UpstreamError:
            rec.outcome = "error"
            raise
        finally:
            self._note()

    async def stream(self, call: Call, model: str, timeout_s: float,
                     meter: Meter | None = None) -> AsyncGenerator[bytes, None]:
        step = self._next(model)
        rec = Record(model, call.op, True, timeout_s, call, step)
        self.calls.append(rec)
        self._note()
        target = f"{self.name}/{model}"
        meter = meter if meter is not None else Meter()
        text = step.text if isinstance(step, Answer) else "partial answer "
        try:
            if isinstance(step, Fail):
                raise self._error(step, target)
            n = (step.frames if isinstance(step, Answer | FailAfter)
                 else step.after_frames)
            for piece in _split(text, n):
                rec.frames_sent += 1
                meter.content_chunks += 1
                meter.content_chars += len(piece)
                yield _chunk(model, {"content": piece})
            if isinstance(step, FailAfter):
                raise self._error(step, target)
            if isinstance(step, Hang):
                await asyncio.get_running_loop().create_future()
            assert isinstance(step, Answer)
            usage = _usage(step)
            meter.usage = usage
            yield _chunk(model, {}, "stop")
            rec.outcome = "ok"
        except asyncio.CancelledError:
            rec.outcome = "cancelled"
            raise
        except GeneratorExit:
            rec.outcome = "closed"
            raise
        except UpstreamError:
            rec.outcome = "error"
            raise
        finally:
            self._note()

    async def aclose(self) -> None:
        self.closed = True


def _usage(step: Answer) -> Usage:
    return Usage(step.prompt_tokens, step.completion_tokens,
                 step.prompt_tokens + step.completion_tokens)


def _split(text: str, n: int) -> list[str]:
    if n <= 0:
        return []
    size = max(1, -(-len(text) // n))
    pieces = [text[i:i + size] for i in range(0, len(text), size)][:n]
    return pieces + ["."] * (n - len(pieces))


def _chunk(model: str, delta: dict[str, Any], finish: str | None = None) -> bytes:
    obj = {"id": "chatcmpl-scripted", "object": "chat.completion.chunk", "created": 0,
           "model": model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return b"data: " + json.dumps(obj).encode() + b"\n\n"
