"""The gateway's request outcomes (sidecar.gateway.outcome), observed once per request
however it ends, over scripted providers."""

from __future__ import annotations

import asyncio
import random

import pytest

from sidecar.errors import AllTargetsFailed, ModelNotFound, UpstreamServerError
from sidecar.gateway import Context, Gateway, Outcome
from tests.support.process import wait_until
from tests.support.scripted import Answer, Fail, FailAfter, Hang, ScriptedProvider
from tests.unit.test_pipeline import chat, config, drain


class Rig:
    def __init__(self) -> None:
        self.a, self.b = ScriptedProvider("a"), ScriptedProvider("b")
        self.seen: list[Outcome] = []
        self.gateway = Gateway(config(), {"a": self.a, "b": self.b,
                                          "free": ScriptedProvider("free")},
                               rng=random.Random(1), observers=[self.seen.append])

    def ctx(self) -> Context:
        return Context("rid-1", self.gateway.deadline(30))


@pytest.fixture
async def rig() -> Rig:
    return Rig()


async def test_an_answer_after_a_failover(rig: Rig) -> None:
    rig.a.script("x", Fail(UpstreamServerError))
    rig.b.script("y", Answer("hi", prompt_tokens=4, completion_tokens=6))
    await rig.gateway.complete(chat(), rig.ctx())
    [o] = rig.seen
    assert (o.request_id, o.op, o.model, o.route, o.direct) == (
        "rid-1", "chat/completions", "chat", "chat", False)
    assert (o.target, o.attempts, o.retries, o.reasons) == (
        "b/y", 2, 0, ("fallback:upstream_5xx",))
    assert (o.status, o.error, o.stream) == (200, None, False)
    assert (o.prompt_tokens, o.completion_tokens, o.ttft_s) == (4, 6, None)
    assert o.duration_s >= 0


async def test_failures_and_unknown_models(rig: Rig) -> None:
    rig.a.script("x", Fail(UpstreamServerError))
    rig.b.script("y", Fail(UpstreamServerError))
    with pytest.raises(AllTargetsFailed):
        await rig.gateway.complete(chat(), rig.ctx())
    with pytest.raises(ModelNotFound):
        await rig.gateway.complete(chat("nope"), rig.ctx())
    failed, unknown = rig.seen
    assert (failed.status, failed.error, failed.target, failed.attempts) == (
        502, "all_targets_failed", None, 2)
    assert failed.reasons == ("fallback:upstream_5xx",)
    assert (unknown.status, unknown.route, unknown.attempts) == (404, None, 0)


async def test_a_direct_target_is_marked_direct(rig: Rig) -> None:
    rig.a.script("anything", Answer())
    await rig.gateway.complete(chat("a/anything"), rig.ctx())
    assert rig.seen[0].direct and rig.seen[0].route == "a/anything"


async def test_a_stream_is_observed_when_it_ends(rig: Rig) -> None:
    rig.a.script("x", Answer("a b c", frames=3, completion_tokens=3))
    streaming = await rig.gateway.stream(chat(stream=True), rig.ctx())
    assert rig.seen == []  # not before its end
    await drain(streaming)
    [o] = rig.seen
    assert (o.status, o.stream, o.target, o.completion_tokens) == (200, True, "a/x", 3)
    assert o.ttft_s is not None and 0 <= o.ttft_s <= o.duration_s


async def test_a_stream_that_breaks_or_is_left(rig: Rig) -> None:
    rig.a.script("x", FailAfter(2, UpstreamServerError))
    await drain(await rig.gateway.stream(chat(stream=True), rig.ctx()))
    rig.a.script("x", Hang(after_frames=2))
    await drain(await rig.gateway.stream(chat(stream=True), rig.ctx()), limit=1)
    broken, left = rig.seen
    assert (broken.status, broken.error, broken.target) == (502, "upstream_5xx", "a/x")
    assert (left.status, left.error) == (499, None)


async def test_a_client_that_leaves_a_call(rig: Rig) -> None:
    rig.a.script("x", Hang())
    task = asyncio.ensure_future(rig.gateway.complete(chat(), rig.ctx()))
    await wait_until(lambda: bool(rig.a.calls))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert [o.status for o in rig.seen] == [499]


async def test_an_observer_that_raises_does_not_fail_the_request() -> None:
    def broken(_: Outcome) -> None:
        raise RuntimeError("observer bug")

    a = ScriptedProvider("a")
    gateway = Gateway(config(), {"a": a, "b": ScriptedProvider("b"),
                                 "free": ScriptedProvider("free")}, observers=[broken])
    a.script("x", Answer("fine"))
    done = await gateway.complete(chat(), Context("r", gateway.deadline(30)))
    assert done.target == "a/x"
