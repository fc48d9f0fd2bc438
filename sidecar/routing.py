"""Routes: which targets may serve a model name, and in what order to try them.

:class:`Router` resolves the ``model`` a client sends: a configured route by name, or a
direct ``provider/model`` target. :func:`plan` orders a route's targets for one request; it is
a pure function of the route and a random source, and knows nothing about health (the
gateway skips unhealthy targets while it walks the plan, so a weighted route's healthy
targets share the load by weight and the rest serve as fallbacks).
"""

from __future__ import annotations

import random
from collections.abc import Iterable

import msgspec

from sidecar.config import Config, Strategy
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


class Router:
    """Resolves model names to routes. Immutable after construction; safe to share."""

    def __init__(self, config: Config, providers: Iterable[str]) -> None:
        self._retries = config.routing.retries
        self._providers = frozenset(providers)
        self._routes = {
            r.model: Route(
                r.model,
                r.strategy,
                tuple(Target(t.provider, t.model, t.weight) for t in r.targets),
                self._retries if r.retries is None else r.retries,
            )
            for r in config.routes
        }

    @property
    def routes(self) -> tuple[Route, ...]:
        return tuple(self._routes.values())

    def resolve(self, model: str) -> Route:
        """The route for ``model``; raises :class:`ModelNotFound`."""
        route = self._routes.get(model)
        if route is not None:
            return route
        provider, sep, upstream = model.partition("/")
        if sep and upstream and provider in self._providers:
            return Route(model, "priority", (Target(provider, upstream),), self._retries)
        raise ModelNotFound(
            f"The model '{model}' does not exist: it is neither a configured route nor "
            "'provider/model' with a configured provider.",
            param="model",
        )


def plan(route: Route, rng: random.Random) -> list[Target]:
    """The order in which to try ``route``'s targets for one request."""
    if route.strategy == "weighted" and len(route.targets) > 1:
        # Weighted sampling without replacement (Efraimidis-Spirakis): sort by u ** (1 / w).
        return sorted(route.targets, key=lambda t: rng.random() ** (1.0 / t.weight), reverse=True)
    return list(route.targets)
