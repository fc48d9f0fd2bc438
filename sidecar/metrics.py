"""Prometheus metrics of one gateway, for ``GET /metrics`` (text format 0.0.4).

:class:`Metrics` is built by the composition root (:mod:`sidecar.runtime`) and owns one
``prometheus_client`` :class:`~prometheus_client.CollectorRegistry`; nothing is registered
in the library's global registry and nothing happens at import. Two kinds of series:

* Request series, fed by :meth:`Metrics.observe`, a gateway observer that hears every
  request's :class:`~sidecar.gateway.Outcome` when it ends: OpenTelemetry's GenAI metrics
  in Prometheus' spelling (``gen_ai_client_token_usage``, and the server's request
  duration, time to first token and time per output token, in seconds), with the
  conventions' bucket boundaries, and the sidecar's own counters (``sidecar_requests_total``,
  route reasons, attempts, retries, rate-limit rejections, cost, cascade escalations).
* State series, read at scrape time through :meth:`~sidecar.gateway.Gateway.state` of the
  gateway given to :meth:`Metrics.watch`: circuits, local models (queue, slots, state,
  loads, unloads, crashes), host pressure, CPU and memory, GPUs when NVML sees one; and the
  budgets' current windows, read from the ledger by :meth:`Metrics.exposition` before it
  renders.

``docs/operations.md`` lists every series with its labels.

Labels are bounded: they hold only names from the config (routes, targets, providers, local
models, budgets, key names), fixed vocabularies (operations, route reasons, error codes of
:mod:`sidecar.errors`, states) and HTTP statuses; never a request id, a prompt or a model
name a client made up. A direct ``provider/model`` request (``Outcome.direct``) is labelled
``provider/*`` as route and target, and so is the circuit of a target that is not
configured; a request whose model did not resolve has route ``""``. Error codes that are not
the sidecar's own (an upstream's code relayed with its 4xx) are labelled ``other``.

The request series are plain counts kept here and turned into metric families at scrape
time (the library's custom-collector interface), rather than ``prometheus_client.Counter``
objects: those add a ``_created`` series to every counter and histogram (twice the series
to scrape and store) unless a process-wide switch is flipped, and take a lock per update.

Concurrency: everything but the writing of the text runs on the gateway's event loop.
:meth:`~Metrics.observe` is quick and never raises; a scrape copies every family at once
after its one await (the budgets), so concurrent scrapes never mix their budget views, and
writes the text from that copy in a worker thread (see :meth:`~Metrics.exposition`).
"""

from __future__ import annotations

import asyncio
import bisect
from collections.abc import Callable, Iterable, Iterator, Sequence

import msgspec
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from sidecar.errors import SidecarError
from sidecar.gateway import Gateway, GatewayState, Outcome
from sidecar.money import BudgetView

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""The media type of :meth:`Metrics.exposition` (Prometheus' text format)."""

#: OpenTelemetry's ``gen_ai.operation.name`` of each operation (``Op`` values).
_OPERATIONS = {"chat/completions": "chat", "completions": "text_completion",
               "embeddings": "embeddings"}

# Bucket boundaries advised by the OpenTelemetry GenAI metric conventions.
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304,
                 16777216, 67108864)
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48,
                    40.96, 81.92)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)

_CIRCUIT = {"closed": 0, "half_open": 1, "open": 2}
_GEN_AI = ("gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model")

Labels = tuple[str, ...]


class _BudgetList(msgspec.Struct):
    data: list[BudgetView]


_budgets_decoder = msgspec.json.Decoder(_BudgetList)


class _Counter:
    """Sums by label values, rendered as one counter family."""

    def __init__(self, name: str, documentation: str, labels: Sequence[str]) -> None:
        self.name, self.documentation, self.labels = name, documentation, tuple(labels)
        self.values: dict[Labels, float] = {}

    def inc(self, key: Labels, amount: float = 1.0) -> None:
        self.values[key] = self.values.get(key, 0.0) + amount

    def family(self) -> CounterMetricFamily:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labels)
        for key, value in self.values.items():
            family.add_metric(key, value)
        return family


