"""The one request pipeline, shared by every front end.

    authenticate -> resolve route -> response cache -> admission (budgets)
    -> the attempt loop (:mod:`sidecar.gateway.attempts`) -> redaction -> observers

Why a request went where it did is collected on the way: ``offload:<cpu|memory|queue>``
when local targets were moved behind remote ones, ``fallback:<reason>`` for each kind of
failure or skip that moved it on (``circuit_open``, ``budget``, ``upstream_5xx``, ...), or
``primary``. It is returned with the answer (``x-sidecar-route-reason``) and counted.

Front ends use only the surface listed in :mod:`sidecar.gateway`. They call
:meth:`Gateway.authenticate` first (before they decode a body, so an
unauthenticated client learns nothing about its request), turn client bytes into a
:class:`~sidecar.types.Call` and a :class:`Context`, call :meth:`Gateway.complete` or
:meth:`Gateway.stream`, and encode what comes back. Every error
raised to them is a :class:`~sidecar.errors.SidecarError`.

Concurrency: all methods run on one event loop and are safe to call concurrently.
Cancellation (the client went away) cancels the provider call and closes its connection.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import logging
import random
from collections.abc import (
    AsyncGenerator,
    Callable,
    Iterable,
    Mapping,
)
from typing import TypeVar

import msgspec

from local_models import ModelStatus
from sidecar.cache import CachePlan, MemoryCacheStore
from sidecar.cache import plan as cache_plan
from sidecar.config import LOCAL_PROVIDER, Config, Pooling
from sidecar.errors import (
    InvalidRequest,
    SidecarError,
    Unauthenticated,
    Unavailable,
    UpstreamError,
    UpstreamMalformed,
)
from sidecar.gateway.answers import Completed, Streaming
from sidecar.gateway.attempts import Attempts, Judge
from sidecar.gateway.cached import MISS, Lookup, ResponseCache, replay
from sidecar.gateway.context import Context
from sidecar.gateway.events import Ended, Failed, StreamEvent
from sidecar.gateway.outcome import Observer, Outcome, Trace
from sidecar.gateway.relay import Cut, relay
from sidecar.gateway.status import (
    GatewayState,
    model_ids,
    readiness_document,
    status_document,
)
from sidecar.health import Health, RetryBudget
from sidecar.host import HostWatch, LocalLoad
from sidecar.limits import MemoryRateLimiter
from sidecar.money import FREE, Accountant, Estimate, estimate
from sidecar.providers.anthropic import AnthropicMessages
from sidecar.providers.base import Provider, Reply
from sidecar.providers.local import LocalProvider
from sidecar.redact import Redactor
from sidecar.routing import Route, Router, Target, TargetTracker, cascade
from sidecar.types import Call, Meter, Op, Usage

T = TypeVar("T")
log = logging.getLogger("sidecar.gateway")

CACHE_HIT = "cache:hit"
"""The route reason of an answer from the response cache."""
CACHE_SEMANTIC = "cache:semantic"
"""The route reason of an answer from the cache found by meaning (another question's)."""


_encoder = msgspec.json.Encoder()


def error_body(err: SidecarError) -> bytes:
    """OpenAI's error envelope for ``err``."""
    return _encoder.encode(
        {"error": {"message": err.message, "type": err.type, "code": err.code, "param": err.param}}
    )


class Gateway:
    """Routes calls to providers with failover, retries and circuit breaking."""

    def __init__(
        self,
        config: Config,
        providers: Mapping[str, Provider],
        *,
        accountant: Accountant | None = None,
        clock: Callable[[], float] | None = None,
        rng: random.Random | None = None,
        local_models: Iterable[str] = (),
        local_load: Callable[[str], LocalLoad | None] | None = None,
        host: HostWatch | None = None,
        redactor: Redactor | None = None,
        observers: Iterable[Observer] = (),
        previous: Gateway | None = None,
        cache: ResponseCache | None = None,
    ) -> None:
        """``providers`` by name (``local`` included when there are local models, whose
        names are ``local_models`` and whose queues ``local_load`` reports); ``accountant``
        applies budgets and rate limits (by default an in-memory one, enough when no
        budgets are configured); ``host`` says whether the host is under pressure (none:
        never); ``redactor`` takes configured secrets out of every error, body and frame
        that :meth:`complete` and :meth:`stream` return or raise (by default one built from
        ``config``); ``observers`` hear of every request's :class:`Outcome` when it ends.
        ``previous``: the gateway this one replaces after a config reload; this one takes
        over its shutdown cut, its targets' latency figures and route reasons, and its
        circuits when the circuit settings are the same. ``cache``: the response cache of
        the routes with ``cache = true`` (by default an in-memory one of ``[cache]``'s
        size, when a route has the cache), closed by :meth:`aclose`."""
        self._config = config
        self._observers = tuple(observers)
        self.redact = redactor if redactor is not None else Redactor.from_config(config)
        self._routing = config.routing
        self.providers = dict(providers)
        self.router = Router(config, self.providers, local_models)
        self._configured = frozenset(r.model for r in self.router.routes)
        if cache is None and any(r.cache for r in config.routes):
            cache = ResponseCache(MemoryCacheStore(max_bytes=config.cache.max_bytes,
                                                   max_entry_bytes=config.cache.max_entry_bytes))
        self.cache = cache
        self._clock = clock or asyncio.get_running_loop().time
        same_circuits = previous is not None and (
            (previous._routing.circuit_failures, previous._routing.circuit_cooldown_s)
            == (config.routing.circuit_failures, config.routing.circuit_cooldown_s))
        self.health: Health = previous.health if previous is not None and same_circuits else Health(
            config.routing.circuit_failures, config.routing.circuit_cooldown_s, self._clock
        )
        self._retry_budget = RetryBudget(
            config.routing.retry_budget_ratio, config.routing.retry_budget_min, self._clock
        )
        self._rng = rng or random.Random()
        # Anonymous keys get names no [[keys]] entry can have (brackets are not allowed).
        keys = [(f"api_keys[{i}]", k) for i, k in enumerate(config.server.api_keys)]
        keys += [(k.name, k.key) for k in config.keys]
        self._keys = [(name, key.encode()) for name, key in keys]
        self.accountant = accountant or Accountant(config, None, MemoryRateLimiter())
        self._draining = False
        self._cut: Cut = previous._cut if previous is not None else Cut()
        self.host = host
        self._local_load = local_load
        self.tracker: TargetTracker = previous.tracker if previous is not None else TargetTracker()
        self.reasons: collections.Counter[str] = (
            previous.reasons if previous is not None else collections.Counter())
        """Served requests per route reason (a request with several counts in each)."""
        self._attempts = Attempts(
            config.routing, self.providers, health=self.health, accountant=self.accountant,
            tracker=self.tracker, retry_budget=self._retry_budget, reasons=self.reasons,
            clock=self._clock, rng=self._rng, local_load=local_load, host=host)
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    # --- front-end facing -----------------------------------------------------------------

    @property
    def config(self) -> Config:
        """The config this gateway serves."""
        return self._config

    @property
    def auth(self) -> bool:
        """Whether requests need a client key."""
        return bool(self._keys)

    def authenticate(self, key: str | None) -> str | None:
        """The name of the client key ``key`` (None when auth is off); raises
        :class:`Unauthenticated` otherwise. Compares against every key in constant time."""
        if not self._keys:
            return None
        given = (key or "").encode()
        found = None
        for name, k in self._keys:
            if hmac.compare_digest(k, given):
                found = name
        if found is None:
            raise Unauthenticated(
                "Missing API key." if not key else "Incorrect API key provided."
            )
        return found

    def deadline(self, timeout_s: float | None) -> float:
        """The absolute deadline for a request given the client's requested timeout."""
        server = self._config.server
        if timeout_s is None:
            timeout_s = server.request_timeout_s
        elif not 0 < timeout_s <= server.max_request_timeout_s:
            raise InvalidRequest(
                f"x-sidecar-timeout must be between 0 and {server.max_request_timeout_s:g} "
                "seconds.",
                param="x-sidecar-timeout",
            )
        return self._clock() + timeout_s

    async def complete(self, call: Call, ctx: Context) -> Completed:
        """Serve a non-stream call. Its cost is recorded before this returns. Raises
        :class:`SidecarError`. Secrets are redacted from the error or the reply body.
        Observers hear of it once it ends, however it ends. On a route with the response
        cache, a hit is answered without a provider call or a charge."""
        trace, started = Trace(), self._clock()
        self._enter()
        try:
            route = self._route(call, trace)
            cache = self._cache_plan(call, route, ctx, trace)
            found = await self._cached(cache, call, trace)
            entry = found.entry
            if entry is not None:
                assert entry.body is not None
                reply = Reply(entry.body, entry.usage, entry.native)
                done = Completed(entry.target, 0, trace.reasons[0], 0, reply, trace.cache)
            else:
                done = await self._complete(call, ctx, trace, route)
                body = self.redact.data(done.reply.body)
                if body is not done.reply.body:
                    done.reply = msgspec.structs.replace(done.reply, body=body)
                if cache is not None and self.cache is not None:
                    await self.cache.keep_reply(cache, found, done.target, done.reply)
                done.cache = trace.cache
        except SidecarError as e:
            self.redact.error(e)  # in place: the same exception goes on, redacted
            self._observe(call, ctx, trace, started, e.status, e)
            raise
        except asyncio.CancelledError:
            self._observe(call, ctx, trace, started, 499)
            raise
        finally:
            self._leave()
        self._observe(call, ctx, trace, started, 200,
                      usage=None if entry is not None else done.reply.usage, cost=done.cost)
        return done

    async def stream(self, call: Call, ctx: Context) -> Streaming:
        """Serve a stream call; returns once the first frame has arrived, so a target that
        fails before its first token is replaced without the client seeing it. Secrets
        are redacted from the error or from each frame. Observers hear of it when its
        events end (or here, when it fails before it commits). On a route with the
        response cache, a hit replays the stream that was kept."""
        trace, started = Trace(), self._clock()
        self._enter()
        try:
            route = self._route(call, trace)
            cache = self._cache_plan(call, route, ctx, trace)
            found = await self._cached(cache, call, trace)
            entry = found.entry
            if entry is not None:
                streaming = Streaming(entry.target, 0, trace.reasons[0], 0, cache="hit",
                                      events=replay(entry), native=entry.native)
            else:
                streaming = await self._stream(call, ctx, trace, route)
                if cache is not None and self.cache is not None:
                    streaming.events = self.cache.recording(
                        cache, found, streaming.target, streaming.native, streaming.events)
                streaming.cache = trace.cache
        except SidecarError as e:
            self._leave()
            self.redact.error(e)  # in place: the same exception goes on, redacted
            self._observe(call, ctx, trace, started, e.status, e)
            raise
        except asyncio.CancelledError:
            self._leave()
            self._observe(call, ctx, trace, started, 499)
            raise
        ttft = self._clock() - started
        streaming.events = self._observed(streaming.events, call, ctx, trace, started, ttft)
        return streaming

    async def _observed(self, events: AsyncGenerator[StreamEvent, None], call: Call,
                        ctx: Context, trace: Trace, started: float, ttft: float
                        ) -> AsyncGenerator[StreamEvent, None]:
        """``events`` as they are; the outcome is observed when they end or are closed."""
        status, error, ended = 499, None, None
        try:
            async for event in events:
                if isinstance(event, Ended):
                    status, ended = 200, event
                elif isinstance(event, Failed):
                    status, error = event.error.status, event.error
                yield event
        finally:
            await events.aclose()
            self._leave()
            self._observe(call, ctx, trace, started, status, error,
                          usage=ended.usage if ended is not None and trace.cache != "hit"
                          else None,
                          cost=ended.cost if ended is not None else None, ttft=ttft)

    def _enter(self) -> None:
        self._in_flight += 1
        self._idle.clear()

    def _leave(self) -> None:
        self._in_flight -= 1
        if self._in_flight == 0:
            self._idle.set()

    @property
    def in_flight(self) -> int:
        """Calls and streams running now (a stream until its events end or are closed)."""
        return self._in_flight

    async def until_idle(self) -> None:
        """Return once no call or stream runs (at once when none does): a gateway replaced
        by a reload is closed after this."""
        await self._idle.wait()

    def _observe(self, call: Call, ctx: Context, trace: Trace, started: float, status: int,
                 error: SidecarError | None = None, *, usage: Usage | None = None,
                 cost: int | None = None, ttft: float | None = None) -> None:
        if not self._observers:
            return
        outcome = Outcome(
            request_id=ctx.request_id, op=call.op.value, model=call.request.model,
            route=trace.route, direct=trace.direct, target=trace.target,
            attempts=trace.attempts, retries=trace.retries, reasons=trace.reasons,
            escalations=trace.escalations, escalated_costs=trace.escalated_costs,
            stream=call.stream, status=status,
            error=None if error is None else (error.code or error.type),
            prompt_tokens=None if usage is None else usage.prompt_tokens,
            completion_tokens=None if usage is None else usage.completion_tokens,
            cost=cost, duration_s=self._clock() - started, ttft_s=ttft, cache=trace.cache)
        for observer in self._observers:
            try:
                observer(outcome)
            except Exception:  # an observer's bug must not fail the request
                log.exception("request observer %r failed", observer)

    def models(self) -> list[tuple[str, str]]:
        """(id, owned_by) of every model clients may ask for: routes, then every
        ``provider/model`` target once."""
        return model_ids(self.router.routes)

    async def count_tokens(self, call: Call, ctx: Context) -> int:
        """``call``'s prompt tokens once its model resolves: Anthropic's own count when the
        call is a Messages body and its route's first target is an Anthropic one, else (or
        when that fails, or its circuit is open) an estimate: a quarter of the input's JSON
        bytes, as token limits guess them. Raises :class:`~sidecar.errors.ModelNotFound`;
        nothing is billed."""
        route = self.router.resolve(call.request.model)
        first = route.targets[0]
        provider = self.providers.get(first.provider)
        now = self._clock()
        if (call.messages is not None and isinstance(provider, AnthropicMessages)
                and self.health.circuit(first.key).available_at(now) <= now):
            try:
                return await provider.count_tokens(call.messages, first.model,
                                                   max(0.001, ctx.deadline - now))
            except UpstreamError as e:
                log.info("count_tokens: %s; answering with an estimate", e.message)
        return estimate(call).prompt_guess

    async def budgets(self, identity: str | None) -> bytes:
        """Every budget's current window as a JSON list (per-key ones of ``identity``
        only, when auth is on), redacted."""
        views = await self.accountant.views(identity, self.auth)
        return self.redact.data(_encoder.encode({"object": "list", "data": views}))

    def status(self) -> bytes:
        """The status document (see :func:`~sidecar.gateway.status.status_document`) as
        JSON, redacted."""
        doc = status_document(
            draining=self._draining, host=self.host, routes=self.router.routes,
            circuits=self.health.views(), tracker=self.tracker, reasons=self.reasons,
            local_models=self._local_models())
        return self.redact.data(_encoder.encode(doc))

    def readiness(self) -> tuple[bool, bytes]:
        """Whether the sidecar takes new calls (not draining), and the readiness document
        (see :func:`~sidecar.gateway.status.readiness_document`) as JSON, redacted."""
        doc = readiness_document(draining=self._draining, circuits=self.health.views(),
                                 local_models=self._local_models())
        return not self._draining, self.redact.data(_encoder.encode(doc))

    def state(self) -> GatewayState:
        """What the gateway is now, for collectors that read it at scrape time (metrics):
        circuits, local models, the host's pressure and latest snapshot, and which targets
        are configured. Cheap and synchronous (no I/O). Not redacted: whoever turns it into
        text redacts that text."""
        host = self.host
        snapshot = None
        if host is not None:
            with contextlib.suppress(RuntimeError):  # not started: no sample yet
                snapshot = host.snapshot
        return GatewayState(
            draining=self._draining,
            targets=frozenset(t.key for r in self.router.routes for t in r.targets),
            circuits=self.health.views(), local_models=self._local_models(),
            pressure=None if host is None else host.pressure, host=snapshot,
            yielding=host is not None and host.yielding)

    def _local_models(self) -> list[ModelStatus] | None:
        local = self.providers.get(LOCAL_PROVIDER)
        return local.pool.status() if isinstance(local, LocalProvider) else None

    @property
    def draining(self) -> bool:
        """Whether :meth:`drain` (or :meth:`cut`) was called: new calls get 503."""
        return self._draining

    def drain(self) -> None:
        """Refuse new calls from now on (503, retry after 1 s); calls running go on."""
        self._draining = True

    def cut(self) -> None:
        """End every stream still running with :class:`~sidecar.gateway.events.Failed`
        (503 "shut down": what was relayed is kept, its cost recorded), at once or as soon
        as its client takes the next frame; front ends answer non-stream calls still running
        with :func:`shut_down` once :meth:`until_cut` returns. Drains too. For the end of
        the shutdown grace."""
        self._draining = True
        self._cut.cut()

    @property
    def is_cut(self) -> bool:
        """Whether :meth:`cut` was called."""
        return self._cut.done

    async def until_cut(self) -> None:
        """Return once :meth:`cut` is called (at once if it was)."""
        await self._cut.wait()

    async def start(self) -> None:
        """Start the background work (the host watch, when there is one). Once, in the
        serving loop, before calls; :meth:`aclose` stops it."""
        if self.host is not None:
            await self.host.start()

    def _route(self, call: Call, trace: Trace) -> Route:
        if self.draining:
            raise Unavailable("The sidecar is shutting down.", retry_after_s=1.0)
        route = self.router.resolve(call.request.model)
        trace.route = route.model
        trace.direct = route.model not in self._configured
        return route

    def _cache_plan(self, call: Call, route: Route, ctx: Context, trace: Trace
                    ) -> CachePlan | None:
        """The response cache's plan for ``call`` (None: not used), ``trace.cache`` set to
        what the client is told unless it is a hit (``miss`` or ``bypass``; None on a
        route without the cache)."""
        if route.cache_ttl_s is None or self.cache is None:
            return None
        found = cache_plan(call, route, ctx.identity, ctx.cache)
        trace.cache = "bypass" if found is None else "miss"
        return found

    async def _cached(self, cache: CachePlan | None, call: Call, trace: Trace) -> Lookup:
        """What the response cache finds for ``cache`` (never raises: a cache that fails is
        a miss); a hit sets the trace's target and its one reason."""
        if cache is None or self.cache is None:
            return MISS
        found = await self.cache.lookup(cache, call.stream, self._embed)
        entry = found.entry
        if entry is not None:
            reason = CACHE_HIT if found.similarity is None else CACHE_SEMANTIC
            trace.cache, trace.target, trace.reasons = "hit", entry.target, (reason,)
            self.reasons[reason] += 1
        return found

    async def _embed(self, model: str, text: str, pooling: Pooling) -> list[float]:
        """The local ``model``'s embedding of ``text`` (for the semantic cache). Raises what
        the local provider raises (:class:`KeyError` without one)."""
        local = self.providers.get(LOCAL_PROVIDER)
        if not isinstance(local, LocalProvider):
            raise KeyError("no local models")
        vectors = (await local.pool.embed(model, [text], pooling=pooling)).vectors
        return list(vectors[0])

    async def _complete(self, call: Call, ctx: Context, trace: Trace, route: Route
                        ) -> Completed:
        est = await self._admit(call, ctx, route)

        async def attempt(provider: Provider, target: Target, timeout_s: float, call: Call,
                          meter: Meter, whole: bool) -> Reply:
            return await provider.send(call, target.model, timeout_s, meter)

        judge: Judge[Reply] | None = None
        settings = route.cascade
        if settings is not None and call.op is not Op.EMBEDDINGS:
            def judge(target: Target, reply: Reply) -> tuple[cascade.Verdict, Reply]:
                verdict, body = cascade.judge_reply(call, reply.body, settings,
                                                    native=reply.native)
                return verdict, msgspec.structs.replace(reply, body=body)

        reply, done = await self._attempts.run(call, route, ctx, est, attempt, trace, judge)
        self._attempts.finished(done, completed=True)
        # Shielded: the provider has billed this; a client leaving now must not lose it.
        cost = await asyncio.shield(self._attempts.settle(ctx, route, est, done, reply))
        return Completed(done.target.key, done.attempts, done.reason, cost, reply)

    async def _stream(self, call: Call, ctx: Context, trace: Trace, route: Route) -> Streaming:
        est = await self._admit(call, ctx, route)

        async def attempt(
            provider: Provider, target: Target, timeout_s: float, call: Call, meter: Meter,
            whole: bool,
        ) -> tuple[bytes, AsyncGenerator[bytes, None]]:
            frames = provider.stream(call, target.model, timeout_s, meter)
            try:
                first = await anext(frames)
                if whole:  # a cascade judges the whole answer: read to its end, then replayed
                    first += b"".join([frame async for frame in frames])
                    frames = _ended()
            except StopAsyncIteration:
                raise UpstreamMalformed(
                    f"{target.key} sent an empty stream", target=target.key
                ) from None
            except BaseException:
                await frames.aclose()
                raise
            return first, frames

        judge: Judge[tuple[bytes, AsyncGenerator[bytes, None]]] | None = None
        settings = route.cascade
        if settings is not None:
            def judge(target: Target, got: tuple[bytes, AsyncGenerator[bytes, None]]
                      ) -> tuple[cascade.Verdict, tuple[bytes, AsyncGenerator[bytes, None]]]:
                native = (call.messages is not None
                          and self.providers[target.provider].native_messages)
                verdict, data = cascade.judge_stream(call, got[0], settings, native=native)
                return verdict, (data, got[1])

        (first, frames), done = await self._attempts.run(call, route, ctx, est, attempt, trace,
                                                         judge)
        circuit = self.health.circuit(done.target.key)

        async def upstream_failed(e: UpstreamError) -> None:
            if e.counts_against_health:
                await self._attempts.failed(done.target, circuit, e)

        events = relay(
            first, frames, deadline=ctx.deadline, cut=self._cut, meter=done.meter,
            redact=self.redact, settle=lambda: self._attempts.settle(ctx, route, est, done, None),
            upstream_failed=upstream_failed, finished=lambda ok: self._attempts.finished(done, ok))
        free = done.ticket.price == FREE
        native = call.messages is not None and self.providers[done.target.provider].native_messages
        return Streaming(done.target.key, done.attempts, done.reason, 0 if free else None,
                         events, native)

    # --- the pipeline ---------------------------------------------------------------------

    async def _admit(self, call: Call, ctx: Context, route: Route) -> Estimate:
        est = estimate(call)
        await self.accountant.admit(ctx.identity, route, est)
        self._retry_budget.record_request()
        return est

    async def aclose(self) -> None:
        """Stop the host watch, close every provider, the accountant and the cache."""
        if self.host is not None:
            await self.host.aclose()
        await asyncio.gather(*(p.aclose() for p in self.providers.values()),
                             self.accountant.aclose(),
                             *([self.cache.aclose()] if self.cache is not None else []))


class Current:
    """The gateway new requests go to, for the front ends, which read :attr:`gateway` once
    per request; a config reload replaces it (the one before finishes what it runs)."""

    __slots__ = ("gateway",)

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway


async def _ended() -> AsyncGenerator[bytes, None]:
    """A stream with no frame left (a cascade's answer, read whole and replayed)."""
    return
    yield
