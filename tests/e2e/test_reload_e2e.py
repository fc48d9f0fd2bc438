"""Config reload on a real ``sidecar serve`` (``POST /v1/sidecar/reload``, ``sidecar
reload``, SIGHUP): routes, providers and keys swap at once, requests in flight finish on
the old config, an invalid config is refused with its path and the old one serves on, and
nothing fails under load across 20 reloads."""

from __future__ import annotations

import signal
import threading
from collections import Counter
from collections.abc import Callable

import httpx
import pytest

from tests.support.fake_provider import FakeProvider, ok, slow_drip
from tests.support.process import SidecarProcess, poll, run_cli

BASE = """
[server]
api_keys = ["{key}"]

[routing]
retries = 0

[[providers]]
name = "p"
type = "openai"
base_url = "{url}"
timeout_s = 10

[[routes]]
model = "chat"
targets = [{{ provider = "p", model = "{target}" }}]
"""
EXTRA = """
[[routes]]
model = "extra"
targets = [{{ provider = "p", model = "x" }}]
"""
KEY = "sk-reload-client-1"
RELOADS = 20
BODY = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


def config(fake: FakeProvider, target: str = "a", key: str = KEY, extra: bool = False) -> str:
    text = BASE.format(url=fake.openai_base_url, target=target, key=key)
    return text + (EXTRA.format() if extra else "")


def reload(sc: SidecarProcess, key: str = KEY) -> httpx.Response:
    return httpx.post(sc.url + "/v1/sidecar/reload", timeout=30,
                      headers={"authorization": f"Bearer {key}"})


def ask(sc: SidecarProcess, key: str = KEY, **body: object) -> httpx.Response:
    return httpx.post(sc.base_url + "/chat/completions", json={**BODY, **body}, timeout=30,
                      headers={"authorization": f"Bearer {key}"})


def write(sc: SidecarProcess, text: str) -> None:
    assert sc.config_path is not None
    sc.config_path.write_text(text)


@pytest.fixture
def sc(start_sidecar: Callable[..., SidecarProcess], fake: FakeProvider) -> SidecarProcess:
    fake.set_default("*", ok("fine"))
    return start_sidecar(config(fake))


def test_routes_and_keys_swap(sc: SidecarProcess, fake: FakeProvider) -> None:
    assert ask(sc).headers["x-sidecar-target"] == "p/a"
    write(sc, config(fake, target="b", key="sk-reload-client-2", extra=True))
    r = reload(sc)
    assert r.status_code == 200 and r.json() == {"reloaded": True, "routes": 2, "providers": 1}
    assert ask(sc, key=KEY).status_code == 401  # the old key is gone
    new = ask(sc, key="sk-reload-client-2")
    assert new.status_code == 200 and new.headers["x-sidecar-target"] == "p/b"
    assert ask(sc, key="sk-reload-client-2", model="extra").headers["x-sidecar-target"] == "p/x"


def test_an_invalid_config_is_refused_and_the_old_one_serves(sc: SidecarProcess,
                                                              fake: FakeProvider) -> None:
    write(sc, config(fake) + '\n[routing]\nretries = "many"\n')
    r = reload(sc)
    assert r.status_code == 400
    assert "not reloaded" in r.json()["error"]["message"]
    write(sc, config(fake) + "\n[[routes]]\nmodel = \"bad\"\ntargets = [{ provider = "
          "\"nope\", model = \"m\" }]\n")
    r = reload(sc)
    assert r.status_code == 400 and "routes[1]" in r.json()["error"]["message"], r.text
    assert ask(sc).headers["x-sidecar-target"] == "p/a"
    # SIGHUP with a bad file: refused in the log, still serving
    write(sc, "this is not toml [")
    sc.proc.send_signal(signal.SIGHUP)
    assert ask(sc).status_code == 200
    assert sc.stop() == 0
    assert "sidecar: error: reload refused: " in "".join(sc.output)


def test_sighup_and_the_command_reload(sc: SidecarProcess, fake: FakeProvider) -> None:
    write(sc, config(fake, extra=True))
    sc.proc.send_signal(signal.SIGHUP)

    def has_extra() -> bool:
        r = httpx.get(sc.base_url + "/models", headers={"authorization": f"Bearer {KEY}"})
        return "extra" in [m["id"] for m in r.json()["data"]]

    poll(has_extra, within=10)
    write(sc, config(fake))
    out = run_cli("reload", "--url", sc.base_url, "--api-key", KEY)
    assert out.returncode == 0 and "reloaded: 1 routes" in out.stdout, out.stderr
    assert not has_extra()
    write(sc, "[routing]\nretries = -1\n")
    bad = run_cli("reload", "--url", sc.url, "--api-key", KEY)
    assert bad.returncode == 1 and "reload refused" in bad.stderr and "retries" in bad.stderr


def test_a_stream_in_flight_finishes_on_the_old_config(sc: SidecarProcess,
                                                       fake: FakeProvider) -> None:
    fake.script("a", slow_drip(interval_s=0.05, chunks=20, text="one two three"))
    with httpx.stream("POST", sc.base_url + "/chat/completions", timeout=30,
                      headers={"authorization": f"Bearer {KEY}"},
                      json={**BODY, "stream": True}) as r:
        assert r.headers["x-sidecar-target"] == "p/a"
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert first
        write(sc, config(fake, target="b"))
        assert reload(sc).status_code == 200
        assert ask(sc).headers["x-sidecar-target"] == "p/b"  # new requests: new config
        rest = list(lines)
    assert [line for line in rest if line][-1] == "data: [DONE]"  # ran to its end


def test_no_request_fails_across_20_reloads_under_load(sc: SidecarProcess,
                                                       fake: FakeProvider) -> None:
    stop = threading.Event()
    results: Counter[str] = Counter()
    lock = threading.Lock()

    def client() -> None:
        with httpx.Client(timeout=30, headers={"authorization": f"Bearer {KEY}"}) as c:
            for i in range(400):  # bounded; stops early once the reloads are done
                if stop.is_set():
                    return
                body = {**BODY, "stream": i % 3 == 0}
                try:
                    r = c.post(sc.base_url + "/chat/completions", json=body)
                except httpx.HTTPError as e:
                    with lock:
                        results[f"{type(e).__name__}:stream={body['stream']}"] += 1
                    continue
                ok_stream = not body["stream"] or r.text.rstrip().endswith("data: [DONE]")
                with lock:
                    results[f"{r.status_code}:{ok_stream}"] += 1
                    results[r.headers.get("x-sidecar-target", "?")] += 1

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        for i in range(RELOADS):
            write(sc, config(fake, target="b" if i % 2 == 0 else "a", extra=i % 2 == 0))
            assert reload(sc).status_code == 200
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert set(results) - {"p/a", "p/b"} == {"200:True"}, results
    assert results["p/a"] > 0 and results["p/b"] > 0
