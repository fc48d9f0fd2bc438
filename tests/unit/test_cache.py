"""The response cache: its policy (pure) and its place in the gateway pipeline, in-process
over scripted providers (hits, misses, bypasses, streams replayed, what is never kept)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from sidecar.cache import CachePlan, MemoryCacheStore, directive_of, plan
from sidecar.cache.entry import Entry, decode_entry, encode_entry
from sidecar.cache.policy import cache_key
from sidecar.cache.store_redis import RedisCacheStore
from sidecar.config import Config
from sidecar.errors import AllTargetsFailed, InvalidRequest, UpstreamServerError
from sidecar.gateway import Context, Gateway
from sidecar.gateway.cached import ResponseCache
from sidecar.routing import Route, Target
from sidecar.types import Op, Usage, validate_call
from tests.support.scripted import Answer, Fail, FailAfter
from tests.unit.test_pipeline import Rig, chat, config, content, drain, text_of

CACHED = [{"model": "chat", "cache": True,
           "targets": [{"provider": "a", "model": "x"}, {"provider": "b", "model": "y"}]}]
ROUTE = Route("chat", "priority", (Target("a", "x"),), 0, cache_ttl_s=60.0)


def cached_config(**route: Any) -> Config:
    return config(routes=[{**CACHED[0], **route}])


# --- the client's word --------------------------------------------------------------------


@pytest.mark.parametrize(("meta", "expected"), [
    ({}, "default"),
    ({"x-sidecar-cache": "off"}, "no-store"),
    ({"x-sidecar-cache": " OFF "}, "no-store"),
    ({"x-sidecar-cache": "refresh"}, "no-cache"),
    ({"x-sidecar-cache": "on", "cache-control": "no-store"}, "default"),
    ({"cache-control": "no-store"}, "no-store"),
    ({"cache-control": "max-age=0, No-Cache"}, "no-cache"),
    ({"cache-control": "no-cache, no-store"}, "no-store"),
    ({"cache-control": "max-age=60"}, "default"),
])
def test_directive_of(meta: dict[str, str], expected: str) -> None:
    assert directive_of(meta) == expected


def test_an_unknown_cache_header_value_is_refused() -> None:
    with pytest.raises(InvalidRequest) as e:
        directive_of({"x-sidecar-cache": "yes please"})
    assert e.value.param == "x-sidecar-cache" and e.value.status == 400


# --- the route's word and the key ---------------------------------------------------------


def test_only_deterministic_requests_are_planned() -> None:
    assert plan(chat(temperature=0), ROUTE, None, "default") is not None
    assert plan(chat(seed=7, temperature=1.2), ROUTE, None, "default") is not None
    assert plan(chat(), ROUTE, None, "default") is None  # sampled at the default temperature
    assert plan(chat(temperature=0.7), ROUTE, None, "default") is None
    embed = validate_call(Op.EMBEDDINGS, {"model": "chat", "input": "hi"})
    assert plan(embed, ROUTE, None, "default") is not None
    sampled = Route("chat", "priority", ROUTE.targets, 0, cache_ttl_s=5.0,
                    cache_nondeterministic=True)
    found = plan(chat(temperature=0.7), sampled, None, "default")
    assert found is not None and found.ttl_s == 5.0


def test_no_route_cache_or_no_store_plans_nothing() -> None:
    plain = Route("chat", "priority", ROUTE.targets, 0)
    assert plan(chat(temperature=0), plain, None, "default") is None
    assert plan(chat(temperature=0), ROUTE, None, "no-store") is None
    refresh = plan(chat(temperature=0), ROUTE, None, "no-cache")
    assert refresh is not None and not refresh.read and refresh.write


def test_the_key_covers_what_changes_the_answer_and_only_that() -> None:
    base = cache_key(chat(temperature=0), ROUTE, "alice")
    reordered = validate_call(Op.CHAT, {"temperature": 0, "messages": [
        {"content": "hi", "role": "user"}], "model": "chat"})
    assert cache_key(reordered, ROUTE, "alice") == base
    assert cache_key(chat(temperature=0, user="u-1", metadata={"a": "b"}), ROUTE,
                     "alice") == base
    different = [
        cache_key(chat(temperature=0), ROUTE, "bob"),
        cache_key(chat(temperature=0), ROUTE, None),
        cache_key(chat(temperature=0, max_tokens=5), ROUTE, "alice"),
        cache_key(chat(temperature=0, stream=True), ROUTE, "alice"),
        cache_key(chat(temperature=0), Route("chat", "priority", (Target("b", "y"),), 0,
                                             cache_ttl_s=60.0), "alice"),
        cache_key(validate_call(Op.CHAT, {"model": "chat", "temperature": 0, "messages": [
            {"role": "user", "content": "hi!"}]}), ROUTE, "alice"),
    ]
    assert len({base, *different}) == len(different) + 1


def test_entries_round_trip_and_garbage_is_none() -> None:
    entry = Entry("a/x", 1.5, Usage(1, 2, 3), body=b"{}")
    assert decode_entry(encode_entry(entry)) == entry
    assert decode_entry(b"\x93not an entry") is None
    assert decode_entry(b"") is None
    both = Entry("a/x", 1.5, body=b"{}", frames=[b"data: x\n\n"])
    assert decode_entry(encode_entry(both)) is None


# --- in the pipeline ----------------------------------------------------------------------


def ctx(rig: Rig, directive: str = "default", identity: str | None = None) -> Context:
    return Context("req-1", rig.gateway.deadline(30.0), identity, directive)  # type: ignore[arg-type]


async def test_a_repeated_request_is_a_hit_without_a_call_or_a_cost() -> None:
    rig = Rig(cached_config())
    rig.a.script("x", Answer("first"), Answer("second"))
    first = await rig.gateway.complete(chat(temperature=0), ctx(rig))
    again = await rig.gateway.complete(chat(temperature=0), ctx(rig))
    assert (first.cache, first.attempts, first.reason) == ("miss", 1, "primary")
    assert (again.cache, again.attempts, again.reason, again.cost) == ("hit", 0, "cache:hit", 0)
    assert again.target == "a/x" and again.reply.body == first.reply.body
    assert content(again.reply.body) == "first" and len(rig.a.calls) == 1
    assert again.reply.usage == first.reply.usage
    assert rig.gateway.reasons["cache:hit"] == 1
    await rig.gateway.aclose()


async def test_sampled_requests_and_opt_outs_bypass() -> None:
    rig = Rig(cached_config())
    rig.a.default("x", Answer("fresh"))
    sampled = await rig.gateway.complete(chat(temperature=0.9), ctx(rig))
    await rig.gateway.complete(chat(temperature=0.9), ctx(rig))
    assert sampled.cache == "bypass" and len(rig.a.calls) == 2
    await rig.gateway.complete(chat(temperature=0), ctx(rig, "no-store"))
    stored = await rig.gateway.complete(chat(temperature=0), ctx(rig))
    assert stored.cache == "miss" and len(rig.a.calls) == 4  # no-store kept nothing
    assert (await rig.gateway.complete(chat(temperature=0), ctx(rig))).cache == "hit"
    rig.a.default("x", Answer("newer"))
    refreshed = await rig.gateway.complete(chat(temperature=0), ctx(rig, "no-cache"))
    assert refreshed.cache == "miss" and content(refreshed.reply.body) == "newer"
    hit = await rig.gateway.complete(chat(temperature=0), ctx(rig))
    assert hit.cache == "hit" and content(hit.reply.body) == "newer"
    await rig.gateway.aclose()


async def test_a_route_without_the_cache_says_nothing() -> None:
    rig = Rig(config())
    done = await rig.gateway.complete(chat(temperature=0), ctx(rig))
    assert done.cache is None and rig.gateway.cache is None
    await rig.gateway.aclose()


async def test_each_client_key_has_its_own_answers() -> None:
    rig = Rig(cached_config())
    await rig.gateway.complete(chat(temperature=0), ctx(rig, identity="alice"))
    other = await rig.gateway.complete(chat(temperature=0), ctx(rig, identity="bob"))
    assert other.cache == "miss" and len(rig.a.calls) == 2
    await rig.gateway.aclose()


async def test_failures_are_not_kept() -> None:
    rig = Rig(cached_config())
    rig.a.script("x", Fail(UpstreamServerError))
    rig.b.script("y", Fail(UpstreamServerError))
    with pytest.raises(AllTargetsFailed):
        await rig.gateway.complete(chat(temperature=0), ctx(rig))
    done = await rig.gateway.complete(chat(temperature=0), ctx(rig))
    assert done.cache == "miss" and done.attempts == 1
    await rig.gateway.aclose()


async def test_a_stream_is_replayed_frame_for_frame() -> None:
    rig = Rig(cached_config())
    rig.a.script("x", Answer("one two three", frames=3))
    first = await rig.gateway.stream(chat(temperature=0, stream=True), ctx(rig))
    first_chunks, error = await drain(first)
    assert error is None and first.cache == "miss"
    again = await rig.gateway.stream(chat(temperature=0, stream=True), ctx(rig))
    assert (again.cache, again.attempts, again.cost, again.reason) == ("hit", 0, 0, "cache:hit")
    again_chunks, error = await drain(again)
    assert error is None and again_chunks == first_chunks
    assert text_of(again_chunks) == "one two three" and len(rig.a.calls) == 1
    # A stream is never answered from a body, nor a body from a stream.
    body = await rig.gateway.complete(chat(temperature=0), ctx(rig))
    assert body.cache == "miss" and len(rig.a.calls) == 2
    await rig.gateway.aclose()


async def test_a_broken_or_abandoned_stream_is_not_kept() -> None:
    rig = Rig(cached_config(targets=[{"provider": "a", "model": "x"}]))
    rig.a.script("x", FailAfter(2, UpstreamServerError), Answer(frames=4), Answer(frames=4))
    broken = await rig.gateway.stream(chat(temperature=0, stream=True), ctx(rig))
    _, error = await drain(broken)
    assert error is not None
    left = await rig.gateway.stream(chat(temperature=0, stream=True), ctx(rig))
    assert left.cache == "miss"
    await drain(left, limit=1)  # the client leaves after one chunk
    whole = await rig.gateway.stream(chat(temperature=0, stream=True), ctx(rig))
    assert whole.cache == "miss"
    await drain(whole)
    hit = await rig.gateway.stream(chat(temperature=0, stream=True), ctx(rig))
    assert hit.cache == "hit" and len(rig.a.calls) == 3
    await drain(hit)
    await rig.gateway.aclose()


async def test_an_answer_over_max_entry_bytes_is_served_not_kept() -> None:
    rig = Rig(config(routes=CACHED, cache={"max_entry_bytes": 256}))
    rig.a.default("x", Answer("x" * 400, frames=4))
    for _ in range(2):
        assert (await rig.gateway.complete(chat(temperature=0), ctx(rig))).cache == "miss"
        streaming = await rig.gateway.stream(chat(temperature=0, stream=True), ctx(rig))
        assert streaming.cache == "miss"
        await drain(streaming)
    assert len(rig.a.calls) == 4
    await rig.gateway.aclose()


async def test_an_unreachable_store_is_a_miss_and_the_request_is_served() -> None:
    cfg = cached_config()
    store = RedisCacheStore("redis://127.0.0.1:1/0", prefix="t:", timeout_s=0.2,
                            max_bytes=2**20, max_entry_bytes=2**16)
    rig = Rig(cfg)
    gateway = Gateway(cfg, {"a": rig.a, "b": rig.b, "free": rig.free},
                      cache=ResponseCache(store))
    for _ in range(2):
        done = await gateway.complete(chat(temperature=0), ctx(rig))
        assert done.cache == "miss" and content(done.reply.body) == "Hello from scripted"
    assert len(rig.a.calls) == 2
    await gateway.aclose()
    await rig.gateway.aclose()


async def test_a_value_that_is_not_an_entry_is_a_miss() -> None:
    store = MemoryCacheStore(max_bytes=2**20, max_entry_bytes=2**16)
    cache = ResponseCache(store)
    key = CachePlan("k", read=True, write=True, ttl_s=60)
    await store.put("k", b"garbage", 60)
    assert (await cache.lookup(key, stream=False)).entry is None
    await store.put("k", encode_entry(Entry("a/x", 0, body=json.dumps({}).encode())), 60)
    assert (await cache.lookup(key, stream=True)).entry is None  # a body is not a stream
    assert (await cache.lookup(key, stream=False)).entry is not None


async def test_a_reload_keeps_the_cache_unless_its_section_changed() -> None:
    from sidecar.config import parse_config
    from sidecar.runtime import build_gateway, retire

    def cfg(ttl: float, cache: bool = True) -> Config:
        return parse_config({
            "providers": [{"name": "a", "type": "openai", "base_url": "http://127.0.0.1:9"}],
            "routes": [{"model": "chat", "cache": cache,
                        "targets": [{"provider": "a", "model": "x"}]}],
            "cache": {"ttl_s": ttl}, "state": {"backend": "memory"}}, env={})

    first = build_gateway(cfg(60))
    assert first.cache is not None and first.gateway.cache is first.cache
    same = build_gateway(cfg(60), previous=first)
    assert same.cache is first.cache
    await retire(first, same)
    other = build_gateway(cfg(30), previous=same)
    assert other.cache is not None and other.cache is not same.cache
    await retire(same, other)
    none = build_gateway(cfg(30, cache=False), previous=other)
    assert none.cache is None and none.gateway.cache is None
    await retire(other, none)
    await none.gateway.aclose()