class _Histogram:
    """Observations by label values in fixed buckets, rendered as one histogram family."""

    def __init__(self, name: str, documentation: str, labels: Sequence[str],
                 buckets: Sequence[float]) -> None:
        self.name, self.documentation, self.labels = name, documentation, tuple(labels)
        self.bounds = tuple(float(b) for b in buckets)
        go_float: Callable[[float], str] = floatToGoString  # the library leaves it untyped
        self._les = [go_float(b) for b in self.bounds]  # ``le`` as its own Histogram writes
        self.series: dict[Labels, tuple[list[int], list[float]]] = {}
        """Per label values: counts per bucket (not cumulative; the last is +Inf), and
        [sum]."""

    def observe(self, key: Labels, value: float) -> None:
        found = self.series.get(key)
        if found is None:
            found = self.series[key] = ([0] * (len(self.bounds) + 1), [0.0])
        counts, total = found
        counts[bisect.bisect_left(self.bounds, value)] += 1  # le: value <= bound
        total[0] += value

    def family(self) -> HistogramMetricFamily:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labels)
        for key, (counts, total) in self.series.items():
            buckets: list[tuple[str, float]] = []
            running = 0
            for le, n in zip(self._les, counts, strict=False):
                running += n
                buckets.append((le, running))
            buckets.append(("+Inf", running + counts[-1]))
            family.add_metric(key, buckets, total[0])
        return family


class _Collector(Collector):
    """The registry's one collector: request series, then the state read now."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return ()  # nothing to check at registration; names are fixed here

    def collect(self) -> Iterable[Metric]:
        return self._metrics.collect()


class _Families(Collector):
    """Metric families already built (a copy, safe to render in another thread)."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def describe(self) -> Iterable[Metric]:
        return ()

    def collect(self) -> Iterable[Metric]:
        return self._families


def _render(families: _Families, redact: Callable[[bytes], bytes] | None) -> bytes:
    text = generate_latest(families)
    return text if redact is None else redact(text)


