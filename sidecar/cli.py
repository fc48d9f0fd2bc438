"""``sidecar serve | check | models | chat``, and ``sidecar --version``.

Exit codes: 0 success, 1 invalid config or failed request, 2 usage error.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import os
import re
import subprocess
import sys
from collections.abc import Iterator, Sequence

import msgspec

from sidecar import __version__
from sidecar.cache import CacheUnavailable
from sidecar.config import Config, ConfigError, default_config, load_config
from sidecar.logs import LEVELS
from sidecar.money import LedgerUnavailable
from sidecar.providers.sse import SSEDecoder
from sidecar.redact import MIN_SECRET_LEN, redact_url, short_secrets
from sidecar.types import ChatChunk, ErrorDetail

DEFAULT_URL = "http://127.0.0.1:8088"
DISTRIBUTION = "sidecar-gateway"  # [project] name in pyproject.toml


def version() -> str:
    """The installed distribution's version; the package's own ``__version__`` when it is
    not installed (run from a source tree on ``PYTHONPATH``)."""
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return __version__


def base_url(url: str) -> str:
    """The root URL of a sidecar from what a user gives: ``http://host:port`` or, as copied
    from an OpenAI client's ``base_url``, ``http://host:port/v1``; trailing slashes and one
    trailing ``/v1`` are dropped (a path before it, as behind a proxy, is kept)."""
    return url.rstrip("/").removesuffix("/v1").rstrip("/")


def _config_path(arg: str | None) -> str | None:
    return arg or os.environ.get("SIDECAR_CONFIG") or None


def _load(path: str | None) -> Config:
    """The config at ``path``, or the embedded default (the local SmolLM2 model)."""
    return default_config() if path is None else load_config(path)


def cmd_serve(args: argparse.Namespace) -> int:
    path = _config_path(args.config)
    overrides = {
        k: v
        for k, v in {"host": args.host, "port": args.port, "grpc_port": args.grpc_port,
                     "uds": args.uds}.items()
        if v is not None
    }

    def load() -> Config:
        """The config file (again, on a reload) with the command line's overrides."""
        config = _load(path)
        if overrides:
            server = msgspec.structs.replace(config.server, **overrides)
            config = msgspec.structs.replace(config, server=server)
        return config

    config = load()
    from sidecar.runtime import serve

    serve(config, log_format=args.log_format, log_level=args.log_level,
          reload=load if path is not None else None)
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    """Ask a running sidecar to re-read its config (as SIGHUP does) and say how it went."""
    import httpx

    url = base_url(args.url or os.environ.get("SIDECAR_URL") or DEFAULT_URL)
    headers = {"authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        r = httpx.post(f"{url}/v1/sidecar/reload", headers=headers, timeout=args.timeout)
    except httpx.HTTPError as e:
        print(f"error: cannot reach the sidecar at {redact_url(url)} ({type(e).__name__})",
              file=sys.stderr)
        return 1
    try:
        body = r.json()
    except ValueError:
        body = {}
    if r.status_code == 200:
        print(f"reloaded: {body.get('routes', '?')} routes, {body.get('providers', '?')} "
              "providers")
        return 0
    error = body.get("error") if isinstance(body, dict) else None
    message = error.get("message") if isinstance(error, dict) else r.text[:500]
    print(f"error: reload refused (HTTP {r.status_code}): {message}", file=sys.stderr)
    return 1


def cmd_check(args: argparse.Namespace) -> int:
    config = _load(_config_path(args.config))
    print(f"config OK: {len(config.providers)} providers, {len(config.routes)} routes, "
          f"{len(config.local_models)} local models")
    for p in config.providers:
        print(f"  provider {p.name:<16} {type(p).__name__:<18} {redact_url(p.base_url)}")
    for r in config.routes:
        targets = " -> ".join(
            f"{t.provider}/{t.model}" + (f" (w={t.weight:g})" if r.strategy == "weighted" else "")
            for t in r.targets
        )
        how = r.strategy + (f", {r.prefer} first" if r.prefer else "")
        print(f"  route    {r.model:<16} {how:<18} {targets}")
    for m in config.local_models:
        source = f"path {m.path}" if m.path else f"package {m.package}"
        print(f"  local    {m.name:<16} {source} (n_ctx {m.n_ctx} x {m.n_parallel})")
    for d in config.local.model_dirs:
        print(f"  local    {'*.gguf':<16} scanned in {d}")
    for where in short_secrets(config):
        print(f"warning: {where} is shorter than {MIN_SECRET_LEN} characters, so it is not "
              "redacted from errors and logs", file=sys.stderr)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    import psutil

    from local_models import gpu_offload_supported
    from sidecar.host import memory_floor_bytes
    from sidecar.runtime import build_catalog, memory_budget

    config = _load(_config_path(args.config))
    catalog = build_catalog(config)
    rows = [("NAME", "SIZE", "QUANT", "ARCH", "PARAMS", "CONTEXT", "EST. MEMORY", "STATUS")]
    for e in catalog.entries:
        info, mem = e.info, e.memory
        ctx = f"{e.spec.n_ctx}x{e.spec.n_parallel}"
        if info is not None:
            ctx += f" (max {info.context_length})"
        rows.append((
            e.name,
            _size(info.file_size) if info else "-",
            info.quantization if info else "-",
            info.architecture if info else "-",
            f"{info.n_params / 1e6:.0f}M" if info else "-",
            ctx,
            (f"{_size(mem.total)} (weights {_size(mem.weights)}, kv {_size(mem.kv_cache)}, "
             f"compute {_size(mem.compute)})") if mem else "-",
            "ok" if e.error is None else f"error: {e.error}",
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1])
    if not catalog.entries:
        print("(no local models configured or found)")
    for warning in catalog.warnings:
        print(f"warning: {warning}")
    budget = memory_budget(config)
    print(f"\nmemory budget: {_size(budget)}"
          + ("" if config.local.memory_budget_mb else " (75% of physical memory)"))
    vm = psutil.virtual_memory()
    floor = memory_floor_bytes(config.resources, vm.total)
    print(f"memory available now: {_size(vm.available)}; a load must leave {_size(floor)} "
          "free (memory floor)")
    offload = gpu_offload_supported()
    print("GPU offload: " + ("available in this llama-cpp-python build" if offload else
                             "not available (CPU-only llama-cpp-python build; see README)"))
    return 0 if all(e.error is None for e in catalog.entries) else 1


def _size(n: int) -> str:
    if n >= 1 << 30:
        return f"{n / (1 << 30):.1f} GiB"
    return f"{n / (1 << 20):.0f} MiB"


def cmd_chat(args: argparse.Namespace) -> int:
    """Stream one answer from a running sidecar. When nothing listens at the default URL,
    start one for this request (``$SIDECAR_CONFIG`` or the embedded default) and stop it."""
    import httpx

    given = args.url or os.environ.get("SIDECAR_URL")
    url = base_url(given) if given else None
    try:
        return _chat(url or DEFAULT_URL, args)
    except httpx.ConnectError:
        if url:
            print(f"error: cannot reach the sidecar at {redact_url(url)}", file=sys.stderr)
            return 1
    print(f"sidecar: nothing listens at {DEFAULT_URL}; starting one for this request",
          file=sys.stderr)
    with _temporary_sidecar() as started:
        if started is None:
            print("error: the sidecar did not start", file=sys.stderr)
            return 1
        try:
            return _chat(started, args)
        except httpx.HTTPError as e:
            print(f"error: {type(e).__name__}", file=sys.stderr)
            return 1


def _chat(url: str, args: argparse.Namespace) -> int:
    import httpx

    headers = {"authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    body = {"model": args.model, "stream": True,
            "messages": [{"role": "user", "content": args.text}]}
    try:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body,
                          headers=headers, timeout=args.timeout) as resp:
            if resp.status_code != 200:
                resp.read()
                print(f"error: HTTP {resp.status_code}: {resp.text}", file=sys.stderr)
                return 1
            events = SSEDecoder()
            for piece in resp.iter_bytes():
                for event in events.feed(piece):
                    error = _print_chunk(event.data)
                    if error is not None:
                        print(f"\nerror: {error}", file=sys.stderr)
                        return 1
            print(f"\n[{resp.headers.get('x-sidecar-target')}]", file=sys.stderr)
    except httpx.ConnectError:
        raise
    except httpx.HTTPError as e:
        print(f"error: request to the sidecar at {redact_url(url)} failed: {type(e).__name__}",
              file=sys.stderr)
        return 1
    return 0


