"""End to end: the official ``openai`` SDK against a real ``sidecar serve`` process, which
talks to a real fake provider on loopback whose faults are scripted per request."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.support.fake_provider import (
    FakeProvider,
    disconnect,
    garbage,
    hang,
    ok,
    reset,
    slow_drip,
    status,
    stream_error,
)
from tests.support.process import SidecarProcess, closed_port, run_cli

CONFIG = """
[server]
request_timeout_s = 20

[routing]
retries = 0
backoff_base_s = 0.01
circuit_failures = 1000

[[providers]]
name = "p1"
type = "openai"
base_url = "{url}/v1"
api_key = "sk-upstream-secret"
timeout_s = 2

[[providers]]
name = "p2"
type = "openai"
base_url = "{url}/v1"
timeout_s = 2

[[providers]]
name = "down"
type = "openai"
base_url = "http://127.0.0.1:{closed_port}/v1"
timeout_s = 1

[[providers]]
name = "claude"
type = "anthropic"
base_url = "{url}"
api_key = "sk-ant-secret"

[[routes]]
model = "chat"
targets = [{{ provider = "p1", model = "a" }}, {{ provider = "p2", model = "b" }}]

[[routes]]
model = "via-down"
targets = [{{ provider = "down", model = "x" }}, {{ provider = "p2", model = "down-b" }}]

[[routes]]
model = "retrying"
retries = 2
targets = [{{ provider = "p1", model = "r1" }}, {{ provider = "p2", model = "r2" }}]

[[routes]]
model = "single"
targets = [{{ provider = "p1", model = "only" }}]

[[routes]]
model = "claude-chat"
targets = [{{ provider = "claude", model = "claude-test" }}]

[[routes]]
model = "embed"
targets = [{{ provider = "p1", model = "emb" }}]
"""


FRESH_ROUTES = 64


def _fresh_routes() -> str:
    """Routes with their own targets, so a test's faults (circuit state, Retry-After blocks)
    never leak into another test."""
    return "".join(
        f"""
