"""The gateway pipeline in-process: failover, retries, circuits, limits and deadlines over
scripted providers (tests/support/scripted.py), with no network and no model.

Streams are read only through :func:`drain` (the stream API is about to change: only that
adapter should need rewriting).
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import pytest

from sidecar.config import Config, parse_config
from sidecar.errors import (
    AllTargetsFailed,
    BudgetRejected,
    DeadlineExceeded,
    RateLimited,
    Unauthenticated,
    Unavailable,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamServerError,
    UpstreamTimeout,
    UpstreamUnsupported,
)
from sidecar.gateway import Context, Ended, Failed, Gateway, Streaming, error_body
from sidecar.limits import MemoryRateLimiter
from sidecar.money import Accountant, MemoryBudgetStore
from sidecar.types import Call, Op, validate_call
from tests.support.scripted import Answer, Fail, FailAfter, Hang, ScriptedProvider

# --- the one stream adapter ------------------------------------------------------------------


async def drain(streaming: Streaming, limit: int | None = None
                ) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Read a committed stream: (the chunks relayed, in order; the error envelope of its
    :class:`Failed` event, or None when it :class:`Ended`). ``limit``: stop after that many
    chunks and close the stream (as a client that leaves)."""
    chunks: list[dict[str, Any]] = []
    events = streaming.events
    try:
        async for event in events:
            if isinstance(event, Ended):
                return chunks, None
            if isinstance(event, Failed):
                return chunks, json.loads(error_body(event.error))
            assert event.frame.endswith(b"\n\n")
            for block in event.frame.split(b"\n\n")[:-1]:
                assert block.startswith(b"data: "), block
                chunks.append(json.loads(block[len(b"data: "):]))
                if limit is not None and len(chunks) >= limit:
                    return chunks, None
        raise AssertionError("the stream ended without Ended or Failed")
    finally:
        if isinstance(events, AsyncGenerator):
            await events.aclose()


def text_of(chunks: list[dict[str, Any]]) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


# --- building a gateway ----------------------------------------------------------------------