def _print_chunk(data: bytes) -> str | None:
    """Print the content of one stream event's chunk; return the message of an error event
    (None for any other event)."""
    if not data or data == b"[DONE]":
        return None
    chunk = msgspec.json.decode(data, type=ChatChunk)
    if isinstance(chunk.error, ErrorDetail):
        return str(chunk.error.message)
    if isinstance(chunk.error, str):
        return chunk.error
    for choice in chunk.choices or ():
        print((choice.delta.content if choice.delta else None) or "", end="", flush=True)
    return None


@contextlib.contextmanager
def _temporary_sidecar() -> Iterator[str | None]:
    """A ``sidecar serve`` child on a free loopback port; yields its URL (None if it did
    not start) and stops it afterwards."""
    argv = [sys.executable, "-m", "sidecar", "serve", "--host", "127.0.0.1", "--port", "0",
            "--grpc-port", "0"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            m = re.search(r"http listening on (\S+)$", line.strip())
            if m:
                yield f"http://{m.group(1)}"
                return
        yield None
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sidecar", description="An AI gateway for one host.")
    p.add_argument("--version", action="version", version=f"sidecar {version()}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the gateway")
    s.add_argument("--config", help="TOML config (default: $SIDECAR_CONFIG)")
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.add_argument("--grpc-port", type=int)
    s.add_argument("--uds")
    s.add_argument("--log-format", choices=("text", "json"),
                   default=os.environ.get("SIDECAR_LOG_FORMAT", "text"),
                   help="stderr lines as text or one JSON object each (default: "
                   "$SIDECAR_LOG_FORMAT, else text)")
    s.add_argument("--log-level", choices=LEVELS,
                   default=os.environ.get("SIDECAR_LOG_LEVEL", "info"),
                   help="the least severe records logged; info includes one line per "
                   "request (default: $SIDECAR_LOG_LEVEL, else info)")
    s.set_defaults(func=cmd_serve)

    rl = sub.add_parser("reload", help="make a running sidecar re-read its config (as "
                        "SIGHUP does); an invalid one is refused and the old one serves on")
    rl.add_argument("--url", help=f"the sidecar (default: $SIDECAR_URL, else {DEFAULT_URL})")
    rl.add_argument("--api-key", default=os.environ.get("SIDECAR_API_KEY"))
    rl.add_argument("--timeout", type=float, default=60.0)
    rl.set_defaults(func=cmd_reload)

    c = sub.add_parser("check", help="validate a config and print its routes")
    c.add_argument("--config", help="TOML config (default: $SIDECAR_CONFIG)")
    c.set_defaults(func=cmd_check)

    m = sub.add_parser("models", help="list local GGUF models and the memory each needs")
    m.add_argument("--config", help="TOML config (default: $SIDECAR_CONFIG, else the "
                   "embedded default)")
    m.set_defaults(func=cmd_models)

    ch = sub.add_parser("chat", help="one-shot chat against a running sidecar")
    ch.add_argument("text")
    ch.add_argument("--model", default=os.environ.get("SIDECAR_MODEL", "smollm2"))
    ch.add_argument("--url", help="a running sidecar, with or without the /v1 of an OpenAI "
                    f"base_url (default: $SIDECAR_URL, else {DEFAULT_URL}, else one started "
                    "for this request)")
    ch.add_argument("--api-key", default=os.environ.get("SIDECAR_API_KEY"))
    ch.add_argument("--timeout", type=float, default=120.0)
    ch.set_defaults(func=cmd_chat)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as e:
        print(f"error: invalid config: {e}", file=sys.stderr)
        return 1
    except (LedgerUnavailable, CacheUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
