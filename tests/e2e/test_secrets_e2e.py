"""End to end: no configured secret reaches a client or the sidecar's output when an
upstream echoes the credentials it received (the fake's ``echo`` behaviour), through a
real ``sidecar serve``: the official ``openai`` SDK and httpx over HTTP, a real gRPC
channel, OpenAI- and Anthropic-type providers, non-stream, stream and embeddings, the
502 summary and the process's stdout/stderr."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import grpc
import httpx
import openai
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from sidecar.grpc.v1 import sidecar_pb2 as pb
from sidecar.grpc.v1 import sidecar_pb2_grpc
from tests.support.fake_provider import FakeProvider, echo
from tests.support.process import SidecarProcess, closed_port, run_cli

OPENAI_KEY = "sk-openai-e2e-secret-1"
ANTHROPIC_KEY = "sk-ant-e2e-secret-2"
HEADER = "extra-header-secret-3"
CLIENT = "client-e2e-secret-4"
NAMED = "named-e2e-secret-5"
URL_USER, URL_PW = "proxyuser", "proxy-pass-secret-6"

SECRETS = [OPENAI_KEY, ANTHROPIC_KEY, HEADER, CLIENT, NAMED, URL_PW]
# What an echo of them shows: themselves, URL-encoded, and Basic auth of the userinfo.
LEAKS = [*SECRETS, *(quote(s, safe="") for s in SECRETS),
         base64.b64encode(f"{URL_USER}:{URL_PW}".encode()).decode().rstrip("=")]

CONFIG = """
[server]
request_timeout_s = 20
api_keys = ["{client}"]
access_log = true

[[keys]]
name = "app"
key = "{named}"

[routing]
retries = 0
circuit_failures = 1000

[[providers]]
name = "oai"
type = "openai"
base_url = "{url}/v1"
api_key = "{openai_key}"
headers = {{ "x-extra" = "{header}" }}
timeout_s = 5

[[providers]]
name = "viaproxy"
type = "openai"
base_url = "{userinfo_url}/v1"
api_key = "{openai_key}"
timeout_s = 5

[[providers]]
name = "ant"
type = "anthropic"
base_url = "{url}"
api_key = "{anthropic_key}"
headers = {{ "x-extra" = "{header}" }}
timeout_s = 5

[[routes]]
model = "o"
targets = [{{ provider = "oai", model = "o" }}]

[[routes]]
model = "p"
targets = [{{ provider = "viaproxy", model = "p" }}]

[[routes]]
model = "a"
targets = [{{ provider = "ant", model = "a" }}]

[[routes]]
model = "two"
targets = [{{ provider = "oai", model = "t1" }}, {{ provider = "ant", model = "t2" }}]

