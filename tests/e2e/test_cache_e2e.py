"""End to end: the response cache of a real ``sidecar serve``, through the official
``openai`` and ``anthropic`` SDKs and a real gRPC channel, over a fake provider on loopback:
hits and misses, streams replayed, opt-outs, hits not charged to budgets, the SQLite cache
across a restart and one Redis cache shared by two sidecars."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import grpc
import httpx
import openai
import pytest

from sidecar.grpc.v1 import sidecar_pb2 as pb
from sidecar.grpc.v1 import sidecar_pb2_grpc
from tests.e2e.test_money_e2e import spent
from tests.support.fake_provider import FakeProvider, ok
from tests.support.process import GrpcSidecar, SidecarProcess
from tests.support.redis_server import RedisServer, redis_server_fixture

KEY = "sk-cache-client-0123"
HI = [{"role": "user", "content": "What is the capital of France?"}]

CONFIG = """
[server]
api_keys = ["{key}"]

[routing]
retries = 0

[[providers]]
name = "fake"
type = "openai"
base_url = "{url}"

[[routes]]
model = "chat"
cache = true
targets = [{{ provider = "fake", model = "a" }}]

[[routes]]
model = "sampled"
cache = true
cache_nondeterministic = true
targets = [{{ provider = "fake", model = "s" }}]

[[routes]]
model = "plain"
targets = [{{ provider = "fake", model = "p" }}]

[prices]
"fake/a" = {{ input = 1.0, output = 2.0 }}
"fake/s" = {{ input = 1.0, output = 2.0 }}
"fake/p" = {{ input = 1.0, output = 2.0 }}

[[budgets]]
name = "daily"
limit_usd = 10.0

[state]
backend = "memory"

