"""Routes: which targets may serve a model name.

:class:`Router` resolves the ``model`` a client sends: a configured route by name, or a
direct ``provider/model`` target. A :class:`Route` lists its targets and how to order them
(``strategy``, ``prefer``); the order for one request is decided by
:func:`sidecar.routing.planner.plan`. This module imports nothing else of the routing
package, so the strategies and the planner can import it without a cycle.
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec

from sidecar.config import LOCAL_PROVIDER, CascadeConfig, Config, SemanticCacheConfig, Strategy
from sidecar.errors import ModelNotFound


class Target(msgspec.Struct, frozen=True):
    provider: str
    model: str
    weight: float = 1.0

    @property
    def key(self) -> str:
        return f"{self.provider}/{self.model}"


class Route(msgspec.Struct, frozen=True):
    model: str
    strategy: Strategy
    targets: tuple[Target, ...]
    retries: int
    prefer: str | None = None
    cache_ttl_s: float | None = None
    """Answers are cached for this long (None: this route is not cached)."""
    cache_nondeterministic: bool = False
    """Sampled requests are cached too (see ``RouteConfig.cache_nondeterministic``)."""
    cascade: CascadeConfig | None = None
    """Set exactly when ``strategy`` is ``cascade``: its thresholds."""
    cache_semantic: SemanticCacheConfig | None = None
    """Set when cached answers are also found by meaning (``RouteConfig.cache_semantic``)."""


class Router:
    """Resolves model names to routes. Immutable after construction; safe to share."""

    def __init__(self, config: Config, providers: Iterable[str],
                 local_models: Iterable[str] = ()) -> None:
        """``providers``: remote provider names; ``local_models``: the local models' names,
        each also served as a route of its own unless a configured route has that name."""
        self._retries = config.routing.retries
        self._providers = frozenset(providers) - {LOCAL_PROVIDER}
        self._local = frozenset(local_models)
        self._routes = {
            r.model: Route(
                r.model,
                r.strategy,
                tuple(Target(t.provider, t.model, t.weight) for t in r.targets),
                self._retries if r.retries is None else r.retries,
                r.prefer,
                (r.cache_ttl_s or config.cache.ttl_s) if r.cache else None,
                r.cache_nondeterministic,
                (r.cascade or CascadeConfig()) if r.strategy == "cascade" else None,
                r.cache_semantic if r.cache else None,
            )
            for r in config.routes
        }
        for name in sorted(self._local - self._routes.keys()):
            self._routes[name] = Route(name, "priority", (Target(LOCAL_PROVIDER, name),),
                                       self._retries)

    def _direct(self, provider: str, model: str) -> Route:
        return Route(f"{provider}/{model}", "priority", (Target(provider, model),),
                     self._retries)

    @property
    def routes(self) -> tuple[Route, ...]:
        return tuple(self._routes.values())

    def resolve(self, model: str) -> Route:
        """The route for ``model``; raises :class:`ModelNotFound`."""
        route = self._routes.get(model)
        if route is not None:
            return route
        provider, sep, upstream = model.partition("/")
        if sep and upstream and (
            provider in self._providers or (provider == LOCAL_PROVIDER and upstream in self._local)
        ):
            return self._direct(provider, upstream)
        raise ModelNotFound(
            f"The model '{model}' does not exist: it is neither a configured route, "
            "a local model, nor 'provider/model' with a configured provider.",
            param="model",
        )

