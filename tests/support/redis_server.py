"""A real, throw-away ``redis-server`` for tests.

:class:`RedisServer` starts one on a free loopback port with no persistence, waits until it
answers PING, and stops it; :meth:`~RedisServer.stop` and :meth:`~RedisServer.restart`
(same port, empty data) make outage tests possible. :func:`redis_server_fixture` makes a
pytest fixture of it that skips the test when ``redis-server`` is not installed::

    redis_server = redis_server_fixture(scope="module")

    def test_something(redis_server: RedisServer) -> None:
        client = redis.Redis.from_url(redis_server.url)
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import pytest

from tests.support.process import closed_port

START_TIMEOUT_S = 10.0


def redis_server_binary() -> str:
    """The ``redis-server`` executable, or skip the calling test with the reason."""
    path = shutil.which("redis-server")
    if path is None:
        pytest.skip("redis-server is not on PATH (install Redis to run the Redis tests)")
    return path


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            reply = s.recv(64)
    except OSError:
        return False
    # With requirepass the server answers -NOAUTH: it is up all the same.
    return reply.startswith((b"+PONG", b"-NOAUTH"))


class RedisServer:
    """One ``redis-server`` child process on ``127.0.0.1:port`` (no RDB, no AOF)."""

    def __init__(self, *, password: str | None = None) -> None:
        self.binary = redis_server_binary()
        self.password = password
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._dir = Path(tempfile.mkdtemp(prefix="sidecar-redis-"))
        self._log = self._dir / "redis.log"

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        """Start on a fresh free port (a few tries, in case another process takes it)."""
        error: RuntimeError | None = None
        for _ in range(5):
            self.port = closed_port()
            try:
                self._spawn()
                return
            except RuntimeError as e:
                error = e
        assert error is not None
        raise error

    def _spawn(self) -> None:
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--dir", str(self._dir),
            "--logfile", str(self._log),
        ]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            if _answers_ping(self.port):
                return
            time.sleep(0.01)
        self._terminate(kill=True)
        log = self._log.read_text(errors="replace")[-2000:] if self._log.exists() else ""
        raise RuntimeError(f"redis-server did not start on port {self.port}:\n{log}")

    def stop(self, *, kill: bool = False) -> None:
        """Stop the server (SIGKILL with ``kill``, like a crash); the port stays reserved."""
        self._terminate(kill=kill)

    def restart(self) -> None:
        """Start again on the same port (with no data: nothing is persisted)."""
        self._terminate(kill=False)
        self._spawn()

    def _terminate(self, *, kill: bool) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def close(self) -> None:
        self._terminate(kill=False)
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def redis_server_fixture(
    scope: Literal["function", "class", "module", "package", "session"] = "function",
    **kwargs: Any,
) -> Callable[[], Iterator[RedisServer]]:
    """A pytest fixture yielding a started :class:`RedisServer` (``kwargs`` go to it)."""

    @pytest.fixture(scope=scope)
    def _redis_server() -> Iterator[RedisServer]:
        with RedisServer(**kwargs) as server:
            yield server

    return _redis_server