[cache]
{cache}
"""

redis_server = redis_server_fixture(scope="module")


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeProvider]:
    with FakeProvider() as fp:
        fp.set_default("a", ok("Paris.", prompt_tokens=10, completion_tokens=3))
        fp.set_default("s", ok("A sample.", prompt_tokens=10, completion_tokens=3))
        fp.set_default("p", ok("Plain.", prompt_tokens=10, completion_tokens=3))
        yield fp


def start(fake: FakeProvider, tmp_path: Path, cache: str = 'backend = "memory"',
          grpc_too: bool = False) -> SidecarProcess:
    text = CONFIG.format(key=KEY, url=fake.openai_base_url, cache=cache)
    return GrpcSidecar(text, tmp_path) if grpc_too else SidecarProcess(text, tmp_path)


@pytest.fixture
def sidecar(fake: FakeProvider, tmp_path: Path) -> Iterator[SidecarProcess]:
    sc = start(fake, tmp_path, grpc_too=True)
    yield sc
    sc.stop()


def calls(fake: FakeProvider, model: str) -> int:
    return sum(1 for r in fake.requests() if r["model"] == model)


def ask(client: openai.OpenAI, model: str = "chat", headers: dict[str, str] | None = None,
        messages: list[dict[str, str]] = HI, **kw: Any) -> tuple[httpx.Headers, str]:
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=messages, extra_headers=headers,  # type: ignore[arg-type]
        **{"temperature": 0, **kw})
    return raw.headers, raw.parse().choices[0].message.content or ""


def test_a_repeated_question_is_answered_from_the_cache(sidecar: SidecarProcess,
                                                         fake: FakeProvider) -> None:
    client = sidecar.sdk(KEY)
    before = calls(fake, "a")
    first, text = ask(client)
    assert first["x-sidecar-cache"] == "miss" and text == "Paris."
    spent_after_first = spent(sidecar.url, "daily", key=KEY)
    assert spent_after_first == 10 * 1 + 3 * 2
    for _ in range(3):
        again, text_again = ask(client)
        assert again["x-sidecar-cache"] == "hit" and text_again == "Paris."
        assert again["x-sidecar-route-reason"] == "cache:hit"
        assert again["x-sidecar-cost-usd"] == "0.000000"
        assert again["x-sidecar-target"] == "fake/a"
    assert calls(fake, "a") == before + 1
    assert spent(sidecar.url, "daily", key=KEY) == spent_after_first  # hits are not charged
    # Another question, or other parameters, is another answer.
    assert ask(client, max_tokens=7)[0]["x-sidecar-cache"] == "miss"
    assert calls(fake, "a") == before + 2
    metrics = httpx.get(sidecar.url + "/metrics", headers={"authorization": f"Bearer {KEY}"},
                        timeout=10).text
    assert 'sidecar_cache_requests_total{result="hit",route="chat"} 3.0' in metrics
    assert 'sidecar_cache_requests_total{result="miss",route="chat"} 2.0' in metrics


def test_a_stream_is_replayed(sidecar: SidecarProcess, fake: FakeProvider) -> None:
    client = sidecar.sdk(KEY)
    before = calls(fake, "a")
    seen = []
    for expected in ("miss", "hit"):
        with client.chat.completions.with_streaming_response.create(
                model="chat", messages=HI, temperature=0, stream=True,
                stream_options={"include_usage": True}) as raw:
            assert raw.headers["x-sidecar-cache"] == expected
            chunks = list(raw.parse())
        seen.append(chunks)
    assert calls(fake, "a") == before + 1
    first, again = seen
    assert [c.model_dump() for c in again] == [c.model_dump() for c in first]
    text = "".join(c.choices[0].delta.content or "" for c in again if c.choices)
    assert text == "Paris." and again[-1].usage is not None
    # A body is not a stream: the same question without stream is a miss.
    assert ask(client)[0]["x-sidecar-cache"] in ("miss", "hit")  # hit if the test above ran


def test_opt_outs_and_sampled_requests(sidecar: SidecarProcess, fake: FakeProvider) -> None:
    client = sidecar.sdk(KEY)
    ask(client)
    before = calls(fake, "a")
    assert ask(client, headers={"x-sidecar-cache": "off"})[0]["x-sidecar-cache"] == "bypass"
    assert ask(client, headers={"cache-control": "no-store"})[0]["x-sidecar-cache"] == "bypass"
    assert ask(client, headers={"x-sidecar-cache": "refresh"})[0]["x-sidecar-cache"] == "miss"
    assert calls(fake, "a") == before + 3
    assert ask(client, temperature=0.8)[0]["x-sidecar-cache"] == "bypass"
    assert ask(client, model="sampled", temperature=0.8)[0]["x-sidecar-cache"] == "miss"
    assert ask(client, model="sampled", temperature=0.8)[0]["x-sidecar-cache"] == "hit"
    assert "x-sidecar-cache" not in ask(client, model="plain")[0]
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, headers={"x-sidecar-cache": "sometimes"})
    assert e.value.status_code == 400 and "x-sidecar-cache" in str(e.value)


def test_messages_and_grpc_clients_use_the_same_cache(sidecar: SidecarProcess) -> None:
    client = anthropic.Anthropic(base_url=sidecar.url, api_key=KEY, max_retries=0, timeout=60)
    results = []
    for _ in range(2):
        # This SDK (2.x) no longer has a temperature argument; the API still takes one.
        raw = client.messages.with_raw_response.create(
            model="chat", max_tokens=50, messages=HI,  # type: ignore[arg-type]
            extra_body={"temperature": 0})
        results.append((raw.headers["x-sidecar-cache"], raw.parse().content[0].text))
    assert results == [("miss", "Paris."), ("hit", "Paris.")]
    assert isinstance(sidecar, GrpcSidecar)
    with grpc.insecure_channel(sidecar.grpc_address) as channel:
        stub = sidecar_pb2_grpc.SidecarStub(channel)
        request = pb.ChatRequest(model="chat", temperature=0,
                                 messages=[pb.Message(role=pb.ROLE_USER, content="Hi gRPC")])
        found = []
        for _ in range(2):
            reply, call = stub.Chat.with_call(
                request, metadata=(("authorization", f"Bearer {KEY}"),), timeout=30)
            found.append((dict(call.trailing_metadata())["x-sidecar-cache"],
                          reply.choices[0].message.content))
        assert found == [("miss", "Paris."), ("hit", "Paris.")]
        _, call = stub.Chat.with_call(request, timeout=30, metadata=(
            ("authorization", f"Bearer {KEY}"), ("x-sidecar-cache", "off")))
        assert dict(call.trailing_metadata())["x-sidecar-cache"] == "bypass"
        with pytest.raises(grpc.RpcError) as e:
            stub.Chat(request, timeout=30, metadata=(
                ("authorization", f"Bearer {KEY}"), ("x-sidecar-cache", "maybe")))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "x-sidecar-cache" in (e.value.details() or "")


def test_the_sqlite_cache_survives_a_restart(fake: FakeProvider, tmp_path: Path) -> None:
    cache = f'backend = "sqlite"\npath = "{tmp_path}/responses.sqlite3"'
    sc = start(fake, tmp_path, cache)
    try:
        assert ask(sc.sdk(KEY))[0]["x-sidecar-cache"] == "miss"
    finally:
        sc.stop()
    before = calls(fake, "a")
    sc = start(fake, tmp_path, cache)
    try:
        headers, text = ask(sc.sdk(KEY))
        assert headers["x-sidecar-cache"] == "hit" and text == "Paris."
        assert calls(fake, "a") == before
    finally:
        sc.stop()


def test_a_cache_file_that_cannot_be_opened_stops_the_start(fake: FakeProvider,
                                                            tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("in the way")
    with pytest.raises(RuntimeError) as e:
        start(fake, tmp_path, f'backend = "sqlite"\npath = "{blocker}/responses.sqlite3"')
    assert "response cache" in str(e.value)


def test_two_sidecars_share_one_redis_cache(fake: FakeProvider, tmp_path: Path,
                                            redis_server: RedisServer) -> None:
    cache = f'backend = "redis"\nredis_url = "{redis_server.url}"\nredis_prefix = "e2e:"'
    one, two = start(fake, tmp_path, cache), start(fake, tmp_path, cache)
    try:
        before = calls(fake, "a")
        question = [{"role": "user", "content": "Shared question?"}]
        assert ask(one.sdk(KEY), messages=question)[0]["x-sidecar-cache"] == "miss"
        assert ask(two.sdk(KEY), messages=question)[0]["x-sidecar-cache"] == "hit"
        assert calls(fake, "a") == before + 1
        redis_server.stop()  # the cache is gone: requests are still answered
        headers, text = ask(two.sdk(KEY), messages=question)
        assert headers["x-sidecar-cache"] == "miss" and text == "Paris."
    finally:
        one.stop()
        two.stop()
        redis_server.restart()
