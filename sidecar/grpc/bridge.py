"""The asyncio servicer served by grpc's sync server: a call's handler runs in one of the
server's pool threads and hands the servicer's coroutine to the gateway's event loop.

Why: grpc.aio shares the event loop with the gateway; its completion queue is polled by a
helper thread that wakes the loop about eight times per call, and the gateway's work on that
loop measured about 460 µs per call slower than the same work behind HTTP (docs/benchmarks.md,
gRPC). With the sync server grpc's own work (HTTP/2, completion queue, (de)serialising)
runs in its threads, and the loop is woken once per unary call (the coroutine handed to it)
and once when it finishes.

:func:`bridged` turns a grpc.aio method handler of :class:`~sidecar.grpc.servicer.SidecarServicer`
(an ``async def`` that returns the answer, or writes a stream with ``context.write``) into a
sync one; the servicer is unchanged, and keeps running on the loop. Its context is a
:class:`BridgedContext`: the part of ``grpc.aio.ServicerContext`` the servicer uses, over the
sync call's context.

* **Unary**: the pool thread hands the coroutine to the loop (:class:`_UnaryCall`: a task
  started with ``call_soon_threadsafe``) and waits for its result, which grpc then serialises
  and sends with the status.
* **Server streaming**: the coroutine's ``send_initial_metadata`` and ``write`` put the
  metadata and messages on a queue that the pool thread's response iterator takes them from;
  each ``write`` returns once grpc has sent its message (as grpc.aio's does), so a client that
  does not read holds the stream's upstream back instead of filling memory.
* **Errors**: ``abort`` raises :class:`Aborted` in the coroutine (as grpc.aio's does: the
  servicer's ``finally`` runs); the pool thread then ends the call with its code, message and
  trailing metadata.
* **Cancellation**: when a call ends for any reason (client cancel, its deadline, the server's
  stop), grpc runs the call's callbacks; :func:`bridged` registers one that cancels the
  coroutine's task on the loop, which cancels the gateway call (its upstream request or local
  generation), and wakes a stream's thread.

Each call holds one pool thread for as long as it runs (a unary call while the gateway works
on it, a stream until its last message is sent); :class:`~sidecar.grpc.server.GrpcServer`
bounds the calls to the pool's size, so that a call beyond it is refused at once rather than
queued behind stalled ones.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import grpc

Metadata = tuple[tuple[str, str | bytes], ...]
AioBehavior = Callable[[Any, Any], Coroutine[Any, Any, Any]]


class Aborted(Exception):
    """Raised by :meth:`BridgedContext.abort` in the servicer's coroutine: the status that
    ends the call."""

    def __init__(self, code: grpc.StatusCode, details: str, trailing: Metadata) -> None:
        super().__init__(details)
        self.code, self.details, self.trailing = code, details, trailing


_END = object()
"""On a stream's queue: nothing more comes (the coroutine finished, or the call ended)."""


class _InitialMetadata:
    __slots__ = ("metadata",)

    def __init__(self, metadata: Metadata) -> None:
        self.metadata = metadata


class _Message:
    __slots__ = ("message", "sent")

    def __init__(self, message: Any, sent: asyncio.Future[None]) -> None:
        self.message, self.sent = message, sent


class BridgedContext:
    """What :class:`~sidecar.grpc.servicer.SidecarServicer` uses of a
    ``grpc.aio.ServicerContext``, over a sync server call's context. Used on the event loop
    (the servicer's coroutine); ``items`` is the stream's queue (None for unary calls)."""

    __slots__ = ("_context", "_items", "_loop")

    def __init__(self, context: grpc.ServicerContext, loop: asyncio.AbstractEventLoop,
                 items: queue.SimpleQueue[object] | None = None) -> None:
        self._context = context
        self._loop = loop
        self._items = items

    def invocation_metadata(self) -> Any:
        return self._context.invocation_metadata()

    def time_remaining(self) -> float | None:
        return self._context.time_remaining()

    def set_trailing_metadata(self, trailing_metadata: Metadata) -> None:
        self._context.set_trailing_metadata(trailing_metadata)

    async def send_initial_metadata(self, initial_metadata: Metadata) -> None:
        if self._items is None:
            raise RuntimeError("initial metadata is only sent on its own by streams")
        self._items.put(_InitialMetadata(initial_metadata))

    async def write(self, message: Any) -> None:
        """Returns once grpc has sent ``message`` (the pool thread took it and grpc's write
        finished)."""
        if self._items is None:
            raise RuntimeError("write() is for streams")
        sent = self._loop.create_future()
        self._items.put(_Message(message, sent))
        await sent

    async def abort(self, code: grpc.StatusCode, details: str = "",
                    trailing_metadata: Metadata = ()) -> None:
        raise Aborted(code, details, trailing_metadata)