[[routes]]
model = "emb"
targets = [{{ provider = "oai", model = "e" }}]
"""


HI = [{"role": "user", "content": "hi"}]


def assert_clean(text: str | bytes, what: str = "") -> None:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    for leak in LEAKS:
        assert leak not in text, f"{what}: a secret leaked: {text[:2000]}"


class Sidecar(SidecarProcess):
    def __init__(self, fake: FakeProvider, tmp: Path) -> None:
        self.grpc_address = f"127.0.0.1:{closed_port()}"
        userinfo_url = fake.url.replace("://", f"://{URL_USER}:{URL_PW}@")
        text = CONFIG.format(url=fake.url, userinfo_url=userinfo_url, client=CLIENT,
                             named=NAMED, openai_key=OPENAI_KEY, anthropic_key=ANTHROPIC_KEY,
                             header=HEADER)
        super().__init__(text, tmp, args=("--grpc-port", self.grpc_address.rsplit(":")[1]))


@pytest.fixture(scope="module")
def sidecar(fake_mod: FakeProvider, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[Sidecar]:
    proc = Sidecar(fake_mod, tmp_path_factory.mktemp("secrets"))
    yield proc
    proc.stop()


@pytest.fixture
def client(sidecar: Sidecar) -> openai.OpenAI:
    return sidecar.sdk(CLIENT)


def sse(sidecar: Sidecar, body: dict[str, object]) -> httpx.Response:
    """A stream request with httpx, read to the end."""
    return httpx.post(f"{sidecar.base_url}/chat/completions",
                      json={**body, "stream": True, "messages": HI},
                      headers={"authorization": f"Bearer {NAMED}"}, timeout=30)


def test_the_fake_echoes_the_credentials(fp: FakeProvider) -> None:
    """The fault is real: without the sidecar in between, the echo carries the key."""
    fp.script("raw", echo(code=500))
    r = httpx.post(f"{fp.openai_base_url}/chat/completions", timeout=10,
                   json={"model": "raw", "messages": HI},
                   headers={"authorization": f"Bearer {OPENAI_KEY}", "x-extra": HEADER})
    assert r.status_code == 500
    assert f"Bearer {OPENAI_KEY}" in r.json()["error"]["message"]
    assert HEADER in r.json()["error"]["message"]


@pytest.mark.parametrize("model", ["o", "p", "a"])
@pytest.mark.parametrize("code", [400, 500])
def test_error_answers(client: openai.OpenAI, fp: FakeProvider, model: str, code: int) -> None:
    """A 4xx goes to the client as the provider's refusal, a 5xx as the 502 summary: both
    carry the provider's message, redacted."""
    fp.script(model, echo(code=code))
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model=model, messages=HI)  # type: ignore[arg-type]
    err = info.value
    assert err.status_code == (code if code == 400 else 502)
    assert "[redacted]" in err.message  # the echo arrived, redacted
    assert_clean(err.message, "message")
    assert_clean(err.response.text, "body")
    assert_clean(json.dumps(dict(err.response.headers)), "headers")


def test_502_summary_of_two_echoing_targets(client: openai.OpenAI, fp: FakeProvider) -> None:
    fp.script("t1", echo(code=503))
    fp.script("t2", echo(code=500))
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="two", messages=HI)  # type: ignore[arg-type]
    assert info.value.status_code == 502
    assert "'two'" in info.value.message  # the summary of the route's attempts
    assert "[redacted]" in info.value.message
    assert_clean(info.value.response.text)


@pytest.mark.parametrize("model", ["o", "p", "a"])
def test_ok_bodies_that_echo(client: openai.OpenAI, fp: FakeProvider, model: str) -> None:
    fp.script(model, echo("ok"))
    raw = client.chat.completions.with_raw_response.create(model=model, messages=HI)  # type: ignore[arg-type]
    text = raw.parse().choices[0].message.content or ""
    assert "[redacted]" in text
    assert_clean(raw.http_response.text)


@pytest.mark.parametrize("model", ["o", "p", "a"])
def test_streams_that_echo(client: openai.OpenAI, sidecar: Sidecar, fp: FakeProvider,
                           model: str) -> None:
    fp.script(model, echo("ok"))
    chunks = list(client.chat.completions.create(model=model, messages=HI, stream=True))  # type: ignore[arg-type]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "[redacted]" in text
    assert_clean(text)
    fp.script(model, echo("error", code=500))  # before the first token: an error status
    r = sse(sidecar, {"model": model})
    assert r.status_code == 502 and "[redacted]" in r.text
    assert_clean(r.text)


@pytest.mark.parametrize("model", ["o", "a"])
def test_mid_stream_error_frames(sidecar: Sidecar, fp: FakeProvider, model: str) -> None:
    fp.script(model, echo("stream_error"))
    r = sse(sidecar, {"model": model})
    assert r.status_code == 200
    frames = [line for line in r.text.splitlines() if line.startswith("data: {")]
    assert "error" in json.loads(frames[-1][6:])
    assert_clean(r.text)


def test_embeddings(client: openai.OpenAI, fp: FakeProvider) -> None:
    fp.script("e", echo("ok"))
    raw = client.embeddings.with_raw_response.create(model="emb", input="hi")
    assert "[redacted]" in raw.http_response.text
    assert_clean(raw.http_response.text)
    assert raw.parse().data[0].embedding
    fp.script("e", echo(code=400))
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model="emb", input="hi")
    assert "[redacted]" in info.value.message
    assert_clean(info.value.response.text)


