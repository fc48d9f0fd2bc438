"""Money and limits for one request: what it may cost, who pays, whether it may go now.

The :class:`Accountant` is called by the gateway at these points of a request:

* :meth:`~Accountant.admit` once, before any target: the client key's and the route's
  inbound rate limits (requests and tokens per minute). Raises :class:`RateLimited` with an
  accurate Retry-After.
* :meth:`~Accountant.reserve` before each attempt on a target: the worst case cost
  (prompt bound + max_tokens at the target's price) is reserved on every budget that
  applies, in one atomic step. When the client gave no token limit, the reservation takes
  what the budgets can pay for (up to ``default_max_tokens``) and ``Ticket.cap`` tells the
  provider the token limit to send. A budget without room raises :class:`BudgetExhausted`
  (``on_exhausted = "local"``: the gateway skips to free targets) or :class:`BudgetRejected`
  (``"reject"``: 429 with the window's reset time); an unreachable ledger raises
  :class:`LedgerDown` (skip to free targets) unless budgets fail open.
* :meth:`~Accountant.check_retry_after` before each attempt, before the reservation: an
  earlier Retry-After of the target (:meth:`~Accountant.retry_after`) still holds it.
  Raises :class:`RetryAfterHeld`.
* :meth:`~Accountant.outbound` before each attempt, after the reservation: the provider's
  outbound rpm/tpm, and what its ``x-ratelimit-*`` headers said about its limits
  (:meth:`~Accountant.provider_limited`). Raises :class:`TargetLimited`.
* :meth:`~Accountant.settle` after a success (the actual cost from the usage, durably
  recorded before the answer goes out) or :meth:`~Accountant.release` after a failure.
* :meth:`~Accountant.retry_after` after a failure that carried a Retry-After, and
  :meth:`~Accountant.provider_limited` after any answer whose ``x-ratelimit-*`` headers
  said the limit is used up: what the provider told us to wait for.

A reservation is durable before the provider is called (see :mod:`sidecar.money.budgets`), so a
crash between reserve and settle, or a settle or release the ledger could not take, costs
the attempt's worst case (its reservation is spent when it expires, or when the SQLite
ledger is opened again), never a lost charge.

What a provider says about waiting is held in the rate limiter (:mod:`sidecar.limits.holds`),
so with a shared limiter (Redis) every sidecar of the fleet skips a target that one of them
was told to wait for. Holds fail open: when the limiter cannot be reached, the target is
tried (the provider will say so again), whatever ``limits_on_unavailable`` says.

Free targets (local models, providers marked ``free``) never reserve. A paid target whose
price is unknown cannot be bounded, so under a budget it is skipped like an exhausted one.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import math
import time
import uuid
from collections.abc import Callable, Iterable, Sequence

import msgspec

from sidecar.config import BudgetConfig, Config
from sidecar.errors import (
    BudgetExhausted,
    BudgetRejected,
    LedgerDown,
    RateLimited,
    RetryAfterHeld,
    TargetLimited,
    Unavailable,
)
from sidecar.limits import Hold, Holds, LimiterUnavailable, Rate, RateLimiter
from sidecar.money.budgets import (
    BudgetKey,
    BudgetStore,
    LedgerUnavailable,
    Shortfall,
    window_of,
    window_reset,
)
from sidecar.money.estimates import Estimate
from sidecar.money.pricing import FREE, Price, PriceTable, cost, format_usd
from sidecar.routing import Route, Target
from sidecar.types import Call, Meter, Usage

log = logging.getLogger("sidecar.money.accountant")

#: Completion tokens reserved for a request without a token limit (and sent upstream as its
#: limit) when a budget applies; fewer when the budget cannot pay for that many.
DEFAULT_MAX_TOKENS = 4096
#: The fewest completion tokens worth calling a paid target for.
MIN_COMPLETION_TOKENS = 16
class Ticket(msgspec.Struct):
    """One attempt's reservation. ``rid`` None: nothing was reserved; ``price`` None: the
    target's price is unknown (no budget applies to it), so its cost is too."""

    target: Target
    price: Price | None
    rid: str | None = None
    amount: int = 0
    cap: int | None = None
    """The completion-token limit the provider must send (client gave none)."""


class BudgetView(msgspec.Struct):
    """One budget's state in its current window, for ``GET /v1/sidecar/budgets``."""

    name: str
    scope: str
    subject: str
    window: str
    limit_usd: str
    spent_usd: str
    reserved_usd: str
    remaining_usd: str
    on_exhausted: str
    resets_at: str | None


