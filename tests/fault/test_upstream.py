"""Every scripted upstream fault, stream and non-stream, through one real ``sidecar serve``:
hang, slow drip, reset, disconnect, garbage, JSON of the wrong shape, error statuses, an
in-stream error, redirects and impossible usage. What must hold for each (issue 11): the
client gets an answer in OpenAI's shape within the deadline (a 5xx explained by the fault,
in the error envelope; or, once a stream has started, an SSE error event), never a cut
connection; a redirect is never followed; a budget never goes down; nothing logs a
traceback."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.fake_provider import (
    Behaviour,
    FakeProvider,
    disconnect,
    garbage,
    hang,
    ok,
    redirect,
    reset,
    slow_drip,
    status,
    stream_error,
    wrong_shape,
)
from tests.support.faults import follow_output, tracebacks
from tests.support.process import SidecarProcess

DEADLINE_S = 3.0
FAULTS: dict[str, Behaviour] = {
    "hang": hang(),
    "hang_after_chunks": hang(after_chunks=2),
    "slow_drip": slow_drip(interval_s=0.5, chunks=40),
    "reset": reset(),
    "reset_after_chunks": reset(after_chunks=2),
    "disconnect": disconnect(),
    "garbage": garbage(),
    "garbage_json_type": garbage(content_type="application/json"),
    "wrong_shape": wrong_shape(),
    "wrong_shape_list": wrong_shape([1, 2, 3]),
    "wrong_shape_choices": wrong_shape({"choices": [{"message": 5}], "usage": "x"}),
    "status_500": status(500),
    "status_503_retry_after": status(503, retry_after="1"),
    "status_500_html": status(500, body="<html>oops</html>"),
    # A revoked or mistyped provider key is the gateway's fault, not the client's: 502.
    "status_401": status(401),
    "status_403": status(403),
    "stream_error": stream_error(after_chunks=2),
    "negative_usage": ok(prompt_tokens=-1000, completion_tokens=-5),
    "absurd_usage": ok(prompt_tokens=2**62, completion_tokens=2**62),
}

CONFIG = """
[server]
request_timeout_s = {deadline}

[routing]
retries = 0
circuit_failures = 1000000

[[providers]]
name = "p"
type = "openai"
base_url = "{url}/v1"
timeout_s = 1.5
free = true

[[providers]]
name = "a"
type = "anthropic"
base_url = "{url}"
timeout_s = 1.5
free = true

[[providers]]
name = "pp"
type = "openai"
base_url = "{url}/v1"
timeout_s = 1.5

[prices]
"pp/priced" = {{ input = 100.0, output = 1000.0 }}

[[budgets]]
name = "all"
limit_usd = 1000000.0
window = "total"

[[routes]]
model = "priced"
targets = [{{ provider = "pp", model = "priced" }}]

[state]
path = "{ledger}"
"""


@pytest.fixture(scope="module")
def sidecar(fake_mod: FakeProvider, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[SidecarProcess]:
    tmp: Path = tmp_path_factory.mktemp("upstream")
    text = CONFIG.format(deadline=DEADLINE_S, url=fake_mod.url, ledger=tmp / "ledger.sqlite3")
    proc = SidecarProcess(text, tmp)
    follow_output(proc)
    yield proc
    proc.stop()


def _spent(sc: SidecarProcess) -> int:
    r = httpx.get(sc.url + "/v1/sidecar/budgets", timeout=10)
    [view] = [v for v in r.json()["data"] if v["name"] == "all"]
    return int(Decimal(view["spent_usd"]) * 1_000_000)


def _assert_clean(r: httpx.Response, body: bytes, stream: bool, fault: str) -> None:
    """An answer in OpenAI's shape: an error envelope, or a stream ending in an error event
    (or, for faults that still answer, a complete success)."""
    if r.status_code >= 400:
        assert r.status_code in (502, 503, 504), (fault, r.status_code, body[:300])
        err = json.loads(body)["error"]
        assert set(err) == {"message", "type", "code", "param"}, body[:300]
        assert err["message"] and "Traceback" not in err["message"]
        return
    assert r.status_code == 200
    if not stream:
        obj = json.loads(body)
        assert obj["choices"][0]["message"] is not None, body[:300]
        return
    events = [ln[len("data: "):] for ln in body.decode().splitlines() if ln.startswith("data: ")]
    assert events, body[:300]
    if events[-1] == "[DONE]":
        return
    last = json.loads(events[-1])
    assert isinstance(last.get("error"), dict) and last["error"]["message"], body[-300:]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
@pytest.mark.parametrize("dialect", ["openai", "anthropic"])
@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_fault_gets_a_clean_answer_within_the_deadline(
    sidecar: SidecarProcess, fp: FakeProvider, fault: str, dialect: str, stream: bool
) -> None:
    upstream_model = f"{fault}-{dialect}-{stream}"
    model = ("p/" if dialect == "openai" else "a/") + upstream_model
    fp.script(upstream_model, FAULTS[fault])
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "hi"}],
                            "stream": stream, "max_tokens": 8}
    if stream:
        body["stream_options"] = {"include_usage": True}
    t0 = time.monotonic()
    try:
        with httpx.stream("POST", sidecar.base_url + "/chat/completions", json=body,
                          timeout=DEADLINE_S + 10) as r:
            content = r.read()
    except httpx.TransportError as e:
        pytest.fail(f"{fault}: the connection was cut without an answer: {e!r}")
    took = time.monotonic() - t0
    assert took < DEADLINE_S + 2.5, f"{fault}: answered after {took:.1f}s"
    _assert_clean(r, content, stream, fault)
    assert not tracebacks(sidecar.output), tracebacks(sidecar.output)[0]


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_redirects_are_never_followed(sidecar: SidecarProcess, fp: FakeProvider,
                                      code: int, stream: bool) -> None:
    with FakeProvider() as elsewhere:
        for path in ("/v1/chat/completions", "/v1/embeddings"):
            fp.script("moved", redirect(elsewhere.openai_base_url + path[3:], code=code))
            body: dict[str, Any] = (
                {"model": "p/moved", "input": "hi"} if "embeddings" in path else
                {"model": "p/moved", "messages": [{"role": "user", "content": "hi"}],
                 "stream": stream})
            r = httpx.post(sidecar.url + path, json=body, timeout=DEADLINE_S + 10)
            assert r.status_code == 502, r.text
            assert r.json()["error"]["message"]
            assert "location" not in r.headers
        assert elsewhere.requests() == []  # nothing followed the Location
    assert fp.stats()["by_kind"] == {"redirect": 2}


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
@pytest.mark.parametrize("usage", [(-1000, 5), (5, -1000), (-(2**62), -(2**62)),
                                   (2**62, 2**62)])
def test_impossible_usage_never_lowers_the_spend(
    sidecar: SidecarProcess, fp: FakeProvider, usage: tuple[int, int], stream: bool
) -> None:
    before = _spent(sidecar)
    fp.script("priced", ok(prompt_tokens=usage[0], completion_tokens=usage[1]))
    body = {"model": "priced", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 8, "stream": stream, "stream_options": {"include_usage": True}}
    if not stream:
        del body["stream_options"]
    with httpx.stream("POST", sidecar.base_url + "/chat/completions", json=body,
                      timeout=DEADLINE_S + 10) as r:
        content = r.read()
    _assert_clean(r, content, stream, f"usage {usage}")
    after = _spent(sidecar)
    assert after >= before >= 0, (before, after)
    # The worst case of this request (a bounded prompt and 8 completion tokens) is far
    # below what an absurd usage would cost: it was settled at the reservation at most.
    assert after - before < 10**6, (before, after)
