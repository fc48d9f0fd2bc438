"""Shared fixtures: a fake provider on loopback and real ``sidecar serve`` processes."""

from __future__ import annotations

import os
import selectors
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.fakes.provider import FakeProvider

ROOT = Path(__file__).resolve().parent.parent


def closed_port() -> int:
    """A loopback port nothing listens on (bound once, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


class SidecarProcess:
    """A real ``sidecar serve`` child process on a free loopback port."""

    def __init__(
        self,
        config_text: str,
        tmp_path: Path,
        env: dict[str, str] | None = None,
        args: tuple[str, ...] = (),
    ) -> None:
        self.config_path = tmp_path / f"sidecar-{time.monotonic_ns()}.toml"
        self.config_path.write_text(textwrap.dedent(config_text))
        full_env = {**os.environ, **(env or {})}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sidecar",
                "serve",
                "--config",
                str(self.config_path),
                "--port",
                "0",
                "--grpc-port",
                "0",
                *args,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=ROOT,
        )
        self.output: list[str] = []
        self.port = self._wait_ready(timeout=30)
        self.url = f"http://127.0.0.1:{self.port}"
        self.base_url = f"{self.url}/v1"

    def _wait_ready(self, timeout: float) -> int:
        assert self.proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not sel.select(timeout=deadline - time.monotonic()):
                break
            line = self.proc.stdout.readline().decode(errors="replace")
            if not line:
                break
            self.output.append(line)
            if "http listening on" in line:
                sel.close()
                return int(line.rsplit(":", 1)[1])
        sel.close()
        self.proc.kill()
        raise RuntimeError("sidecar did not start:\n" + "".join(self.output) + self._rest())

    def _rest(self) -> str:
        assert self.proc.stdout is not None
        try:
            return self.proc.stdout.read().decode(errors="replace")
        except ValueError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.output.append(self._rest())
        return self.proc.returncode


@pytest.fixture
def fake() -> Iterator[FakeProvider]:
    with FakeProvider() as f:
        yield f


@pytest.fixture
def start_sidecar(tmp_path: Path) -> Iterator[Callable[..., SidecarProcess]]:
    started: list[SidecarProcess] = []

    def start(config_text: str, **kw: object) -> SidecarProcess:
        proc = SidecarProcess(config_text, tmp_path, **kw)  # type: ignore[arg-type]
        started.append(proc)
        return proc

    yield start
    for p in started:
        p.stop()


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )
