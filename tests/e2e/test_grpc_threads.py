"""The gRPC front end's threads (grpc's sync server, calls bridged to the event loop), end to
end: a real ``sidecar serve`` with ``grpc_max_calls = 4`` against the fake provider on
loopback. Calls beyond the limit are refused at once, streams held open (or not read) by
their clients do not hold up other calls, and a client's cancel reaches the upstream
through the bridge."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import psutil
import pytest

from sidecar.grpc.v1 import sidecar_pb2 as pb
from sidecar.grpc.v1 import sidecar_pb2_grpc
from tests.support.fake_provider import FakeProvider, hang, ok, slow_drip
from tests.support.process import GrpcSidecar, poll

MAX_CALLS = 4
CONFIG = """
[server]
request_timeout_s = 20
shutdown_grace_s = 2
grpc_max_calls = {max_calls}

[routing]
retries = 0
circuit_failures = 1000

[[providers]]
name = "p1"
type = "openai"
base_url = "{url}/v1"
timeout_s = 10
free = true

[[routes]]
model = "single"
targets = [{{ provider = "p1", model = "only" }}]
"""
HI = [pb.Message(role=pb.ROLE_USER, content="hi")]
REQUEST = pb.ChatRequest(model="single", messages=HI)


@pytest.fixture(scope="module")
def sidecar(fake_mod: FakeProvider, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[GrpcSidecar]:
    proc = GrpcSidecar(CONFIG.format(url=fake_mod.url, max_calls=MAX_CALLS),
                   tmp_path_factory.mktemp("grpc-threads"))
    yield proc
    assert proc.stop() == 0
    assert "Traceback" not in "".join(proc.output)


@pytest.fixture
def stub(sidecar: GrpcSidecar) -> Iterator[sidecar_pb2_grpc.SidecarStub]:
    with grpc.insecure_channel(sidecar.grpc_address) as ch:
        grpc.channel_ready_future(ch).result(timeout=10)
        yield sidecar_pb2_grpc.SidecarStub(ch)


def answers(stub: sidecar_pb2_grpc.SidecarStub) -> bool:
    """Whether a unary call is served now (not refused for the call limit)."""
    try:
        stub.Chat(REQUEST, timeout=10)
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e
        return False
    return True


def test_calls_beyond_the_limit_are_refused_at_once(stub: sidecar_pb2_grpc.SidecarStub,
                                                    fp: FakeProvider) -> None:
    fp.script("only", *[hang(after_chunks=1)] * MAX_CALLS)
    fp.set_default("only", ok())
    streams = [stub.ChatStream(REQUEST, timeout=30) for _ in range(MAX_CALLS)]
    try:
        for s in streams:  # each one holds a pool thread from here on
            assert next(s).choices
        requests = fp.stats()["requests"]
        for _ in range(2 * MAX_CALLS):  # unary and streams alike, without waiting
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as info:
                stub.Chat(REQUEST, timeout=10)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert time.monotonic() - started < 2
            with pytest.raises(grpc.RpcError) as info:
                list(stub.ChatStream(REQUEST, timeout=10))
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert fp.stats()["requests"] == requests  # refused before the gateway
        streams[0].cancel()  # one thread free: calls are served again
        assert fp.wait_for_cancelled(1, timeout=5)
        poll(lambda: answers(stub), within=10)
    finally:
        for s in streams:
            s.cancel()
    assert fp.wait_for_cancelled(MAX_CALLS, timeout=5)  # every upstream closed
    poll(lambda: all(answers(stub) for _ in range(MAX_CALLS)), within=10)


def test_a_client_that_does_not_read_holds_only_its_own_call(
        stub: sidecar_pb2_grpc.SidecarStub, fp: FakeProvider) -> None:
    fp.script("only", slow_drip(interval_s=0.01, chunks=500))
    fp.set_default("only", ok())
    stalled = stub.ChatStream(REQUEST, timeout=30)  # never read until the end
    fp.wait_for_requests(1)
    for _ in range(20):  # meanwhile the other threads serve everyone else
        reply = stub.Chat(REQUEST, timeout=10)
        assert reply.choices[0].message.content
    stalled.cancel()
    assert fp.wait_for_cancelled(1, timeout=5)


def test_a_unary_cancel_reaches_the_upstream(stub: sidecar_pb2_grpc.SidecarStub,
                                             fp: FakeProvider) -> None:
    fp.script("only", hang())
    call = stub.Chat.future(REQUEST, timeout=30)
    fp.wait_for_requests(1)
    call.cancel()
    assert fp.wait_for_cancelled(1, timeout=5)  # the gateway call, cancelled on the loop
    fp.set_default("only", ok())
    poll(lambda: answers(stub), within=10)


def test_streams_many_at_once_up_to_the_limit(stub: sidecar_pb2_grpc.SidecarStub,
                                             fp: FakeProvider, sidecar: GrpcSidecar) -> None:
    """Rounds of MAX_CALLS concurrent streams, read to their end: every one served in
    full, and the pool's threads are reused (the process does not grow a thread per call)."""
    fp.set_default("only", slow_drip(interval_s=0.005, chunks=5))
    sidecar_threads = None
    for _ in range(5):
        streams = [stub.ChatStream(REQUEST, timeout=30) for _ in range(MAX_CALLS)]
        texts = ["".join(c.choices[0].delta.content for c in s if c.choices) for s in streams]
        assert all(texts) and len(set(texts)) == 1
        threads = psutil.Process(sidecar.proc.pid).num_threads()
        if sidecar_threads is None:
            sidecar_threads = threads
        assert threads <= sidecar_threads + 1


@pytest.mark.parametrize("stream", [False, True])
def test_stop_signals_repeated_through_shutdown_still_exit_cleanly(
        fake: FakeProvider, tmp_path: Path, stream: bool) -> None:
    """An operator (or a supervisor) that sends SIGTERM again and again while the sidecar
    shuts down gets a clean exit, 0, whichever step of the shutdown each signal lands in:
    the drain, the cut, closing the gateway, or the process's own exit (threads joined)."""
    fake.script("only", slow_drip(interval_s=0.2, chunks=200) if stream else ok("hi"))
    proc = GrpcSidecar(CONFIG.format(url=fake.url, max_calls=MAX_CALLS), tmp_path)
    try:
        with grpc.insecure_channel(proc.grpc_address) as ch:
            stub = sidecar_pb2_grpc.SidecarStub(ch)
            if stream:
                call = stub.ChatStream(REQUEST, timeout=30)
                assert next(call).choices
            else:
                assert stub.Chat(REQUEST, timeout=10).choices
            deadline = time.monotonic() + 20
            sent = 0
            while proc.proc.poll() is None and time.monotonic() < deadline:
                proc.proc.send_signal(signal.SIGTERM)
                sent += 1
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.proc.wait(0.005)
        assert sent > 1
    finally:
        code = proc.stop()
    assert code == 0, "".join(proc.output)
    assert "Traceback" not in "".join(proc.output)