def _set_sent(sent: asyncio.Future[None]) -> None:
    if not sent.done():
        sent.set_result(None)


def _end_with(context: grpc.ServicerContext, aborted: Aborted) -> None:
    context.set_trailing_metadata(aborted.trailing)
    context.abort(aborted.code, aborted.details)  # raises


def bridged(handler: grpc.RpcMethodHandler[Any, Any], loop: asyncio.AbstractEventLoop
            ) -> grpc.RpcMethodHandler[Any, Any]:
    """The sync server's handler for ``handler``, a grpc.aio unary-unary or unary-stream
    handler whose behaviour is an ``async def``; its coroutines run on ``loop``."""
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            _unary(handler.unary_unary, loop),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            _stream(handler.unary_stream, loop),  # type: ignore[arg-type]
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)
    raise TypeError("only unary requests are bridged")


def _unary(behavior: AioBehavior, loop: asyncio.AbstractEventLoop
           ) -> Callable[[Any, grpc.ServicerContext], Any]:
    def unary(request: Any, context: grpc.ServicerContext) -> Any:
        call = _UnaryCall(loop, behavior(request, BridgedContext(context, loop)))
        if not context.add_callback(call.cancel):  # the call already ended
            call.cancel()
        try:
            return call.result()
        except Aborted as aborted:
            _end_with(context, aborted)
        except asyncio.CancelledError:
            # The call ended (cancelled, its deadline, the server's stop): grpc sends nothing.
            context.abort(grpc.StatusCode.CANCELLED, "The call was cancelled.")

    return unary


class _UnaryCall:
    """One unary call's coroutine, run as a task on ``loop``; :meth:`result` (the pool
    thread) waits for it. Lighter than ``asyncio.run_coroutine_threadsafe``: one lock, no
    concurrent future chained to the task."""

    __slots__ = ("_coro", "_done", "_error", "_loop", "_task", "_value")

    def __init__(self, loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any]
                 ) -> None:
        self._loop, self._coro = loop, coro
        self._task: asyncio.Task[Any] | None = None
        self._value: Any = None
        self._error: BaseException | None = None
        self._done = threading.Lock()
        self._done.acquire()  # released (on the loop) once the task is done
        loop.call_soon_threadsafe(self._start)

    def _start(self) -> None:
        self._task = self._loop.create_task(self._coro)
        self._task.add_done_callback(self._finish)

    def _finish(self, task: asyncio.Task[Any]) -> None:
        if task.cancelled():
            self._error = asyncio.CancelledError()
        elif (error := task.exception()) is not None:
            self._error = error
        else:
            self._value = task.result()
        self._done.release()

    def cancel(self) -> None:
        """From any thread: cancel the task (once it runs; a done one is left alone). The
        call's callbacks run it once the call ended."""
        self._loop.call_soon_threadsafe(self._cancel)

    def _cancel(self) -> None:  # after _start: call_soon_threadsafe keeps the order
        assert self._task is not None
        self._task.cancel()

    def result(self) -> Any:
        """Waits for the task; its result, or raises its exception (``CancelledError``
        when it was cancelled)."""
        self._done.acquire()
        if self._error is not None:
            raise self._error
        return self._value


def _stream(behavior: AioBehavior, loop: asyncio.AbstractEventLoop
            ) -> Callable[[Any, grpc.ServicerContext], Iterator[Any]]:
    def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        items: queue.SimpleQueue[object] = queue.SimpleQueue()

        async def run() -> None:
            try:
                await behavior(request, BridgedContext(context, loop, items))
            finally:
                items.put(_END)

        done = asyncio.run_coroutine_threadsafe(run(), loop)

        def ended() -> None:
            done.cancel()
            items.put(_END)  # also when the task is cancelled before it started

        if not context.add_callback(ended):
            ended()
        try:
            while (item := items.get()) is not _END:
                if isinstance(item, _InitialMetadata):
                    context.send_initial_metadata(item.metadata)
                    continue
                assert isinstance(item, _Message)
                yield item.message  # grpc sends it before it asks for the next one
                loop.call_soon_threadsafe(_set_sent, item.sent)
            done.result()
        except Aborted as aborted:
            _end_with(context, aborted)
        except concurrent.futures.CancelledError:
            return
        finally:
            # Closed early (grpc stopped asking: the call ended): stop the coroutine too.
            done.cancel()

    return stream
