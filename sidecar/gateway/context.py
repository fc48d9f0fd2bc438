"""What a front end tells the gateway about one request besides its body."""

from __future__ import annotations

import msgspec

from sidecar.cache import Directive


class Context(msgspec.Struct):
    """Per-request facts from the front end. ``deadline`` is in ``loop.time()`` seconds;
    ``identity`` is the client key's name from :meth:`Gateway.authenticate`."""

    request_id: str
    deadline: float
    identity: str | None = None
    cache: Directive = "default"
    """The client's word on the response cache (:func:`sidecar.cache.directive_of`)."""