@pytest.fixture(scope="module")
def stub(sidecar: Sidecar) -> Iterator[sidecar_pb2_grpc.SidecarStub]:
    with grpc.insecure_channel(sidecar.grpc_address) as ch:
        grpc.channel_ready_future(ch).result(timeout=10)
        yield sidecar_pb2_grpc.SidecarStub(ch)


GRPC_AUTH = (("authorization", f"Bearer {CLIENT}"),)


def grpc_chat(model: str) -> pb.ChatRequest:
    return pb.ChatRequest(model=model, messages=[pb.Message(role=pb.ROLE_USER, content="hi")])


def assert_clean_status(err: grpc.RpcError, want: grpc.StatusCode) -> None:
    assert err.code() == want  # type: ignore[attr-defined]
    details: str = err.details()  # type: ignore[attr-defined]
    assert "[redacted]" in details
    assert_clean(details, "status message")
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None
    assert_clean(status.SerializeToString(), "rich status")
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    assert_clean(json.dumps(dict(info.metadata)), "ErrorInfo")
    assert_clean(repr(err.trailing_metadata()), "trailing metadata")  # type: ignore[attr-defined]


@pytest.mark.parametrize("model", ["o", "a"])
def test_grpc(stub: sidecar_pb2_grpc.SidecarStub, fp: FakeProvider, model: str) -> None:
    fp.script(model, echo(code=400))
    with pytest.raises(grpc.RpcError) as info:
        stub.Chat(grpc_chat(model), metadata=GRPC_AUTH, timeout=30)
    assert_clean_status(info.value, grpc.StatusCode.INVALID_ARGUMENT)

    fp.script(model, echo(code=500))
    with pytest.raises(grpc.RpcError) as info:
        stub.Chat(grpc_chat(model), metadata=GRPC_AUTH, timeout=30)
    assert_clean_status(info.value, grpc.StatusCode.UNAVAILABLE)

    fp.script(model, echo("ok"))
    resp = stub.Chat(grpc_chat(model), metadata=GRPC_AUTH, timeout=30)
    assert "[redacted]" in resp.choices[0].message.content
    assert_clean(resp.SerializeToString())

    fp.script(model, echo("ok"))
    chunks = list(stub.ChatStream(grpc_chat(model), metadata=GRPC_AUTH, timeout=30))
    assert_clean(b"".join(c.SerializeToString() for c in chunks))

    if model == "a":  # Anthropic's mid-stream error event carries its message
        fp.script(model, echo("stream_error"))
        stream = stub.ChatStream(grpc_chat(model), metadata=GRPC_AUTH, timeout=30)
        with pytest.raises(grpc.RpcError) as info:
            list(stream)
        assert_clean_status(info.value, grpc.StatusCode.UNAVAILABLE)


def test_grpc_embed(stub: sidecar_pb2_grpc.SidecarStub, fp: FakeProvider) -> None:
    fp.script("e", echo(code=400))
    with pytest.raises(grpc.RpcError) as info:
        stub.Embed(pb.EmbedRequest(model="emb", input=["hi"]), metadata=GRPC_AUTH, timeout=30)
    assert_clean_status(info.value, grpc.StatusCode.INVALID_ARGUMENT)


def test_sidecar_output_has_no_secret(sidecar: Sidecar, fp: FakeProvider) -> None:
    """The access log prints request lines: a client key in a query string is redacted
    there, as in every log record and print. Checked last over everything logged."""
    r = httpx.get(f"{sidecar.base_url}/models", params={"api_key": CLIENT},
                  headers={"authorization": f"Bearer {CLIENT}"}, timeout=10)
    assert r.status_code == 200
    sidecar.stop()  # and read everything it printed
    out = "".join(sidecar.output)
    assert "GET /v1/models?api_key=" in out  # the access log line is there
    assert_clean(out, "sidecar stdout/stderr")


def test_check_prints_base_url_without_userinfo(sidecar: Sidecar) -> None:
    assert sidecar.config_path is not None
    out = run_cli("check", "--config", str(sidecar.config_path))
    assert out.returncode == 0, out.stderr
    assert "viaproxy" in out.stdout and "[redacted]@127.0.0.1" in out.stdout
    assert_clean(out.stdout + out.stderr)
