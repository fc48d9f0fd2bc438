"""Small user-facing gaps, end to end: ``sidecar --version``; ``sidecar chat --url`` (and
``$SIDECAR_URL``) given an OpenAI ``base_url`` ending in ``/v1``; gRPC server reflection v1
beside v1alpha. One real ``sidecar serve`` (remote fake provider only, so no model is
loaded) serves both HTTP and gRPC for the module."""

from __future__ import annotations

import tomllib
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor_database import DescriptorDatabase
from grpc_reflection.v1alpha import reflection_pb2 as rpb

from sidecar.cli import base_url
from tests.support.fake_provider import FakeProvider, ok
from tests.support.process import ROOT, SidecarProcess, closed_port, run_cli

CONFIG = """
[server]
request_timeout_s = 20
shutdown_grace_s = 1

[[providers]]
name = "p1"
type = "openai"
base_url = "{url}/v1"
timeout_s = 5

[[routes]]
model = "single"
targets = [{{ provider = "p1", model = "only" }}]
"""

V1 = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
V1ALPHA = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"


class Sidecar(SidecarProcess):
    """``sidecar serve`` with gRPC on a free loopback port too."""

    def __init__(self, config_text: str, tmp_path: Path) -> None:
        self.grpc_address = f"127.0.0.1:{closed_port()}"
        super().__init__(config_text, tmp_path,
                         args=("--grpc-port", self.grpc_address.rsplit(":", 1)[1]))


