"""Relaying a committed stream: provider frames in, :mod:`sidecar.gateway.events` out.

:func:`relay` is the one place a stream's end is decided: its frames are relayed (redacted)
until the provider's iterator ends (:class:`~sidecar.gateway.events.Ended`, after the cost
is recorded) or something breaks it (:class:`~sidecar.gateway.events.Failed`): the request
deadline, the shutdown :class:`Cut`, an upstream error, or the ledger. Errors become events
here, once; the front ends only render them.

Concurrency: one event loop. :class:`Cut` is shared by every stream of a gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Awaitable, Callable

from sidecar.errors import DeadlineExceeded, SidecarError, Unavailable, UpstreamError
from sidecar.gateway.events import Ended, Failed, Relayed, StreamEvent
from sidecar.redact import Redactor
from sidecar.types import Meter


def shut_down() -> Unavailable:
    """The error of a call that :meth:`Cut.cut` ended."""
    return Unavailable("The sidecar shut down before the answer was complete.",
                       retry_after_s=1.0)


class _Stopped(Exception):
    """:meth:`Cut.cut` ended a stream."""


class Cut:
    """The end of the shutdown grace, shared by every call of one gateway: once
    :meth:`cut`, every relay waiting for its next frame stops at once, and every other one
    before its next frame. Must be used on one event loop."""

    __slots__ = ("_event", "_waiting")

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self._waiting: set[asyncio.Timeout] = set()
        """The deadlines of relays waiting for their next frame."""

    @property
    def done(self) -> bool:
        """Whether :meth:`cut` was called."""
        return self._event.is_set()

    async def wait(self) -> None:
        """Return once :meth:`cut` was called (at once if it was)."""
        await self._event.wait()

    def cut(self) -> None:
        """Stop every relay (idempotent)."""
        self._event.set()
        now = asyncio.get_running_loop().time()
        for scope in list(self._waiting):
            scope.reschedule(now)

    async def next_frame(self, frames: AsyncGenerator[bytes, None], deadline: float
                         ) -> bytes | None:
        """The next frame (None at the end). Raises TimeoutError at ``deadline`` (loop
        time) and :class:`_Stopped` once :meth:`cut` was called."""
        if self._event.is_set():
            raise _Stopped
        try:
            async with asyncio.timeout_at(deadline) as scope:
                self._waiting.add(scope)
                try:
                    return await anext(frames, None)
                finally:
                    self._waiting.discard(scope)
        except TimeoutError:
            if self._event.is_set():
                raise _Stopped from None
            raise


async def relay(
    first: bytes,
    frames: AsyncGenerator[bytes, None],
    *,
    deadline: float,
    cut: Cut,
    meter: Meter,
    redact: Redactor,
    settle: Callable[[], Awaitable[int | None]],
    upstream_failed: Callable[[UpstreamError], Awaitable[None]],
    finished: Callable[[bool], None],
) -> AsyncGenerator[StreamEvent, None]:
    """Relay ``first`` then ``frames`` as :class:`Relayed` events and end with one
    :class:`Ended` or :class:`Failed` (the contract of :mod:`sidecar.gateway.events`).

    ``settle`` records the stream's cost from ``meter`` and returns it (µ$, None when the
    price is unknown); it is awaited once, shielded, before :class:`Ended`, or, when the
    stream failed or its consumer closed it early, as soon as it ends (its errors then
    ignored). ``upstream_failed`` hears of an upstream error mid-stream; ``finished(completed)``
    is called once at the end, whatever it is. Closing the generator closes ``frames``."""
    settled = completed = False

    async def settled_cost() -> int | None:
        nonlocal settled
        settled = True
        return await asyncio.shield(settle())

    def relayed(frame: bytes) -> Relayed:
        return Relayed(redact.data(frame) if redact else frame)

    try:
        yield relayed(first)
        while True:
            frame = await cut.next_frame(frames, deadline)
            if frame is None:
                break
            yield relayed(frame)
        completed = True
        cost = await settled_cost()
        yield Ended(meter.usage, cost)
    except TimeoutError:
        yield Failed(redact.error(DeadlineExceeded("The request deadline passed mid-stream.")))
    except _Stopped:
        yield Failed(redact.error(shut_down()))
    except UpstreamError as e:
        await upstream_failed(e)
        yield Failed(redact.error(e))
    except SidecarError as e:  # the cost could not be recorded
        yield Failed(redact.error(e))
    finally:
        finished(completed)
        await frames.aclose()
        if not settled:
            with contextlib.suppress(SidecarError):
                await settled_cost()