class Metrics:
    """The metrics of one gateway (see the module doc). Use from its event loop."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self._gateway: Gateway | None = None
        self._budgets: list[BudgetView] = []
        self._codes = _error_codes()
        self._requests = _Counter(
            "sidecar_requests_total",
            "Requests that ended, by route, target that answered (\"\" when none did), "
            "operation and HTTP status (499: the client went away first).",
            ("route", "target", "operation", "status"))
        self._reasons = _Counter(
            "sidecar_route_reasons_total",
            "Requests by why they went where they did (primary, offload:*, fallback:*); a "
            "request with several reasons counts once in each.",
            ("route", "target", "reason"))
        self._attempts = _Counter(
            "sidecar_attempts_total", "Provider calls made, retries included.", ("route",))
        self._retries = _Counter(
            "sidecar_retries_total", "Provider calls that retried the same target.",
            ("route",))
        self._limited = _Counter(
            "sidecar_rate_limited_total",
            "Requests answered 429, by error code (rate_limit_exceeded: an inbound key or "
            "route limit, or every target rate limited; budget_exhausted: a budget is spent).",
            ("route", "code"))
        self._cost = _Counter(
            "sidecar_cost_microdollars_total",
            "Cost recorded for answered requests, in micro-dollars (1e-6 US dollars); free "
            "targets add 0, targets of unknown price nothing; a cascade's escalated answers "
            "count for the target that gave them.",
            ("route", "target"))
        self._cache = _Counter(
            "sidecar_cache_requests_total",
            "Requests on routes with the response cache, by result: hit (answered from it, "
            "no provider call, no cost), miss (answered and kept, or kept once its stream "
            "ends well) or bypass (not cacheable, or the client opted out).",
            ("route", "result"))
        self._escalations = _Counter(
            "sidecar_cascade_escalations_total",
            "Answers of a cascade route's step judged not good enough (billed, and the next "
            "step tried), by step (its index in the plan) and why (low_mean_logprob, "
            "low_min_logprob, schema, empty, no_logprobs).",
            ("route", "step", "why"))
        self._budget_failures = _Counter(
            "sidecar_budget_read_failures_total",
            "Scrapes whose budget figures could not be read from the ledger (left out).", ())
        self._tokens = _Histogram(
            "gen_ai_client_token_usage",
            "Tokens per request as the provider reported them (gen_ai.client.token.usage), "
            "by gen_ai_token_type input or output.",
            (*_GEN_AI, "gen_ai_token_type"), TOKEN_BUCKETS)
        self._duration = _Histogram(
            "gen_ai_server_request_duration_seconds",
            "Seconds from a request's start to its end, failover and retries included "
            "(gen_ai.server.request.duration); error_type is \"\" on success.",
            (*_GEN_AI, "error_type"), DURATION_BUCKETS)
        self._ttft = _Histogram(
            "gen_ai_server_time_to_first_token_seconds",
            "Seconds until a successful stream's first token was relayed "
            "(gen_ai.server.time_to_first_token).", _GEN_AI, TTFT_BUCKETS)
        self._tpot = _Histogram(
            "gen_ai_server_time_per_output_token_seconds",
            "Seconds per output token after the first, of successful streams "
            "(gen_ai.server.time_per_output_token).", _GEN_AI, TPOT_BUCKETS)
        self._families: tuple[_Counter | _Histogram, ...] = (
            self._requests, self._reasons, self._attempts, self._retries, self._limited,
            self._cost, self._cache, self._escalations, self._budget_failures, self._tokens,
            self._duration,
            self._ttft, self._tpot)
        self.registry.register(_Collector(self))

    def watch(self, gateway: Gateway) -> None:
        """Read state (and budgets) from ``gateway`` from now on; after a reload, the new
        gateway's. Request series go on counting whatever gateway reports them."""
        self._gateway = gateway

    # --- requests -------------------------------------------------------------------------

    def observe(self, o: Outcome) -> None:
        """The gateway observer: count one request's outcome. Quick; never raises on a
        well-formed outcome."""
        route, target = _route_target(o)
        provider = target.partition("/")[0]
        op = _OPERATIONS.get(o.op, o.op)
        self._requests.inc((route, target, op, str(o.status)))
        for reason in o.reasons:
            self._reasons.inc((route, target, reason))
        for escalation in o.escalations:
            step, _, why = escalation.partition(":")
            self._escalations.inc((route, step, why))
        if o.attempts:
            self._attempts.inc((route,), o.attempts)
        if o.retries:
            self._retries.inc((route,), o.retries)
        if o.error is not None:
            error = o.error if o.error in self._codes else "other"
        else:
            error = "" if o.status == 200 else str(o.status)
        if o.status == 429:
            self._limited.inc((route, error))
        if o.cost is not None and target:
            self._cost.inc((route, target), o.cost)
        if o.cache is not None:
            self._cache.inc((route, o.cache))
        for escalated, cost in o.escalated_costs:  # a cascade's billed, unserved answers
            self._cost.inc((route, _wildcard(escalated) if o.direct else escalated), cost)
        gen_ai = (op, provider, route)
        if o.prompt_tokens is not None:
            self._tokens.observe((*gen_ai, "input"), o.prompt_tokens)
        if o.completion_tokens is not None:
            self._tokens.observe((*gen_ai, "output"), o.completion_tokens)
        self._duration.observe((*gen_ai, error), o.duration_s)
        if o.status == 200 and o.ttft_s is not None:
            self._ttft.observe(gen_ai, o.ttft_s)
            tokens = o.completion_tokens or 0
            if tokens > 1 and o.duration_s > o.ttft_s:
                self._tpot.observe(gen_ai, (o.duration_s - o.ttft_s) / (tokens - 1))

    # --- scrapes --------------------------------------------------------------------------

    async def exposition(self, identity: str | None = None) -> bytes:
        """Every series in Prometheus' text format (:data:`CONTENT_TYPE`), redacted by the
        watched gateway's redactor. Reads the budgets' current windows first (one ledger
        read; per-key budgets of ``identity`` only when auth is on, as
        ``/v1/sidecar/budgets``); when the ledger cannot be read they are left out and
        ``sidecar_budget_read_failures_total`` counts it.

        The families are copied on the event loop, at once after that read; the text, the
        costly part (about 6 µs per sample), is written and redacted in a worker thread,
        where the GIL lets the loop run every few milliseconds instead of stalling it for
        the whole render."""
        gateway = self._gateway
        if gateway is not None:
            try:
                self._budgets = _budgets_decoder.decode(await gateway.budgets(identity)).data
            except SidecarError:
                self._budgets = []
                self._budget_failures.inc(())
        families = _Families(list(self.collect()))
        redact = None if gateway is None else gateway.redact.data
        return await asyncio.to_thread(_render, families, redact)

    def collect(self) -> Iterator[Metric]:
        """Every metric family now (the registry's collector calls this)."""
        for family in self._families:
            yield family.family()
        if self._gateway is not None:
            yield from _state_families(self._gateway.state())
            yield from _budget_families(self._budgets)


