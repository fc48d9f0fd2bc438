"""Whether a request may be answered from the response cache, and under which key (pure).

* **The client's word** (:func:`directive_of`, from headers or gRPC metadata):
  ``x-sidecar-cache: off`` or ``cache-control: no-store`` neither reads nor writes the cache;
  ``x-sidecar-cache: refresh`` or ``cache-control: no-cache`` skips the read and stores the
  new answer. Any other ``x-sidecar-cache`` value is refused (400, naming the header).
* **The route's** (:func:`plan`): only routes with ``cache = true``; only deterministic
  requests (temperature 0, a seed, or embeddings) unless the route caches sampled ones too.
* **The key** (:func:`cache_key`): a SHA-256 over the route, its targets (a reload that
  changes them starts afresh), the client key's name (one client never sees another's
  answers), the operation, and the request as sent with its keys sorted, minus fields that
  do not change the answer (``user``, ``metadata``, ``store``, ``service_tier``), plus the
  client's Anthropic Messages body when it came as one (its answer is in that format).
  ``stream`` is part of it: a stream is replayed from a stream, a body from a body.
* **By meaning** (a route with ``cache_semantic``): chat questions are also indexed, and
  looked up, by their embeddings (:mod:`sidecar.cache.semantic` decides what matches).
"""

from __future__ import annotations

from collections.abc import Mapping
from hashlib import sha256
from typing import Any, Literal

import msgspec

from sidecar.cache.semantic import Question, question_of
from sidecar.config import Pooling
from sidecar.errors import InvalidRequest
from sidecar.routing import Route
from sidecar.types import Call, EmbeddingRequest

Directive = Literal["default", "no-store", "no-cache"]
"""default: read and write; no-store: neither; no-cache: write only (a fresh answer)."""

Result = Literal["hit", "miss", "bypass"]
"""What ``x-sidecar-cache`` tells the client: answered from the cache, answered and stored
(or stored when it ends well), or the cache was not used for it."""

_HEADER_VALUES: dict[str, Directive] = {
    "on": "default", "off": "no-store", "refresh": "no-cache"}
_IGNORED = frozenset({"user", "metadata", "store", "service_tier"})
_VERSION = b"sidecar-cache-1\0"


def directive_of(meta: Mapping[str, str]) -> Directive:
    """The client's cache directive from ``x-sidecar-cache`` (``on`` | ``off`` | ``refresh``)
    or, when that is absent, ``cache-control`` (``no-store`` | ``no-cache``; other
    directives are ignored). Raises :class:`InvalidRequest` for another
    ``x-sidecar-cache`` value."""
    given = meta.get("x-sidecar-cache")
    if given is not None:
        found = _HEADER_VALUES.get(given.strip().lower())
        if found is None:
            raise InvalidRequest("x-sidecar-cache must be 'on', 'off' or 'refresh'.",
                                 param="x-sidecar-cache")
        return found
    control = meta.get("cache-control")
    if control:
        tokens = {t.strip().lower().partition("=")[0] for t in control.split(",")}
        if "no-store" in tokens:
            return "no-store"
        if "no-cache" in tokens:
            return "no-cache"
    return "default"


class SemanticPlan(msgspec.Struct, frozen=True):
    """How a request is also looked up by meaning (:mod:`sidecar.cache.semantic`)."""

    question: Question
    model: str
    """The local model that embeds it."""
    min_similarity: float
    timeout_s: float
    pooling: Pooling = "last"


class CachePlan(msgspec.Struct, frozen=True):
    """What to do with the cache for one request."""

    key: str
    read: bool
    write: bool
    ttl_s: float
    semantic: SemanticPlan | None = None
    """Set on a route with ``cache_semantic`` when the request asks a question it takes."""


def deterministic(call: Call) -> bool:
    """Whether ``call`` asks for the same answer every time: embeddings, temperature 0,
    or a seed (greedy or seeded sampling)."""
    request = call.request
    if isinstance(request, EmbeddingRequest):
        return True
    return request.temperature == 0 or request.seed is not None


def plan(call: Call, route: Route, identity: str | None, directive: Directive
         ) -> CachePlan | None:
    """The cache plan of ``call`` on ``route``, or None when the cache is not used for it
    (the route has none, the client said ``no-store``, or the request is sampled on a route
    that caches only deterministic ones). Never raises."""
    ttl_s = route.cache_ttl_s
    if ttl_s is None or directive == "no-store":
        return None
    if not route.cache_nondeterministic and not deterministic(call):
        return None
    semantic = None
    settings = route.cache_semantic
    if settings is not None:
        question = question_of(call, route.model, [t.key for t in route.targets], identity,
                               settings.model)
        if question is not None:
            semantic = SemanticPlan(question, settings.model, settings.min_similarity,
                                    settings.timeout_s, settings.pooling)
    return CachePlan(cache_key(call, route, identity), read=directive == "default",
                     write=True, ttl_s=ttl_s, semantic=semantic)


_encode = msgspec.json.Encoder(order="sorted").encode


def cache_key(call: Call, route: Route, identity: str | None) -> str:
    """The hex key of ``call``'s answer (see the module docstring for what it covers)."""
    body: dict[str, Any] = {k: v for k, v in call.raw.items() if k not in _IGNORED}
    body.pop("model", None)
    h = sha256(_VERSION)
    h.update(_encode([route.model, [t.key for t in route.targets], identity,
                      call.op.value, body, call.messages]))
    return h.hexdigest()
