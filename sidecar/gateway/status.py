"""What the gateway shows about itself: the model list, the status page, readiness, and
:class:`GatewayState` for collectors that read it at scrape time (metrics).

Pure: each function builds a plain, JSON-encodable value from snapshots the
:class:`~sidecar.gateway.Gateway` passes in (it encodes and redacts them).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import msgspec

from local_models import ModelStatus
from sidecar.health import CircuitView
from sidecar.host import HostWatch, Pressure, ResourceSnapshot
from sidecar.routing import Route, TargetTracker

_CLOSED = CircuitView("closed", 0, None)


class GatewayState(msgspec.Struct, frozen=True, kw_only=True):
    """What :meth:`~sidecar.gateway.Gateway.state` returns: copies taken now, which the
    gateway never changes afterwards."""

    draining: bool
    targets: frozenset[str]
    """Every configured ``provider/model`` target (of routes and local models); a circuit
    of any other key is a direct target the client named."""
    circuits: dict[str, CircuitView]
    """Every target's circuit that has been used, by ``provider/model`` (direct ones
    included)."""
    local_models: list[ModelStatus] | None
    """None: no local models are configured."""
    pressure: Pressure | None
    """None: no host watch."""
    host: ResourceSnapshot | None
    """The latest resource snapshot (None: no host watch, or it has not sampled yet)."""
    yielding: bool
    """Local workers run reniced/pinned now (host CPU pressure)."""


def model_ids(routes: Iterable[Route]) -> list[tuple[str, str]]:
    """(id, owned_by) of what clients may ask for: every route, then every
    ``provider/model`` target once."""
    routes = tuple(routes)
    out = [(r.model, "sidecar") for r in routes]
    seen = {r.model for r in routes}
    for t in (t for r in routes for t in r.targets):
        if t.key not in seen:
            seen.add(t.key)
            out.append((t.key, t.provider))
    return out


def status_document(
    *,
    draining: bool,
    host: HostWatch | None,
    routes: Iterable[Route],
    circuits: Mapping[str, CircuitView],
    tracker: TargetTracker,
    reasons: Mapping[str, int],
    local_models: list[ModelStatus] | None,
) -> dict[str, Any]:
    """``GET /v1/sidecar/status``: the host, its pressure, every route (its strategy,
    ``prefer`` and targets, in the configured order), every target's health and load
    (configured ones and any seen since), the local models (when there are any), and how
    many requests each route reason served."""
    routes = tuple(routes)
    stats = tracker.stats()
    configured = {t.key for r in routes for t in r.targets}
    targets = {
        key: {"circuit": circuits.get(key, _CLOSED), **msgspec.structs.asdict(tracker.get(key))}
        for key in sorted(configured | stats.keys() | circuits.keys())
    }
    body: dict[str, Any] = {
        "status": "draining" if draining else "ready",
        "pressure": None if host is None else {
            "cpu": host.pressure.cpu,
            "memory": host.pressure.memory,
            "changed_at_s_ago": None if host.pressure.changed_at is None
            else round(host.snapshot.taken_at - host.pressure.changed_at, 1),
            "workers_yielding": host.yielding,
            "settings": host.settings,
        },
        "host": None if host is None else host.snapshot,
        "routes": [
            {"model": r.model, "strategy": r.strategy, "prefer": r.prefer,
             "targets": [{"target": t.key, "weight": t.weight} for t in r.targets]}
            for r in routes
        ],
        "targets": targets,
        "route_reasons": dict(reasons),
    }
    if local_models is not None:
        body["local_models"] = local_models
    return body


def readiness_document(*, draining: bool, circuits: Mapping[str, CircuitView],
                       local_models: list[ModelStatus] | None) -> dict[str, Any]:
    """``GET /readyz``: ready or draining, every target's circuit, the local models."""
    body: dict[str, Any] = {
        "status": "draining" if draining else "ready",
        "targets": {k: msgspec.structs.asdict(v) for k, v in circuits.items()},
    }
    if local_models is not None:
        body["local_models"] = local_models
    return body
