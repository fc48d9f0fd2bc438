"""What a committed stream yields to the front ends: typed events, not wire text.

Contract of :attr:`~sidecar.gateway.Streaming.events`, in this order:

    Relayed+  then exactly one of  Ended | Failed

* :class:`Relayed`: provider frames as the provider yields them (``data: {...}\\n\\n``
  events, several per network read), secrets redacted; HTTP writes them as they are.
* :class:`Ended`: the stream finished; its cost is recorded by the time this arrives.
* :class:`Failed`: the stream broke after it was committed (upstream failure, deadline,
  shutdown cut, ledger failure); what was relayed stays relayed. The error is redacted and is
  the one error the front end reports: it translates it once (HTTP: an error event in
  OpenAI's envelope; gRPC: the call's status).

Nothing follows the last event. A front end that stops early closes the iterator, which
closes the upstream and records what was used.
"""

from __future__ import annotations

import msgspec

from sidecar.errors import SidecarError
from sidecar.types import Usage


class Relayed(msgspec.Struct, frozen=True):
    """One batch of the provider's SSE frames: whole ``data: ...\\n\\n`` events."""

    frame: bytes


class Ended(msgspec.Struct, frozen=True):
    """The stream ended well: the usage the provider reported (None when it reported none)
    and the cost in µ$ that was recorded (None when the target's price is unknown)."""

    usage: Usage | None
    cost: int | None


class Failed(msgspec.Struct, frozen=True):
    """The stream ended with ``error`` (already redacted)."""

    error: SidecarError


StreamEvent = Relayed | Ended | Failed
"""One event of a stream (see the module docstring for their order)."""