@pytest.fixture(scope="module")
def sidecar(fake_mod: FakeProvider, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[Sidecar]:
    proc = Sidecar(CONFIG.format(url=fake_mod.url), tmp_path_factory.mktemp("gaps"))
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def channel(sidecar: Sidecar) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(sidecar.grpc_address) as ch:
        grpc.channel_ready_future(ch).result(timeout=10)
        yield ch


# --- sidecar --version ----------------------------------------------------------------------


def test_version_prints_the_distribution_version() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    res = run_cli("--version")
    assert res.returncode == 0, res.stderr
    assert res.stdout == f"sidecar {project['version']}\n"
    assert res.stderr == ""


# --- sidecar chat --url ---------------------------------------------------------------------


@pytest.mark.parametrize(("given", "root"), [
    ("http://127.0.0.1:8088", "http://127.0.0.1:8088"),
    ("http://127.0.0.1:8088/", "http://127.0.0.1:8088"),
    ("http://127.0.0.1:8088/v1", "http://127.0.0.1:8088"),
    ("http://127.0.0.1:8088/v1/", "http://127.0.0.1:8088"),
    ("http://h/proxy/v1", "http://h/proxy"),
    ("http://h/v1/v1", "http://h/v1"),  # only one /v1 comes off
    ("http://h/v10", "http://h/v10"),
])
def test_base_url_drops_one_trailing_v1(given: str, root: str) -> None:
    assert base_url(given) == root


@pytest.mark.parametrize("suffix", ["", "/", "/v1", "/v1/"])
def test_chat_url_with_or_without_v1(sidecar: Sidecar, fp: FakeProvider, suffix: str) -> None:
    fp.script("only", ok("Hello there", chunks=2))
    res = run_cli("chat", "hi", "--model", "single", "--url", sidecar.url + suffix,
                  env={"SIDECAR_URL": "http://127.0.0.1:1"})  # --url wins over it
    assert res.returncode == 0, res.stderr
    assert res.stdout == "Hello there"
    assert res.stderr.endswith("\n[p1/only]\n")


@pytest.mark.parametrize("suffix", ["", "/v1"])
def test_chat_sidecar_url_with_or_without_v1(sidecar: Sidecar, fp: FakeProvider,
                                             suffix: str) -> None:
    fp.script("only", ok("Hi from env", chunks=2))
    res = run_cli("chat", "hi", "--model", "single", env={"SIDECAR_URL": sidecar.url + suffix})
    assert res.returncode == 0, res.stderr
    assert res.stdout == "Hi from env"


# --- gRPC reflection v1 ---------------------------------------------------------------------


def reflect(channel: grpc.Channel, method: str, *requests: rpb.ServerReflectionRequest
            ) -> list[rpb.ServerReflectionResponse]:
    """Send ``requests`` on one reflection stream at ``method``; the answers in order. The
    v1alpha message classes serve v1 too: the two protos are the same on the wire."""
    call = channel.stream_stream(
        method,
        request_serializer=rpb.ServerReflectionRequest.SerializeToString,
        response_deserializer=rpb.ServerReflectionResponse.FromString,
    )
    return list(call(iter(requests), timeout=10))


def pool_of(response: rpb.ServerReflectionResponse) -> descriptor_pool.DescriptorPool:
    """A pool of the files (a file and its dependencies) in a file descriptor answer."""
    assert response.WhichOneof("message_response") == "file_descriptor_response", response
    db = DescriptorDatabase()
    for raw in response.file_descriptor_response.file_descriptor_proto:
        db.Add(descriptor_pb2.FileDescriptorProto.FromString(raw))
    return descriptor_pool.DescriptorPool(db)


def test_reflection_v1_lists_and_describes_the_services(channel: grpc.Channel) -> None:
    listed, sidecar_file, health_file = reflect(
        channel, V1,
        rpb.ServerReflectionRequest(list_services=""),
        rpb.ServerReflectionRequest(file_containing_symbol="sidecar.v1.Sidecar"),
        rpb.ServerReflectionRequest(file_containing_symbol="grpc.health.v1.Health"),
    )
    names = {s.name for s in listed.list_services_response.service}
    assert names == {"sidecar.v1.Sidecar", "grpc.health.v1.Health",
                     "grpc.reflection.v1.ServerReflection",
                     "grpc.reflection.v1alpha.ServerReflection"}
    service = pool_of(sidecar_file).FindServiceByName("sidecar.v1.Sidecar")
    assert [m.name for m in service.methods] == ["Chat", "ChatStream", "Embed", "ListModels"]
    assert service.file.name == "sidecar/v1/sidecar.proto"
    assert pool_of(health_file).FindServiceByName("grpc.health.v1.Health").methods


def test_reflection_v1_describes_itself_as_v1(channel: grpc.Channel) -> None:
    """Every listed service resolves (``grpcurl describe`` needs that), the v1 one to a v1
    file whose messages match v1alpha's field for field (so they are the same on the
    wire)."""
    (answer,) = reflect(channel, V1, rpb.ServerReflectionRequest(
        file_containing_symbol="grpc.reflection.v1.ServerReflection"))
    pool = pool_of(answer)
    service = pool.FindServiceByName("grpc.reflection.v1.ServerReflection")
    assert service.file.name == "grpc/reflection/v1/reflection.proto"
    assert service.file.package == "grpc.reflection.v1"
    assert not service.file.GetOptions().deprecated
    (method,) = service.methods
    assert method.name == "ServerReflectionInfo"
    assert method.input_type.full_name == "grpc.reflection.v1.ServerReflectionRequest"
    assert method.output_type.full_name == "grpc.reflection.v1.ServerReflectionResponse"
    assert method.client_streaming and method.server_streaming

    def shape(file: descriptor_pb2.FileDescriptorProto, package: str) -> object:
        return [(m.name, [(f.name, f.number, f.type, f.label, f.type_name.replace(package, "P"),
                           f.oneof_index if f.HasField("oneof_index") else None)
                          for f in m.field])
                for m in file.message_type]

    v1, v1alpha = descriptor_pb2.FileDescriptorProto(), descriptor_pb2.FileDescriptorProto()
    service.file.CopyToProto(v1)
    rpb.DESCRIPTOR.CopyToProto(v1alpha)
    assert v1.message_type and all(f.number for m in v1.message_type for f in m.field)
    assert shape(v1, ".grpc.reflection.v1.") == shape(v1alpha, ".grpc.reflection.v1alpha.")


def test_reflection_v1_answers_as_v1alpha_does(channel: grpc.Channel) -> None:
    requests = [
        rpb.ServerReflectionRequest(list_services=""),
        rpb.ServerReflectionRequest(file_containing_symbol="sidecar.v1.ChatRequest"),
        rpb.ServerReflectionRequest(file_by_filename="sidecar/v1/sidecar.proto"),
        rpb.ServerReflectionRequest(file_containing_symbol="google.rpc.RetryInfo"),
        rpb.ServerReflectionRequest(file_containing_symbol="no.such.Symbol"),
        rpb.ServerReflectionRequest(file_by_filename="no/such.proto"),
        rpb.ServerReflectionRequest(all_extension_numbers_of_type="sidecar.v1.ChatRequest"),
        rpb.ServerReflectionRequest(file_containing_extension=rpb.ExtensionRequest(
            containing_type="sidecar.v1.ChatRequest", extension_number=5)),
    ]
    v1 = reflect(channel, V1, *requests)
    assert v1 == reflect(channel, V1ALPHA, *requests)
    kinds = [r.WhichOneof("message_response") for r in v1]
    assert kinds == ["list_services_response", *["file_descriptor_response"] * 3,
                     *["error_response"] * 2, "all_extension_numbers_response",
                     "error_response"]
    assert {r.error_response.error_code for r in v1 if r.HasField("error_response")} == {
        grpc.StatusCode.NOT_FOUND.value[0]}
    # the rich error details the server sends resolve too
    assert pool_of(v1[3]).FindMessageTypeByName("google.rpc.RetryInfo")