class Clock:
    """The loop's clock, which a test can move ahead (circuit cooldowns)."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.offset = 0.0

    def __call__(self) -> float:
        return self._loop.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


def config(*, routes: list[dict[str, Any]] | None = None, **extra: Any) -> Config:
    """Providers ``a`` and ``b`` (paid-unknown), ``free`` (free = true); route ``chat`` =
    a/x then b/y; no same-target retries and millisecond backoff unless ``routing`` says."""
    routing = {"retries": 0, "backoff_base_s": 0.001, "backoff_max_s": 0.002,
               **extra.pop("routing", {})}
    data: dict[str, Any] = {
        "routing": routing,
        "state": {"backend": "memory"},
        "providers": [{"name": "a", "type": "openai"}, {"name": "b", "type": "openai"},
                      {"name": "free", "type": "openai", "free": True}],
        "routes": routes or [{"model": "chat", "targets": [
            {"provider": "a", "model": "x"}, {"provider": "b", "model": "y"}]}],
        **extra,
    }
    return parse_config(data, env={})


class Rig:
    """A gateway over scripted providers ``a``, ``b`` and ``free``."""

    def __init__(self, cfg: Config, *, budgets: bool = False,
                 a_ops: tuple[Op, ...] = tuple(Op)) -> None:
        self.clock = Clock()
        self.a = ScriptedProvider("a", ops=a_ops)
        self.b = ScriptedProvider("b")
        self.free = ScriptedProvider("free")
        accountant = (Accountant(cfg, MemoryBudgetStore(), MemoryRateLimiter())
                      if budgets else None)
        self.gateway = Gateway(cfg, {"a": self.a, "b": self.b, "free": self.free},
                               accountant=accountant, clock=self.clock, rng=random.Random(7))

    def ctx(self, timeout_s: float = 30.0) -> Context:
        return Context("req-1", self.gateway.deadline(timeout_s))


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    r = Rig(config())
    yield r
    await r.gateway.aclose()


def chat(model: str = "chat", **fields: Any) -> Call:
    raw = {"model": model, "messages": [{"role": "user", "content": "hi"}], **fields}
    return validate_call(Op.CHAT, raw)


def content(reply_body: bytes) -> str:
    return json.loads(reply_body)["choices"][0]["message"]["content"]  # type: ignore[no-any-return]


# --- complete(): where a call goes --------------------------------------------------------


async def test_primary_serves(rig: Rig) -> None:
    rig.a.script("x", Answer("from a"))
    done = await rig.gateway.complete(chat(), rig.ctx())
    assert (done.target, done.attempts, done.reason) == ("a/x", 1, "primary")
    assert content(done.reply.body) == "from a"
    assert done.reply.usage is not None and done.reply.usage.total_tokens == 5
    assert not rig.b.calls
    assert rig.gateway.reasons["primary"] == 1


async def test_failover_on_5xx(rig: Rig) -> None:
    rig.a.script("x", Fail(UpstreamServerError))
    rig.b.script("y", Answer("from b"))
    done = await rig.gateway.complete(chat(), rig.ctx())
    assert (done.target, done.attempts, done.reason) == ("b/y", 2, "fallback:upstream_5xx")
    assert content(done.reply.body) == "from b"
    assert [r.outcome for r in rig.a.calls] == ["error"]
    assert rig.gateway.health.circuit("a/x").failures == 1


async def test_retries_the_same_target_within_retries() -> None:
    rig = Rig(config(routing={"retries": 2}))
    rig.a.script("x", Fail(UpstreamServerError), Fail(UpstreamServerError), Answer("third"))
    done = await rig.gateway.complete(chat(), rig.ctx())
    assert (done.target, done.attempts) == ("a/x", 3)
    assert content(done.reply.body) == "third" and not rig.b.calls
    # retries used up: the next failure moves on
    rig.a.default("x", Fail(UpstreamServerError))
    done = await rig.gateway.complete(chat(), rig.ctx())
    assert (done.target, done.attempts) == ("b/y", 4)
    assert len(rig.a.calls) == 3 + 3


async def test_a_route_overrides_retries() -> None:
    routes = [{"model": "chat", "retries": 1, "targets": [{"provider": "a", "model": "x"},
                                                          {"provider": "b", "model": "y"}]}]
    rig = Rig(config(routes=routes, routing={"retries": 5}))
    rig.a.default("x", Fail(UpstreamServerError))
    done = await rig.gateway.complete(chat(), rig.ctx())
    assert (done.target, done.attempts) == ("b/y", 3) and len(rig.a.calls) == 2


async def test_retry_after_is_honoured() -> None:
    rig = Rig(config(routing={"retries": 1}))
    rig.a.script("x", Fail(UpstreamRateLimited, retry_after_s=0.05), Answer())
    start = rig.clock()
    done = await rig.gateway.complete(chat(), rig.ctx())
    assert (done.target, done.attempts, done.reason) == ("a/x", 2, "fallback:upstream_429")
    assert rig.clock() - start >= 0.045  # waited for it (the circuit allows 5 ms of slack)
    assert not rig.b.calls


async def test_retry_after_over_the_maximum_is_not_waited_for() -> None:
    rig = Rig(config(routing={"retries": 3, "max_retry_after_s": 1.0}))
    rig.a.script("x", Fail(UpstreamServerError, retry_after_s=3.0))
    start = rig.clock()
    done = await rig.gateway.complete(chat(), rig.ctx())
    assert (done.target, done.attempts) == ("b/y", 2)
    assert len(rig.a.calls) == 1 and rig.clock() - start < 1.0
    # the Retry-After holds the target for the next request, without a call
    again = await rig.gateway.complete(chat(), rig.ctx())
    assert again.target == "b/y" and again.reason == "fallback:upstream_429"
    assert len(rig.a.calls) == 1


async def test_the_retry_budget_caps_retries() -> None:
    rig = Rig(config(routing={"retries": 1, "retry_budget_min": 1, "retry_budget_ratio": 0}))
    rig.a.default("x", Fail(UpstreamServerError))
    first = await rig.gateway.complete(chat(), rig.ctx())
    assert (first.target, first.attempts) == ("b/y", 3)  # one retry on a/x, then b/y
    second = await rig.gateway.complete(chat(), rig.ctx())
    assert (second.target, second.attempts) == ("b/y", 2)  # the budget is spent: no retry
    assert len(rig.a.calls) == 3


async def test_circuit_opens_and_the_route_skips_it() -> None:
    rig = Rig(config(routing={"circuit_failures": 2, "circuit_cooldown_s": 10.0}))
    rig.a.default("x", Fail(UpstreamServerError))
    for _ in range(2):
        assert (await rig.gateway.complete(chat(), rig.ctx())).target == "b/y"
    assert len(rig.a.calls) == 2
    skipped = await rig.gateway.complete(chat(), rig.ctx())
    assert (skipped.target, skipped.attempts, skipped.reason) == (
        "b/y", 1, "fallback:circuit_open")
    assert len(rig.a.calls) == 2  # not called
    # after the cooldown one probe goes through; its success closes the circuit
    rig.clock.advance(10.0)
    rig.a.script("x", Answer("probe"))
    probe = await rig.gateway.complete(chat(), rig.ctx())
    assert (probe.target, probe.reason) == ("a/x", "primary")
    assert rig.gateway.health.circuit("a/x").failures == 0


async def test_all_circuits_open_is_503_with_retry_after() -> None:
    rig = Rig(config(routing={"circuit_failures": 1, "circuit_cooldown_s": 20.0}))
    rig.a.default("x", Fail(UpstreamServerError))
    rig.b.default("y", Fail(UpstreamServerError))
    with pytest.raises(AllTargetsFailed) as first:
        await rig.gateway.complete(chat(), rig.ctx())
    assert first.value.status == 502
    rig.clock.advance(5.0)
    with pytest.raises(Unavailable) as e:
        await rig.gateway.complete(chat(), rig.ctx())
    assert e.value.status == 503 and "circuit open" in e.value.message
    assert e.value.retry_after_s == pytest.approx(15.0, abs=0.1)
    assert len(rig.a.calls) == len(rig.b.calls) == 1


async def test_non_retryable_rejection_is_not_failed_over(rig: Rig) -> None:
    rig.a.script("x", Fail(UpstreamRejected, status=400))
    with pytest.raises(UpstreamRejected) as e:
        await rig.gateway.complete(chat(), rig.ctx())
    assert e.value.status == 400 and e.value.target == "a/x"
    assert len(rig.a.calls) == 1 and not rig.b.calls
    assert rig.gateway.health.circuit("a/x").failures == 0  # it answered


async def test_every_target_rate_limited_is_429_with_the_shortest_wait(rig: Rig) -> None:
    rig.a.script("x", Fail(UpstreamRateLimited, retry_after_s=20.0))
    rig.b.script("y", Fail(UpstreamRateLimited, retry_after_s=7.0))
    with pytest.raises(RateLimited) as e:
        await rig.gateway.complete(chat(), rig.ctx())
    assert e.value.status == 429 and e.value.retry_after_s == 7.0
    assert len(rig.a.calls) == len(rig.b.calls) == 1


async def test_all_time_out_is_504(rig: Rig) -> None:
    rig.a.script("x", Fail(UpstreamTimeout))
    rig.b.script("y", Fail(UpstreamTimeout))
    with pytest.raises(DeadlineExceeded) as e:
        await rig.gateway.complete(chat(), rig.ctx())
    assert e.value.status == 504 and "timed out" in e.value.message


async def test_mixed_failures_are_502_naming_the_last(rig: Rig) -> None:
    rig.a.script("x", Fail(UpstreamTimeout))
    rig.b.script("y", Fail(UpstreamServerError))
    with pytest.raises(AllTargetsFailed) as e:
        await rig.gateway.complete(chat(), rig.ctx())
    assert e.value.status == 502 and "b/y" in e.value.message


async def test_unsupported_moves_on_without_a_health_verdict(rig: Rig) -> None:
    rig.a.script("x", Fail(UpstreamUnsupported))
    done = await rig.gateway.complete(chat(), rig.ctx())
    assert (done.target, done.reason) == ("b/y", "fallback:unsupported")
    assert rig.gateway.health.circuit("a/x").failures == 0


async def test_a_target_without_the_operation_is_passed_over() -> None:
    rig = Rig(config(), a_ops=(Op.CHAT,))
    call = validate_call(Op.EMBEDDINGS, {"model": "chat", "input": "x"})
    done = await rig.gateway.complete(call, rig.ctx())
    assert (done.target, done.attempts, done.reason) == ("b/y", 1, "primary")
    assert not rig.a.calls


async def test_a_hung_first_target_is_cut_at_its_share(rig: Rig) -> None:
    rig.a.script("x", Hang())
    start = rig.clock()
    done = await rig.gateway.complete(chat(), rig.ctx(timeout_s=0.4))
    elapsed = rig.clock() - start
    assert (done.target, done.attempts, done.reason) == ("b/y", 2, "fallback:timeout")
    assert 0.19 <= elapsed < 0.4  # attempt_share 0.5 of 0.4 s
    assert [r.outcome for r in rig.a.calls] == ["cancelled"]
    assert rig.gateway.health.circuit("a/x").failures == 1


async def test_the_deadline_ends_a_hung_last_target(rig: Rig) -> None:
    rig.a.script("x", Fail(UpstreamServerError))
    rig.b.script("y", Hang())
    with pytest.raises(DeadlineExceeded) as e:
        await rig.gateway.complete(chat(), rig.ctx(timeout_s=0.1))
    assert e.value.status == 504 and "a/x" in e.value.message  # the last failure is named
    assert [r.outcome for r in rig.b.calls] == ["cancelled"]
    assert rig.gateway.health.circuit("b/y").failures == 0  # the deadline is not its fault


async def test_a_deadline_already_passed_calls_nothing(rig: Rig) -> None:
    ctx = rig.ctx()
    rig.clock.advance(31.0)
    with pytest.raises(DeadlineExceeded):
        await rig.gateway.complete(chat(), ctx)
    assert not rig.a.calls and not rig.b.calls


async def test_the_attempt_gets_the_time_left(rig: Rig) -> None:
    await rig.gateway.complete(chat(), rig.ctx(timeout_s=12.0))
    assert 11.0 < rig.a.calls[0].timeout_s <= 12.0


async def test_cancelling_the_caller_cancels_the_call(rig: Rig) -> None:
    rig.a.script("x", Hang())
    task = asyncio.create_task(rig.gateway.complete(chat(), rig.ctx()))
    await rig.a.wait_for(1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert [r.outcome for r in rig.a.calls] == ["cancelled"] and not rig.b.calls
    assert rig.gateway.tracker.stats()["a/x"].in_flight == 0


# --- budgets and auth -----------------------------------------------------------------------

BUDGET_ROUTES = [{"model": "chat", "targets": [{"provider": "a", "model": "x"},
                                               {"provider": "free", "model": "z"}]}]


def budget_config(on_exhausted: str, limit_usd: float = 0.0) -> Config:
    return config(routes=BUDGET_ROUTES,
                  prices={"a/x": {"input": 1.0, "output": 2.0}},
                  budgets=[{"name": "daily", "limit_usd": limit_usd,
                            "on_exhausted": on_exhausted}])


async def test_budget_exhausted_skips_paid_targets() -> None:
    rig = Rig(budget_config("local"), budgets=True)
    done = await rig.gateway.complete(chat(), rig.ctx())
    assert (done.target, done.attempts, done.reason) == ("free/z", 1, "fallback:budget")
    assert done.cost == 0 and not rig.a.calls


async def test_budget_exhausted_with_reject_is_429() -> None:
    rig = Rig(budget_config("reject"), budgets=True)
    with pytest.raises(BudgetRejected) as e:
        await rig.gateway.complete(chat(), rig.ctx())
    assert e.value.status == 429 and e.value.code == "budget_exhausted"
    assert not rig.a.calls and not rig.free.calls


async def test_budget_pays_and_records_the_cost() -> None:
    rig = Rig(budget_config("local", limit_usd=1.0), budgets=True)
    rig.a.script("x", Answer(prompt_tokens=1000, completion_tokens=500))
    done = await rig.gateway.complete(chat(max_tokens=600), rig.ctx())
    assert done.target == "a/x" and done.cost == 1000 * 1 + 500 * 2  # µ$


async def test_authenticate() -> None:
    rig = Rig(config(server={"api_keys": ["sk-anon"]},
                     keys=[{"name": "alice", "key": "sk-alice"}]))
    assert rig.gateway.auth
    assert rig.gateway.authenticate("sk-anon") == "api_keys[0]"
    assert rig.gateway.authenticate("sk-alice") == "alice"
    with pytest.raises(Unauthenticated, match="Missing"):
        rig.gateway.authenticate(None)
    with pytest.raises(Unauthenticated, match="Incorrect") as e:
        rig.gateway.authenticate("sk-alic")
    assert e.value.status == 401
    open_rig = Rig(config())
    assert not open_rig.gateway.auth and open_rig.gateway.authenticate(None) is None


# --- stream() -------------------------------------------------------------------------------


async def test_stream_primary(rig: Rig) -> None:
    rig.a.script("x", Answer("streamed text", frames=3))
    streaming = await rig.gateway.stream(chat(stream=True), rig.ctx())
    assert (streaming.target, streaming.attempts, streaming.reason) == ("a/x", 1, "primary")
    chunks, error = await drain(streaming)
    assert error is None and text_of(chunks) == "streamed text"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert [r.outcome for r in rig.a.calls] == ["ok"]


async def test_stream_fails_over_before_its_first_frame(rig: Rig) -> None:
    rig.a.script("x", Fail(UpstreamServerError))
    rig.b.script("y", Answer("from b"))
    streaming = await rig.gateway.stream(chat(stream=True), rig.ctx())
    assert (streaming.target, streaming.attempts, streaming.reason) == (
        "b/y", 2, "fallback:upstream_5xx")
    chunks, error = await drain(streaming)
    assert error is None and text_of(chunks) == "from b"


async def test_stream_that_ends_before_any_frame_fails_over(rig: Rig) -> None:
    rig.a.script("x", FailAfter(0, UpstreamServerError))
    streaming = await rig.gateway.stream(chat(stream=True), rig.ctx())
    assert streaming.target == "b/y"
    assert (await drain(streaming))[1] is None


async def test_stream_hung_before_its_first_frame_is_cut(rig: Rig) -> None:
    rig.a.script("x", Hang())
    streaming = await rig.gateway.stream(chat(stream=True), rig.ctx(timeout_s=0.4))
    assert (streaming.target, streaming.reason) == ("b/y", "fallback:timeout")
    assert [r.outcome for r in rig.a.calls] == ["cancelled"]
    assert (await drain(streaming))[1] is None


async def test_mid_stream_failure_ends_with_an_error_event(rig: Rig) -> None:
    rig.a.script("x", FailAfter(2, UpstreamServerError))
    streaming = await rig.gateway.stream(chat(stream=True), rig.ctx())
    assert streaming.target == "a/x"  # committed at the first frame
    chunks, error = await drain(streaming)
    assert len(chunks) == 2 and text_of(chunks)
    assert error is not None and error["error"]["code"] == "upstream_5xx"
    assert not rig.b.calls  # a committed stream is never moved
    assert rig.gateway.health.circuit("a/x").failures == 1


async def test_mid_stream_deadline_ends_with_a_504_event(rig: Rig) -> None:
    rig.a.script("x", Hang(after_frames=1))
    streaming = await rig.gateway.stream(chat(stream=True), rig.ctx(timeout_s=0.1))
    chunks, error = await drain(streaming)
    assert len(chunks) == 1
    assert error is not None and error["error"]["code"] == "deadline_exceeded"
    assert [r.outcome for r in rig.a.calls] == ["cancelled"]  # its wait was cancelled


async def test_closing_a_stream_closes_the_call(rig: Rig) -> None:
    rig.a.script("x", Hang(after_frames=2))
    streaming = await rig.gateway.stream(chat(stream=True), rig.ctx())
    chunks, _ = await drain(streaming, limit=1)
    assert len(chunks) == 1
    assert [r.outcome for r in rig.a.calls] == ["closed"]
    assert rig.gateway.tracker.stats()["a/x"].in_flight == 0


async def test_every_stream_target_failing_raises_before_any_frame(rig: Rig) -> None:
    rig.a.script("x", Fail(UpstreamServerError))
    rig.b.script("y", Fail(UpstreamTimeout))
    with pytest.raises(AllTargetsFailed):
        await rig.gateway.stream(chat(stream=True), rig.ctx())
