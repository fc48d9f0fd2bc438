"""The sidecar's logs from a real ``sidecar serve``: one JSON line per request with its
facts and never its prompt, lifecycle events, secrets redacted from every line, the text
format and ``--log-level``."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest

from tests.support.fake_provider import FakeProvider, echo, ok, status
from tests.support.process import SidecarProcess

SECRET = "sk-upstream-secret-0123456789"
CONFIG = """
[routing]
retries = 0

[[providers]]
name = "p"
type = "openai"
base_url = "{url}"
api_key = "{secret}"

[[routes]]
model = "chat"
targets = [{{ provider = "p", model = "a" }}, {{ provider = "p", model = "b" }}]
"""
PROMPT = "my private prompt text"


def lines(sc: SidecarProcess) -> list[dict[str, Any]]:
    out = []
    for line in "".join(sc.output).splitlines():
        line = line.strip()
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


@pytest.fixture
def json_sidecar(start_sidecar: Callable[..., SidecarProcess],
                 fake: FakeProvider) -> SidecarProcess:
    return start_sidecar(CONFIG.format(url=fake.openai_base_url, secret=SECRET),
                         args=("--log-format", "json"))


def test_one_json_line_per_request(json_sidecar: SidecarProcess, fake: FakeProvider) -> None:
    fake.script("a", status(500))
    fake.script("b", ok("fine", prompt_tokens=7, completion_tokens=2))
    client = json_sidecar.sdk()
    client.chat.completions.create(model="chat", messages=[{"role": "user", "content": PROMPT}],
                                   extra_headers={"x-request-id": "rid-logs-1"})
    stream = client.chat.completions.create(
        model="chat", stream=True, messages=[{"role": "user", "content": PROMPT}])
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    json_sidecar.stop()
    logged = [x for x in lines(json_sidecar) if x["msg"] == "request"]
    first, streamed, unknown = logged
    assert first["logger"] == "sidecar.request" and first["level"] == "info"
    assert first["ts"].endswith("Z")
    assert (first["request_id"], first["route"], first["target"], first["status"]) == (
        "rid-logs-1", "chat", "p/b", 200)
    assert (first["attempts"], first["reasons"], first["prompt_tokens"],
            first["completion_tokens"]) == (2, ["fallback:upstream_5xx"], 7, 2)
    assert first["duration_ms"] >= 0 and first["stream"] is False
    assert streamed["stream"] is True and streamed["ttft_ms"] <= streamed["duration_ms"]
    assert (unknown["status"], unknown["error"], unknown["route"]) == (404, "model_not_found",
                                                                      None)
    text = "".join(json_sidecar.output)
    assert PROMPT not in text and "fine" not in text
    events = [x.get("event") for x in lines(json_sidecar)]
    assert "draining" in events and "stopped" in events


def test_secrets_never_reach_a_line(json_sidecar: SidecarProcess, fake: FakeProvider) -> None:
    fake.script("a", echo("error"))  # the upstream's error echoes the key it was sent
    fake.script("b", echo("error"))
    r = httpx.post(json_sidecar.base_url + "/chat/completions", timeout=10, json={
        "model": "chat", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code >= 400
    json_sidecar.stop()
    assert [x for x in lines(json_sidecar) if x["msg"] == "request"]
    assert SECRET not in "".join(json_sidecar.output)


def test_text_format_and_level(start_sidecar: Callable[..., SidecarProcess],
                               fake: FakeProvider) -> None:
    fake.set_default("*", ok("hi"))
    text = start_sidecar(CONFIG.format(url=fake.openai_base_url, secret=SECRET))
    text.sdk().chat.completions.create(model="chat", messages=[{"role": "user", "content": "x"}],
                                       extra_headers={"x-request-id": "rid-text"})
    text.stop()
    printed = "".join(text.output).splitlines()
    [line] = [x for x in printed if "request_id=rid-text" in x]
    assert line.startswith("sidecar: request ") and "route=chat" in line
    assert "status=200" in line and "target=p/a" in line
    assert "sidecar: stopped" in printed and "sidecar: draining" in printed

    quiet = start_sidecar(CONFIG.format(url=fake.openai_base_url, secret=SECRET),
                          args=("--log-level", "warning"))
    quiet.sdk().chat.completions.create(model="chat", messages=[{"role": "user", "content": "x"}])
    quiet.stop()
    assert "sidecar: request " not in "".join(quiet.output)


def test_bad_flags_are_refused(tmp_path: Any) -> None:
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "sidecar", "serve", "--log-format", "xml"],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 2 and "invalid choice: 'xml'" in r.stderr