[[routes]]
model = "fo{i}"
targets = [{{ provider = "p1", model = "fo{i}-a" }}, {{ provider = "p2", model = "fo{i}-b" }}]
"""
        for i in range(FRESH_ROUTES)
    )


@pytest.fixture(scope="module")
def sidecar(
    fake_mod: FakeProvider, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SidecarProcess]:
    text = CONFIG.format(url=fake_mod.url, closed_port=closed_port()) + _fresh_routes()
    proc = SidecarProcess(text, tmp_path_factory.mktemp("e2e"))
    yield proc
    proc.stop()


@pytest.fixture
def client(sidecar: SidecarProcess) -> openai.OpenAI:
    return sidecar.sdk("unused", timeout=30)


_counter = iter(range(FRESH_ROUTES))


@pytest.fixture
def fresh() -> tuple[str, str, str]:
    """A route no other test has used: (route, primary model, backup model)."""
    i = next(_counter)
    return f"fo{i}", f"fo{i}-a", f"fo{i}-b"


def _models(fp: FakeProvider) -> list[str]:
    return [r["model"] for r in fp.requests()]


# --- happy paths ----------------------------------------------------------------------------


def test_chat_non_stream_with_headers(client: openai.OpenAI, fp: FakeProvider) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="chat", messages=[{"role": "user", "content": "hi"}]
    )
    completion = raw.parse()
    assert completion.choices[0].message.content
    assert completion.usage is not None and completion.usage.total_tokens > 0
    assert raw.headers["x-sidecar-target"] == "p1/a"
    assert raw.headers["x-sidecar-attempts"] == "1"
    assert len(raw.headers["x-request-id"]) >= 16
    sent = fp.requests()[0]
    assert sent["model"] == "a"
    assert sent["headers"]["authorization"] == "Bearer sk-upstream-secret"


def test_client_request_id_is_kept(sidecar: SidecarProcess, fp: FakeProvider) -> None:
    r = httpx.post(
        f"{sidecar.base_url}/chat/completions",
        headers={"x-request-id": "abc-123"},
        json={"model": "chat", "messages": [{"role": "user", "content": "x"}]},
    )
    assert r.status_code == 200 and r.headers["x-request-id"] == "abc-123"


def test_chat_stream_with_usage(client: openai.OpenAI, fp: FakeProvider) -> None:
    fp.script("a", ok(text="one two three four", chunks=4))
    with client.chat.completions.with_streaming_response.create(
        model="chat",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
    ) as resp:
        assert resp.headers["x-sidecar-target"] == "p1/a"
        assert resp.headers["content-type"].startswith("text/event-stream")
        chunks = list(resp.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "one two three four"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_unknown_fields_pass_through_untouched(client: openai.OpenAI, fp: FakeProvider) -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    client.chat.completions.create(
        model="chat",
        messages=[{"role": "user", "content": "hi"}],
        tools=tools,  # type: ignore[arg-type]
        tool_choice="auto",
        response_format={"type": "json_object"},
        seed=7,
        logprobs=True,
        user="u-1",
        extra_body={"vendor_knob": {"nested": [1, 2]}},
    )
    body = fp.requests()[0]["body"]
    assert body["model"] == "a"
    assert body["tools"] == tools and body["tool_choice"] == "auto"
    assert body["response_format"] == {"type": "json_object"}
    assert body["seed"] == 7 and body["logprobs"] is True and body["user"] == "u-1"
    assert body["vendor_knob"] == {"nested": [1, 2]}


def test_completions_and_embeddings(client: openai.OpenAI, fp: FakeProvider) -> None:
    c = client.completions.create(model="chat", prompt="Say hi", max_tokens=5)
    assert c.choices[0].text
    stream = client.completions.create(model="chat", prompt="Say hi", stream=True)
    assert "".join(ch.choices[0].text for ch in stream if ch.choices)
    e = client.embeddings.create(model="embed", input=["a", "b"])
    assert len(e.data) == 2 and len(e.data[0].embedding) > 0
    assert [r["path"] for r in fp.requests()] == [
        "/v1/completions",
        "/v1/completions",
        "/v1/embeddings",
    ]


def test_direct_provider_model_and_models_list(client: openai.OpenAI, fp: FakeProvider) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="p2/direct-model", messages=[{"role": "user", "content": "hi"}]
    )
    assert raw.headers["x-sidecar-target"] == "p2/direct-model"
    ids = [m.id for m in client.models.list()]
    assert ids[:6] == ["chat", "via-down", "retrying", "single", "claude-chat", "embed"]
    assert "p1/a" in ids and "p2/b" in ids


def test_anthropic_target_through_openai_sdk(client: openai.OpenAI, fp: FakeProvider) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="claude-chat",
        messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        max_tokens=50,
    )
    completion = raw.parse()
    assert raw.headers["x-sidecar-target"] == "claude/claude-test"
    assert completion.choices[0].message.content
    assert completion.choices[0].finish_reason == "stop"
    sent = fp.requests()[0]
    assert sent["path"] == "/v1/messages"
    assert sent["body"]["system"] == "be brief" and sent["body"]["max_tokens"] == 50
    assert sent["headers"]["x-api-key"] == "sk-ant-secret"
    chunks = list(
        client.chat.completions.create(
            model="claude-chat",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage is not None


# --- failover -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fault",
    [status(500), status(503), status(429, retry_after="30"), garbage(), hang(), disconnect()],
    ids=["500", "503", "429", "garbage", "hang", "disconnect"],
)
def test_non_stream_fails_over(
    client: openai.OpenAI, fp: FakeProvider, fault: object, fresh: tuple[str, str, str]
) -> None:
    route, a, b = fresh
    fp.script(a, fault)
    raw = client.chat.completions.with_raw_response.create(
        model=route, messages=[{"role": "user", "content": "hi"}]
    )
    assert raw.headers["x-sidecar-target"] == f"p2/{b}"
    assert raw.headers["x-sidecar-attempts"] == "2"
    assert raw.parse().choices[0].message.content


@pytest.mark.parametrize(
    "fault",
    [
        status(500),
        status(429, retry_after="30"),
        garbage(),
        hang(),
        reset(after_chunks=None),
        reset(after_chunks=0),
        hang(after_chunks=0),
        disconnect(),
    ],
    ids=[
        "500",
        "429",
        "garbage",
        "hang",
        "reset",
        "reset-after-role",
        "hang-after-role",
        "disconnect",
    ],
)
def test_stream_fails_over_before_first_chunk(
    client: openai.OpenAI, fp: FakeProvider, fault: object, fresh: tuple[str, str, str]
) -> None:
    route, a, b = fresh
    fp.script(a, fault)
    with client.chat.completions.with_streaming_response.create(
        model=route, messages=[{"role": "user", "content": "hi"}], stream=True
    ) as resp:
        assert resp.headers["x-sidecar-target"] == f"p2/{b}"
        assert resp.headers["x-sidecar-attempts"] == "2"
        text = "".join(c.choices[0].delta.content or "" for c in resp.parse() if c.choices)
    assert text


def test_connect_refused_fails_over(client: openai.OpenAI, fp: FakeProvider) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="via-down", messages=[{"role": "user", "content": "hi"}]
    )
    assert raw.headers["x-sidecar-target"] == "p2/down-b"
    assert raw.headers["x-sidecar-attempts"] == "2"


@pytest.mark.parametrize("code", [400, 404, 422])
def test_client_errors_are_not_retried(
    client: openai.OpenAI, fp: FakeProvider, code: int, fresh: tuple[str, str, str]
) -> None:
    route, a, _ = fresh
    fp.script(a, status(code))
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model=route, messages=[{"role": "user", "content": "x"}])
    assert e.value.status_code == code
    assert _models(fp) == [a]  # the next target was never called


def test_retry_same_target_with_backoff(client: openai.OpenAI, fp: FakeProvider) -> None:
    fp.script("r1", status(502), status(500))
    raw = client.chat.completions.with_raw_response.create(
        model="retrying", messages=[{"role": "user", "content": "hi"}]
    )
    assert raw.headers["x-sidecar-target"] == "p1/r1"
    assert raw.headers["x-sidecar-attempts"] == "3"
    assert _models(fp) == ["r1", "r1", "r1"]


def test_retry_after_is_honoured(client: openai.OpenAI, fp: FakeProvider) -> None:
    fp.script("r1", status(429, retry_after="0.4"))
    started = time.monotonic()
    raw = client.chat.completions.with_raw_response.create(
        model="retrying", messages=[{"role": "user", "content": "hi"}]
    )
    assert time.monotonic() - started >= 0.4
    assert raw.headers["x-sidecar-target"] == "p1/r1"
    assert raw.headers["x-sidecar-attempts"] == "2"


def test_long_retry_after_moves_on_instead_of_waiting(
    client: openai.OpenAI, fp: FakeProvider
) -> None:
    fp.script("r1", status(429, retry_after="60"))
    raw = client.chat.completions.with_raw_response.create(
        model="retrying", messages=[{"role": "user", "content": "hi"}]
    )
    assert raw.headers["x-sidecar-target"] == "p2/r2"


# --- deadlines and mid-stream faults -------------------------------------------------------


def test_deadline_bounds_a_hanging_provider(sidecar: SidecarProcess, fp: FakeProvider) -> None:
    fp.script("only", hang())
    started = time.monotonic()
    r = httpx.post(
        f"{sidecar.base_url}/chat/completions",
        headers={"x-sidecar-timeout": "0.5"},
        json={"model": "single", "messages": [{"role": "user", "content": "x"}]},
        timeout=10,
    )
    elapsed = time.monotonic() - started
    assert r.status_code == 504, r.text
    assert r.json()["error"]["code"] == "deadline_exceeded"
    assert 0.45 < elapsed < 1.5
    assert fp.wait_for_cancelled(1, timeout=5)  # the upstream call was closed


def test_slow_drip_stream_is_cut_at_deadline(sidecar: SidecarProcess, fp: FakeProvider) -> None:
    fp.script("only", slow_drip(interval_s=0.2, chunks=50))
    client = sidecar.sdk(
        "x", timeout=openai.DEFAULT_TIMEOUT, default_headers={"x-sidecar-timeout": "1"}
    )
    started = time.monotonic()
    got = []
    with pytest.raises(openai.APIError) as e:
        for chunk in client.chat.completions.create(
            model="single", messages=[{"role": "user", "content": "x"}], stream=True
        ):
            got.append(chunk)
    assert 0.9 < time.monotonic() - started < 2.5
    assert got, "chunks before the deadline were relayed"
    assert "deadline" in str(e.value).lower()
    assert fp.wait_for_cancelled(1, timeout=5)


def test_client_disconnect_mid_stream_closes_upstream(sidecar: SidecarProcess,
                                                      fp: FakeProvider) -> None:
    fp.script("only", slow_drip(interval_s=0.1, chunks=100))
    body = {"model": "single", "stream": True, "messages": [{"role": "user", "content": "x"}]}
    with httpx.stream("POST", f"{sidecar.base_url}/chat/completions", json=body) as r:
        assert r.status_code == 200
        next(r.iter_raw())
    assert fp.wait_for_cancelled(1, timeout=5)


def test_reset_mid_stream_ends_with_error_event(client: openai.OpenAI, fp: FakeProvider) -> None:
    fp.script("only", reset(after_chunks=2))
    got = []
    with pytest.raises(openai.APIError):
        for chunk in client.chat.completions.create(
            model="single", messages=[{"role": "user", "content": "x"}], stream=True
        ):
            got.append(chunk)
    assert got and all(c.choices[0].finish_reason is None for c in got if c.choices)


def test_bad_timeout_header(sidecar: SidecarProcess) -> None:
    for value in ("abc", "-1", "999999"):
        r = httpx.post(
            f"{sidecar.base_url}/chat/completions",
            headers={"x-sidecar-timeout": value},
            json={"model": "chat", "messages": [{"role": "user", "content": "x"}]},
        )
        assert r.status_code == 400, value
        assert r.json()["error"]["param"] == "x-sidecar-timeout"


# --- errors ---------------------------------------------------------------------------------


def _post(
    sidecar: SidecarProcess,
    body: bytes | dict[str, object],
    path: str = "/chat/completions",
    **kw: object,
) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(
        sidecar.base_url + path,
        content=content,
        headers={"content-type": "application/json"},
        timeout=10,
        **kw,
    )  # type: ignore[arg-type]


def _assert_envelope(r: httpx.Response, status_code: int) -> dict[str, object]:
    assert r.status_code == status_code, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "code", "param"}
    assert "Traceback" not in err["message"] and "sk-" not in r.text
    assert r.headers["x-request-id"]
    return err  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{not json", None),
        (b"[1, 2]", None),
        (b"", None),
        ({"model": "chat"}, None),
        ({"model": "chat", "messages": "hello"}, "messages"),
        ({"model": "chat", "messages": []}, "messages"),
        ({"model": 5, "messages": [{"role": "user", "content": "x"}]}, "model"),
        ({"model": "chat", "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        (
            {"model": "chat", "messages": [{"role": "user", "content": "x"}], "temperature": 9},
            "temperature",
        ),
        (
            {"model": "chat", "messages": [{"role": "user", "content": "x"}], "max_tokens": "many"},
            "max_tokens",
        ),
        (
            {"model": "chat", "messages": [{"role": "user", "content": "x"}], "stream": "yes"},
            "stream",
        ),
    ],
)
def test_malformed_requests_get_400(
    sidecar: SidecarProcess, fp: FakeProvider, body: bytes | dict[str, object], param: str | None
) -> None:
    err = _assert_envelope(_post(sidecar, body), 400)
    assert err["type"] == "invalid_request_error"
    if param:
        assert err["param"] == param
    assert fp.requests() == []


def test_oversized_body_gets_413(sidecar: SidecarProcess, fp: FakeProvider) -> None:
    big = {"model": "chat", "messages": [{"role": "user", "content": "x" * (5 * 1024 * 1024)}]}
    _assert_envelope(_post(sidecar, big), 413)
    assert fp.requests() == []


def test_unknown_model_gets_404(client: openai.OpenAI, fp: FakeProvider) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(
            model="gpt-nope", messages=[{"role": "user", "content": "x"}]
        )
    assert "gpt-nope" in str(e.value)


def test_unknown_path_and_method(sidecar: SidecarProcess) -> None:
    _assert_envelope(httpx.get(sidecar.url + "/v2/whatever"), 404)
    _assert_envelope(httpx.get(sidecar.base_url + "/chat/completions"), 405)


def test_every_target_failed_gets_502(
    sidecar: SidecarProcess, fp: FakeProvider, fresh: tuple[str, str, str]
) -> None:
    route, a, b = fresh
    fp.script(a, status(500))
    fp.script(b, garbage())
    err = _assert_envelope(
        _post(sidecar, {"model": route, "messages": [{"role": "user", "content": "x"}]}), 502
    )
    assert err["code"] == "all_targets_failed"


def test_every_target_rate_limited_gets_429(
    sidecar: SidecarProcess, fp: FakeProvider, fresh: tuple[str, str, str]
) -> None:
    route, a, b = fresh
    fp.script(a, status(429, retry_after="20"))
    fp.script(b, status(429, retry_after="7"))
    r = _post(sidecar, {"model": route, "messages": [{"role": "user", "content": "x"}]})
    _assert_envelope(r, 429)
    assert r.headers["retry-after"] == "7"


def test_garbage_streams_everywhere_get_502(
    client: openai.OpenAI, fp: FakeProvider, fresh: tuple[str, str, str]
) -> None:
    route, a, b = fresh
    fp.script(a, garbage())
    fp.script(b, garbage())
    with pytest.raises(openai.APIStatusError) as e:
        list(
            client.chat.completions.create(
                model=route, stream=True, messages=[{"role": "user", "content": "x"}]
            )
        )
    assert e.value.status_code == 502


def test_health_endpoints(sidecar: SidecarProcess) -> None:
    assert httpx.get(sidecar.url + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(sidecar.url + "/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"


# --- the chat command -----------------------------------------------------------------------


def test_chat_command_prints_the_stream(sidecar: SidecarProcess, fp: FakeProvider) -> None:
    fp.script("only", ok("Hello there, friend", chunks=4))
    res = run_cli("chat", "hi", "--model", "single", "--url", sidecar.url)
    assert res.returncode == 0, res.stderr
    assert res.stdout == "Hello there, friend"
    assert res.stderr.endswith("\n[p1/only]\n")


def test_chat_command_reports_a_stream_error(sidecar: SidecarProcess, fp: FakeProvider) -> None:
    fp.script("only", stream_error(after_chunks=2))
    res = run_cli("chat", "hi", "--model", "single", "--url", sidecar.url)
    assert res.returncode == 1
    assert res.stdout  # the chunks before the error
    error = res.stderr.splitlines()[-1]
    assert error.startswith("error: ") and "p1/only" in error


# --- auth, circuit breaking and shutdown, each on its own sidecar ------------------------


def test_api_keys(start_sidecar, fake: FakeProvider) -> None:  # type: ignore[no-untyped-def]
    sc = start_sidecar(f"""
        [server]
        api_keys = ["sk-client-1", "sk-client-2"]
        [[providers]]
        name = "p"
        type = "openai"
        base_url = "{fake.openai_base_url}"
    """)
    body = {"model": "p/m", "messages": [{"role": "user", "content": "x"}]}
    wrong_basic = "Basic " + base64.b64encode(b"sk-client-1:wrong").decode()  # key as user
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "Basic abc"},
                    {"authorization": wrong_basic}, {"authorization": "Digest sk-client-1"}):
        r = httpx.post(sc.base_url + "/chat/completions", json=body, headers=headers)
        assert _assert_envelope(r, 401)["type"] == "authentication_error"
    assert httpx.get(sc.base_url + "/models").status_code == 401
    assert fake.requests() == []
    good = sc.sdk("sk-client-2", timeout=openai.DEFAULT_TIMEOUT)
    assert good.chat.completions.create(model="p/m", messages=[{"role": "user", "content": "x"}])
    r = httpx.post(
        sc.base_url + "/chat/completions", json=body, headers={"x-api-key": "sk-client-1"}
    )
    assert r.status_code == 200
    # HTTP Basic (what a browser sends to the status page): the password is the key, the
    # user name is ignored.
    r = httpx.post(sc.base_url + "/chat/completions", json=body, auth=("anyone", "sk-client-1"))
    assert r.status_code == 200
    assert "sk-client" not in "".join(sc.output)


def test_circuit_opens_then_recovers(start_sidecar, fake: FakeProvider) -> None:  # type: ignore[no-untyped-def]
    sc = start_sidecar(f"""
        [routing]
        retries = 0
        circuit_failures = 2
        circuit_cooldown_s = 0.5
        [[providers]]
        name = "p"
        type = "openai"
        base_url = "{fake.openai_base_url}"
        [[routes]]
        model = "chat"
        targets = [{{ provider = "p", model = "flaky" }}, {{ provider = "p", model = "backup" }}]
    """)
    client = sc.sdk("x", timeout=openai.DEFAULT_TIMEOUT)
    msg = [{"role": "user", "content": "x"}]
    fake.script("flaky", status(500), status(500))
    for _ in range(2):
        r = client.chat.completions.with_raw_response.create(model="chat", messages=msg)
        assert r.headers["x-sidecar-attempts"] == "2"
    ready = httpx.get(sc.url + "/readyz").json()
    assert ready["targets"]["p/flaky"]["state"] == "open"
    # open: the flaky target is skipped without a call
    r = client.chat.completions.with_raw_response.create(model="chat", messages=msg)
    assert r.headers["x-sidecar-target"] == "p/backup" and r.headers["x-sidecar-attempts"] == "1"
    assert [q["model"] for q in fake.requests()].count("flaky") == 2
    time.sleep(0.6)  # let the cooldown elapse: the behaviour under test is time itself
    r = client.chat.completions.with_raw_response.create(model="chat", messages=msg)
    assert r.headers["x-sidecar-target"] == "p/flaky"  # the probe succeeded
    assert httpx.get(sc.url + "/readyz").json()["targets"]["p/flaky"]["state"] == "closed"


def test_all_circuits_open_gets_503(start_sidecar, fake: FakeProvider) -> None:  # type: ignore[no-untyped-def]
    sc = start_sidecar(f"""
        [routing]
        retries = 0
        circuit_failures = 1
        circuit_cooldown_s = 30
        [[providers]]
        name = "p"
        type = "openai"
        base_url = "{fake.openai_base_url}"
    """)
    body = {"model": "p/m", "messages": [{"role": "user", "content": "x"}]}
    fake.script("m", status(500))
    assert httpx.post(sc.base_url + "/chat/completions", json=body).status_code == 502
    r = httpx.post(sc.base_url + "/chat/completions", json=body)
    _assert_envelope(r, 503)
    assert 25 <= int(r.headers["retry-after"]) <= 30
    assert len(fake.requests()) == 1


def test_sigterm_drains_inflight_stream(
    start_sidecar,
    fake: FakeProvider,  # type: ignore[no-untyped-def]
    tmp_path: Path,
) -> None:
    import signal

    sc = start_sidecar(f"""
        [[providers]]
        name = "p"
        type = "openai"
        base_url = "{fake.openai_base_url}"
    """)
    fake.script("m", slow_drip(interval_s=0.05, chunks=10))
    client = sc.sdk("x", timeout=openai.DEFAULT_TIMEOUT)
    stream = client.chat.completions.create(
        model="p/m", stream=True, messages=[{"role": "user", "content": "x"}]
    )
    first = next(iter(stream))
    sc.proc.send_signal(signal.SIGTERM)
    rest = list(stream)
    assert first and len(rest) >= 5  # the in-flight stream finished
    assert sc.stop() == 0


def test_retry_budget_stops_retry_storms(start_sidecar, fake: FakeProvider) -> None:  # type: ignore[no-untyped-def]
    sc = start_sidecar(f"""
        [routing]
        retries = 3
        backoff_base_s = 0.001
        retry_budget_ratio = 0.1
        retry_budget_min = 1
        circuit_failures = 1000
        [[providers]]
        name = "p"
        type = "openai"
        base_url = "{fake.openai_base_url}"
    """)
    fake.set_default("down", status(500))
    body = {"model": "p/down", "messages": [{"role": "user", "content": "x"}]}
    for _ in range(20):
        assert httpx.post(sc.base_url + "/chat/completions", json=body).status_code == 502
    # without a budget this would be 20 * 4 = 80 upstream calls
    assert len(fake.requests()) <= 20 + 1 + 2


def test_request_one_target_cannot_express_goes_to_the_next(start_sidecar, fake: FakeProvider  # type: ignore[no-untyped-def]
                                                             ) -> None:
    sc = start_sidecar(f"""
        [routing]
        retries = 0
        [[providers]]
        name = "claude"
        type = "anthropic"
        base_url = "{fake.url}"
        timeout_s = 1
        [[providers]]
        name = "p"
        type = "openai"
        base_url = "{fake.openai_base_url}"
        [[routes]]
        model = "mixed"
        targets = [{{ provider = "claude", model = "c" }}, {{ provider = "p", model = "o" }}]
        [[routes]]
        model = "claude-only"
        targets = [{{ provider = "claude", model = "c" }}]
    """)
    audio = [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]}]
    r = httpx.post(sc.base_url + "/chat/completions", json={"model": "mixed", "messages": audio})
    assert r.status_code == 200 and r.headers["x-sidecar-target"] == "p/o"
    r = httpx.post(sc.base_url + "/chat/completions",
                   json={"model": "claude-only", "messages": audio})
    assert _assert_envelope(r, 400)["type"] == "invalid_request_error"
    assert [q["model"] for q in fake.requests()] == ["o"]  # nothing reached Anthropic
    ready = httpx.get(sc.url + "/readyz").json()
    assert ready["targets"]["claude/c"]["consecutive_failures"] == 0
    # an Anthropic stream that dies after its preamble, before a token, is replaced
    fake.script("c", hang(after_chunks=0))
    client = sc.sdk("x", timeout=openai.DEFAULT_TIMEOUT)
    with client.chat.completions.with_streaming_response.create(
        model="mixed", messages=[{"role": "user", "content": "hi"}], stream=True
    ) as resp:
        assert resp.headers["x-sidecar-target"] == "p/o"
        assert "".join(c.choices[0].delta.content or "" for c in resp.parse() if c.choices)