def _route_target(o: Outcome) -> tuple[str, str]:
    """The bounded route and target labels of an outcome (see the module doc)."""
    route, target = o.route or "", o.target or ""
    if o.direct:
        route = _wildcard(route)
        target = _wildcard(target) if target else ""
    return route, target


def _wildcard(key: str) -> str:
    return key.partition("/")[0] + "/*"


def _error_codes() -> frozenset[str]:
    """Every ``code`` and ``type`` of the sidecar's own error classes."""
    seen: set[str] = set()
    todo: list[type[SidecarError]] = [SidecarError]
    while todo:
        cls = todo.pop()
        seen.update(v for v in (cls.code, cls.type) if isinstance(v, str))
        todo.extend(cls.__subclasses__())
    return frozenset(seen)


def _gauge(name: str, documentation: str, labels: Sequence[str] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, labels=labels)


def _state_families(state: GatewayState) -> Iterator[Metric]:
    yield GaugeMetricFamily("sidecar_draining", "1 while the sidecar drains (shutting down).",
                            value=1.0 if state.draining else 0.0)
    circuits = _gauge(
        "sidecar_circuit_state",
        "Each target's circuit: 0 closed, 1 half-open, 2 open (provider/*: the worst of "
        "the direct targets of that provider).", ("target",))
    worst: dict[str, int] = dict.fromkeys(state.targets, 0)
    for key, view in state.circuits.items():
        label = key if key in state.targets else _wildcard(key)
        worst[label] = max(worst.get(label, 0), _CIRCUIT.get(view.state, 0))
    for label, value in sorted(worst.items()):
        circuits.add_metric((label,), value)
    yield circuits
    if state.local_models is not None:
        yield from _local_families(state)
    if state.pressure is not None:
        pressure = _gauge("sidecar_host_pressure",
                          "1 while the host is under pressure of this resource.", ("resource",))
        pressure.add_metric(("cpu",), 1.0 if state.pressure.cpu else 0.0)
        pressure.add_metric(("memory",), 1.0 if state.pressure.memory else 0.0)
        yield pressure
        yield GaugeMetricFamily(
            "sidecar_host_local_workers_yielding",
            "1 while local workers run reniced/pinned because of CPU pressure.",
            value=1.0 if state.yielding else 0.0)
    if state.host is not None:
        yield from _host_families(state)


def _local_families(state: GatewayState) -> Iterator[Metric]:
    models = state.local_models or []
    queue = _gauge("sidecar_local_queue_depth",
                   "Requests waiting for a slot of the local model.", ("model",))
    in_use = _gauge("sidecar_local_slots_in_use",
                    "Sequences the local model is generating now.", ("model",))
    slots = _gauge("sidecar_local_slots",
                   "Sequences the local model decodes together (n_parallel).", ("model",))
    memory = _gauge("sidecar_local_model_estimated_bytes",
                    "Estimated memory of the local model when loaded, in bytes.", ("model",))
    states = _gauge("sidecar_local_model_state",
                    "1 for the local model's current state (stopped, loading, ready, "
                    "unloading, failed), 0 for the others.", ("model", "state"))
    loads = CounterMetricFamily("sidecar_local_loads_total",
                                "Successful loads of the local model (restarts included).",
                                labels=("model",))
    failures = CounterMetricFamily("sidecar_local_load_failures_total",
                                   "Loads of the local model that failed.", labels=("model",))
    unloads = CounterMetricFamily(
        "sidecar_local_unloads_total",
        "Workers of the local model the pool stopped (idle, room, memory pressure).",
        labels=("model",))
    crashes = CounterMetricFamily(
        "sidecar_local_worker_crashes_total",
        "Ready workers of the local model that exited on their own (crash, kill, out of "
        "memory); the next request restarts it.", labels=("model",))
    for m in models:
        key = (m.name,)
        queue.add_metric(key, m.queued)
        in_use.add_metric(key, m.in_flight)
        slots.add_metric(key, m.n_parallel)
        memory.add_metric(key, m.estimated_bytes)
        for s in type(m.state):
            states.add_metric((m.name, s.value), 1.0 if s is m.state else 0.0)
        loads.add_metric(key, m.loads)
        failures.add_metric(key, m.load_failures)
        unloads.add_metric(key, m.unloads)
        crashes.add_metric(key, m.crashes)
    yield from (queue, in_use, slots, memory, states, loads, failures, unloads, crashes)
    snap = state.host
    if snap is not None and snap.workers:
        rss = _gauge("sidecar_local_worker_rss_bytes",
                     "Resident memory of the local model's worker process, in bytes.",
                     ("model",))
        cpu = _gauge("sidecar_local_worker_cpu_percent",
                     "CPU of the local model's worker, in % of the whole host (0-100).",
                     ("model",))
        for w in snap.workers:
            rss.add_metric((w.name,), w.rss_bytes)
            cpu.add_metric((w.name,), w.cpu_percent)
        yield rss
        yield cpu


