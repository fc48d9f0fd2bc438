"""Routing: which targets may serve a model name, and in what order one request tries them.

- :mod:`~sidecar.routing.routes`: :class:`Router` resolves a model name to a :class:`Route`
  (a configured route, a local model, or a direct ``provider/model`` :class:`Target`).
- :mod:`~sidecar.routing.strategies`: the route strategies (priority, weighted, least-busy,
  latency, cost; pure) and :class:`TargetTracker`, the measurements feeding them.
- :mod:`~sidecar.routing.cascade`: the confidence cascade's pure decisions (ask for
  log-probabilities, read an answer, judge it: :class:`Verdict`), with
  :mod:`~sidecar.routing.schema_check` for ``response_format`` schemas.
- :mod:`~sidecar.routing.planner`: :func:`plan`, the one pure decision of a request's
  order (strategy, preference, offload under host pressure, local deadlines), as a
  :class:`Plan` the gateway walks.
"""

from sidecar.routing import cascade
from sidecar.routing.planner import CALM, Plan, Step, TooSlow, local_eta_s, plan, too_slow
from sidecar.routing.routes import Route, Router, Target
from sidecar.routing.strategies import TargetStats, TargetTracker, by_strategy

__all__ = [
    "CALM",
    "Plan",
    "Route",
    "Router",
    "Step",
    "Target",
    "TargetStats",
    "TargetTracker",
    "TooSlow",
    "by_strategy",
    "cascade",
    "local_eta_s",
    "plan",
    "too_slow",
]