class Accountant:
    """Budgets and rate limits of one gateway; safe for concurrent use on one event loop."""

    def __init__(
        self,
        config: Config,
        store: BudgetStore | None,
        limiter: RateLimiter,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``store`` may be None only when no budgets are configured."""
        self._config = config
        self._budgets = config.budgets
        assert store is not None or not self._budgets
        self._store = store
        self._limiter = limiter
        self._clock = clock
        free = [p.name for p in config.providers if p.free]
        self.prices = PriceTable(
            {k: Price.usd(v.input, v.output, v.cached_input) for k, v in config.prices.items()},
            free,
        )
        self._keys = {k.name: k for k in config.keys}
        self._providers = {p.name: p for p in config.providers}
        self._routes = {r.model: r for r in config.routes}
        self._ttl_s = config.server.max_request_timeout_s + 60.0
        state = config.state
        self._budgets_closed = state.budgets_on_unavailable == "closed"
        self._holds = Holds(limiter)
        self._pending: set[asyncio.Task[None]] = set()
        """Holds being recorded (:meth:`provider_limited`)."""
        self._limits_closed = state.limits_on_unavailable == "closed"

    @property
    def enabled(self) -> bool:
        return bool(self._budgets)

    # --- inbound limits -------------------------------------------------------------------

    async def admit(self, identity: str | None, route: Route, est: Estimate) -> None:
        """Apply the key's and the route's rpm/tpm. Raises :class:`RateLimited`."""
        checks: list[tuple[str, str, Rate, float]] = []
        key = self._keys.get(identity or "")
        if key is not None:
            checks += _rates(f"in:key:{key.name}", f"key '{key.name}'", key.rpm, key.tpm, est)
        rc = self._routes.get(route.model)
        if rc is not None:
            checks += _rates(f"in:route:{rc.model}", f"route '{rc.model}'", rc.rpm, rc.tpm, est)
        for lkey, what, rate, units in checks:
            wait = await self._acquire(lkey, rate, units)
            if wait > 0:
                kind = "requests" if lkey.endswith(":rpm") else "tokens"
                raise RateLimited(
                    f"Rate limit of {what} reached ({kind} per minute).",
                    retry_after_s=None if math.isinf(wait) else wait,
                )

    async def _acquire(self, key: str, rate: Rate, units: float) -> float:
        try:
            return await self._limiter.acquire(key, rate, min(units, rate.burst))
        except LimiterUnavailable as e:
            if self._limits_closed:
                raise Unavailable(f"Rate limits cannot be checked: {e}",
                                  retry_after_s=1.0) from None
            log.warning("rate limits not applied: %s", e)
            return 0.0

    async def used(self, identity: str | None, route: Route, target: Target, est: Estimate,
                   usage: Usage | None) -> None:
        """Charge the tokens a call used beyond the prompt guess to the token limits."""
        if usage is None:
            return
        extra = usage.total_tokens - est.prompt_guess
        if extra <= 0:
            return
        keys: list[tuple[str, Rate]] = []
        key = self._keys.get(identity or "")
        if key is not None and key.tpm:
            keys.append((f"in:key:{key.name}:tpm", _tokens(key.tpm)))
        rc = self._routes.get(route.model)
        if rc is not None and rc.tpm:
            keys.append((f"in:route:{rc.model}:tpm", _tokens(rc.tpm)))
        pc = self._providers.get(target.provider)
        if pc is not None and pc.tpm:
            keys.append((f"out:{pc.name}:tpm", _tokens(pc.tpm)))
        # Independent and unconditional: one round trip of waiting, not one per limit.
        await asyncio.gather(*(self._charge(lkey, rate, extra) for lkey, rate in keys))

    async def _charge(self, key: str, rate: Rate, tokens: int) -> None:
        try:
            await self._limiter.charge(key, rate, tokens)
        except LimiterUnavailable as e:
            log.warning("token use not recorded: %s", e)

    # --- outbound limits ------------------------------------------------------------------

    async def check_retry_after(self, target: Target) -> None:
        """Raise :class:`RetryAfterHeld` while an earlier Retry-After holds ``target`` (told
        to this sidecar, or to any that shares its limiter)."""
        held = await self._held_for_s(Hold.RETRY_AFTER, target)
        if held is not None:
            raise RetryAfterHeld(
                f"{target.key} is rate limited by the provider for {held:.1f} more seconds",
                target=target.key, retry_after_s=round(held, 3))

    async def retry_after(self, target: Target, seconds: float | None) -> None:
        """The provider answered a call to ``target`` with a Retry-After of ``seconds``
        (None or 0: none): hold the target until then."""
        if seconds:
            await self._hold(Hold.RETRY_AFTER, target, seconds)

    async def outbound(self, target: Target, est: Estimate) -> None:
        """Raise :class:`TargetLimited` when the provider's limits say wait: its configured
        rpm/tpm, or what its ``x-ratelimit-*`` headers said (:meth:`provider_limited`)."""
        blocked = await self._held_for_s(Hold.EXHAUSTED, target)
        if blocked is not None:
            raise TargetLimited(f"{target.key}: the provider asked to wait {blocked:.1f} s",
                                target=target.key, retry_after_s=blocked)
        pc = self._providers.get(target.provider)
        if pc is None:
            return
        for lkey, _, rate, units in _rates(f"out:{pc.name}", pc.name, pc.rpm, pc.tpm, est):
            wait = await self._acquire(lkey, rate, units)
            if wait > 0:
                raise TargetLimited(
                    f"{target.key}: the provider's rate limit is reached",
                    target=target.key, retry_after_s=None if math.isinf(wait) else wait,
                )

    def provider_limited(self, target: Target, seconds: float | None) -> None:
        """The provider said its limit for this model is used up for ``seconds`` (None or
        0: it did not): skip the target until then (providers limit per model, so other
        models still go).

        Recorded in the background, because the answer that said so is on its way to the
        client and must not wait for the limiter (nor be lost if its task is cancelled
        meanwhile); this sidecar's own checks wait for it, so it always sees its own holds.
        """
        if not seconds:
            return
        task = asyncio.get_running_loop().create_task(
            self._hold(Hold.EXHAUSTED, target, seconds))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _hold(self, kind: Hold, target: Target, seconds: float) -> None:
        try:
            await self._holds.hold(kind, target.key, seconds)
        except LimiterUnavailable as e:
            log.warning("%s not held (%s): %s", target.key, kind.value, e)

    async def _held_for_s(self, kind: Hold, target: Target) -> float | None:
        if self._pending:  # not gather: a cancelled caller must not cancel them
            await asyncio.wait(set(self._pending))
        try:
            return await self._holds.held_for_s(kind, target.key)
        except LimiterUnavailable as e:
            log.warning("holds not checked for %s: %s", target.key, e)
            return None

    # --- budgets --------------------------------------------------------------------------

    def _applicable(self, target: Target, identity: str | None, now: float
                    ) -> list[tuple[BudgetConfig, BudgetKey]]:
        out = []
        for b in self._budgets:
            if b.scope == "global":
                subject: str | None = "*"
            elif b.scope == "key":
                subject = identity if b.key is None or b.key == identity else None
            else:
                subject = target.provider if b.provider in (None, target.provider) else None
            if subject is not None:
                out.append((b, BudgetKey(b.name, subject, window_of(b.window, now))))
        return out

    async def reserve(self, call: Call, target: Target, identity: str | None, est: Estimate
                      ) -> Ticket:
        """Reserve the attempt's worst case on every budget that applies (see module)."""
        price = self.prices.lookup(target.provider, target.model)
        now = self._clock()
        budgets = self._applicable(target, identity, now) if price != FREE else []
        if not budgets:
            return Ticket(target, price)
        if price is None:
            raise BudgetExhausted(
                f"{target.key} has no known price, so budget "
                f"'{budgets[0][0].name}' cannot bound it; add it to [prices]",
                target=target.key,
            )
        assert self._store is not None
        prompt = cost(price, est.prompt_max, 0)
        n = est.choices  # every choice is billed
        if est.max_tokens is not None:
            want_max = want_min = prompt + cost(price, 0, est.max_tokens * n)
        else:
            want_max = prompt + cost(price, 0, DEFAULT_MAX_TOKENS * n)
            want_min = prompt + cost(price, 0, MIN_COMPLETION_TOKENS * n)
        rid = uuid.uuid4().hex
        limits = [(key, _micro(b.limit_usd)) for b, key in budgets]
        try:
            result = await self._store.reserve(rid, limits, want_max, max(want_min, 1),
                                               self._ttl_s)
        except LedgerUnavailable as e:
            if self._budgets_closed:
                raise LedgerDown(f"{target.key} is paid and the budget ledger is "
                                 f"unavailable: {e}", target=target.key) from None
            log.warning("budgets not applied: %s", e)
            return Ticket(target, price)
        if isinstance(result, Shortfall):
            b = next(b for b, key in budgets if key == result.key)
            raise self._exhausted(b, result, target, now)
        cap = None
        if est.max_tokens is None:
            per_token = max(price.output, 1)
            cap = max(1, min(DEFAULT_MAX_TOKENS, (result.amount - prompt) * 1_000_000
                             // (per_token * n)))
        return Ticket(target, price, rid, result.amount, cap)

    def _exhausted(self, b: BudgetConfig, short: Shortfall, target: Target, now: float
                   ) -> BudgetExhausted | BudgetRejected:
        reset = window_reset(b.window, now)
        when = (f"; it resets at {_iso(reset)}" if reset is not None
                else "; it does not reset")
        who = "" if short.key.subject == "*" else f" for {b.scope} '{short.key.subject}'"
        message = (f"Budget '{b.name}'{who} is exhausted ({format_usd(short.room)} of "
                   f"{format_usd(_micro(b.limit_usd))} USD left this {b.window} window){when}")
        retry = None if reset is None else max(1.0, reset - now)
        if b.on_exhausted == "reject":
            return BudgetRejected(message + ".", retry_after_s=retry)
        return BudgetExhausted(message + "; only free and local targets can serve.",
                               target=target.key, retry_after_s=retry)

    async def settle(self, ticket: Ticket, est: Estimate, usage: Usage | None,
                     meter: Meter | None) -> int | None:
        """Record the attempt's actual cost (µ$) before its answer is released; None when
        the price is unknown. Without a usage from the provider: prompt bound + what the
        meter counted, or the reservation for a non-stream call; the reservation too when
        the provider reported an impossible usage (``meter.usage_invalid``). Raises
        :class:`Unavailable` if the ledger cannot record it (and budgets fail closed)."""
        if ticket.price is None:
            return None
        if usage is None and meter is not None:
            usage = meter.usage
        if meter is not None and meter.usage_invalid:
            actual = ticket.amount  # it answered with an impossible usage: bill unknown
        elif usage is not None:
            actual = cost(ticket.price, usage.prompt_tokens, usage.completion_tokens,
                          usage.cached_tokens)
        elif meter is not None:
            actual = cost(ticket.price, est.prompt_max, meter.completion_estimate())
        else:
            actual = ticket.amount
        if ticket.rid is None:
            return actual
        assert self._store is not None
        try:
            await self._store.settle(ticket.rid, actual)
        except LedgerUnavailable as e:
            if self._budgets_closed:
                raise Unavailable(f"The answer's cost could not be recorded: {e}",
                                  retry_after_s=1.0) from None
            log.warning("spend not recorded (its reservation will count as spent): %s", e)
        return actual

    async def release(self, ticket: Ticket | None) -> None:
        if ticket is None or ticket.rid is None:
            return
        assert self._store is not None
        try:
            await self._store.release(ticket.rid)
        except LedgerUnavailable as e:  # it expires, spent at its worst case: never lost
            log.warning("reservation not released (it will count as spent): %s", e)

    async def views(self, identity: str | None, auth: bool) -> list[BudgetView]:
        """Every budget's current window; with auth on, per-key budgets of ``identity`` only."""
        if not self._budgets:
            return []
        assert self._store is not None
        now = self._clock()
        rows: list[tuple[BudgetConfig, BudgetKey]] = []
        for b in self._budgets:
            subjects: Iterable[str]
            if b.scope == "global":
                subjects = ["*"]
            elif b.scope == "key":
                subjects = [b.key] if b.key else list(self._keys) or []
                if auth:
                    subjects = [s for s in subjects if s == identity] or (
                        [identity] if identity and b.key is None else [])
            else:
                subjects = [b.provider] if b.provider else [
                    p.name for p in self._config.providers if not p.free]
            rows += [(b, BudgetKey(b.name, s, window_of(b.window, now))) for s in subjects]
        try:
            totals = await self._store.totals([k for _, k in rows])
        except LedgerUnavailable as e:
            raise Unavailable(f"The budget ledger is unavailable: {e}",
                              retry_after_s=1.0) from None
        out = []
        for b, key in rows:
            t = totals[key]
            limit = _micro(b.limit_usd)
            reset = window_reset(b.window, now)
            out.append(BudgetView(
                b.name, b.scope, key.subject, key.window, format_usd(limit),
                format_usd(t.spent), format_usd(t.reserved),
                format_usd(max(0, limit - t.spent - t.reserved)), b.on_exhausted,
                _iso(reset) if reset is not None else None,
            ))
        return out


    async def aclose(self) -> None:
        if self._pending:
            await asyncio.wait(set(self._pending))
        if self._store is not None:
            await self._store.aclose()
        await self._limiter.aclose()


def _micro(usd: float) -> int:
    return round(usd * 1_000_000)


def _iso(epoch: float) -> str:
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).isoformat().replace(
        "+00:00", "Z")


def _requests(rpm: float) -> Rate:
    """Requests: bursts of a tenth of a minute's worth (at least one)."""
    return Rate(rpm / 60.0, max(1.0, rpm / 10.0))


def _tokens(tpm: float) -> Rate:
    """Tokens: bursts of a tenth of a minute's worth."""
    return Rate(tpm / 60.0, max(1.0, tpm / 10.0))


def _rates(prefix: str, what: str, rpm: float | None, tpm: float | None, est: Estimate
           ) -> Sequence[tuple[str, str, Rate, float]]:
    out: list[tuple[str, str, Rate, float]] = []
    if rpm:
        out.append((f"{prefix}:rpm", what, _requests(rpm), 1.0))
    if tpm:
        out.append((f"{prefix}:tpm", what, _tokens(tpm), float(est.prompt_guess)))
    return out