def _host_families(state: GatewayState) -> Iterator[Metric]:
    snap = state.host
    assert snap is not None
    host = (
        ("sidecar_host_cpus", "Logical CPUs of the host.", snap.cpu_count),
        ("sidecar_host_cpu_percent",
         "CPU busy on the whole host at the latest sample, in % of all CPUs (0-100).",
         snap.cpu_percent),
        ("sidecar_host_cpu_sidecar_percent",
         "CPU of the sidecar and its local workers, in % of all CPUs (0-100).",
         snap.sidecar_cpu_percent),
        ("sidecar_host_cpu_others_percent",
         "CPU of everything else on the host (the application), in % of all CPUs (0-100).",
         snap.others_cpu_percent),
        ("sidecar_host_memory_total_bytes", "Physical memory of the host, in bytes.",
         snap.memory_total_bytes),
        ("sidecar_host_memory_available_bytes",
         "Memory available to new work at the latest sample, in bytes.",
         snap.memory_available_bytes),
        ("sidecar_host_swap_total_bytes", "Swap of the host, in bytes.", snap.swap_total_bytes),
        ("sidecar_host_swap_used_bytes", "Swap in use, in bytes.", snap.swap_used_bytes),
    )
    for name, documentation, value in host:
        yield GaugeMetricFamily(name, documentation, value=float(value))
    load = _gauge("sidecar_host_load_average", "The host's load average.", ("period",))
    for period, value in zip(("1m", "5m", "15m"), snap.load_avg, strict=True):
        load.add_metric((period,), value)
    yield load
    if snap.gpus:
        labels = ("gpu", "name")
        total = _gauge("sidecar_gpu_memory_total_bytes", "GPU memory, in bytes.", labels)
        used = _gauge("sidecar_gpu_memory_used_bytes", "GPU memory in use, in bytes.", labels)
        util = _gauge("sidecar_gpu_utilization_percent",
                      "GPU utilisation at the latest sample, in % (0-100).", labels)
        for g in snap.gpus:
            key = (str(g.index), g.name)
            total.add_metric(key, g.memory_total_bytes)
            used.add_metric(key, g.memory_used_bytes)
            util.add_metric(key, g.utilization_percent)
        yield from (total, used, util)


def _budget_families(budgets: Sequence[BudgetView]) -> Iterator[Metric]:
    if not budgets:
        return
    labels = ("budget", "scope", "subject")
    limit = _gauge("sidecar_budget_limit_dollars",
                   "The budget's limit per window, in US dollars.", labels)
    spent = _gauge("sidecar_budget_spent_dollars",
                   "Spent in the budget's current window, in US dollars.", labels)
    reserved = _gauge("sidecar_budget_reserved_dollars",
                      "Reserved by calls in flight in the current window, in US dollars.",
                      labels)
    for b in budgets:
        key = (b.name, b.scope, b.subject)
        limit.add_metric(key, float(b.limit_usd))
        spent.add_metric(key, float(b.spent_usd))
        reserved.add_metric(key, float(b.reserved_usd))
    yield from (limit, spent, reserved)
