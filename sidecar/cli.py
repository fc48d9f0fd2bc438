"""``sidecar serve | check | models | chat``.

Exit codes: 0 success, 1 invalid config or failed request, 2 usage error.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import msgspec

from sidecar.config import Config, ConfigError, load_config

DEFAULT_URL = "http://127.0.0.1:8088"


def _config_path(arg: str | None) -> str | None:
    return arg or os.environ.get("SIDECAR_CONFIG") or None


def _load(path: str | None) -> Config:
    if path is None:
        raise ConfigError(
            "no config given: pass --config PATH or set SIDECAR_CONFIG "
            "(the embedded local default arrives with local inference)"
        )
    return load_config(path)


def cmd_serve(args: argparse.Namespace) -> int:
    config = _load(_config_path(args.config))
    server = config.server
    overrides = {
        k: v
        for k, v in {"host": args.host, "port": args.port, "grpc_port": args.grpc_port,
                     "uds": args.uds}.items()
        if v is not None
    }
    if overrides:
        server = msgspec.structs.replace(server, **overrides)
        config = msgspec.structs.replace(config, server=server)
    from sidecar.server import serve

    serve(config)
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    config = _load(_config_path(args.config))
    print(f"config OK: {len(config.providers)} providers, {len(config.routes)} routes")
    for p in config.providers:
        print(f"  provider {p.name:<16} {type(p).__name__:<18} {p.base_url}")
    for r in config.routes:
        targets = " -> ".join(
            f"{t.provider}/{t.model}" + (f" (w={t.weight:g})" if r.strategy == "weighted" else "")
            for t in r.targets
        )
        print(f"  route    {r.model:<16} {r.strategy:<18} {targets}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    print("NAME  SIZE  QUANT  ARCH  CONTEXT  EST. MEMORY")
    print("(no local models: local inference is not part of this build yet)")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    import httpx

    headers = {"authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    body = {"model": args.model, "stream": True,
            "messages": [{"role": "user", "content": args.text}]}
    decoder = msgspec.json.Decoder()
    try:
        with httpx.stream("POST", f"{args.url.rstrip('/')}/v1/chat/completions", json=body,
                          headers=headers, timeout=args.timeout) as resp:
            if resp.status_code != 200:
                resp.read()
                print(f"error: HTTP {resp.status_code}: {resp.text}", file=sys.stderr)
                return 1
            for line in resp.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = decoder.decode(line[6:])
                if "error" in event:
                    print(f"\nerror: {event['error'].get('message')}", file=sys.stderr)
                    return 1
                for choice in event.get("choices", []):
                    print(choice.get("delta", {}).get("content") or "", end="", flush=True)
            print(f"\n[{resp.headers.get('x-sidecar-target')}]", file=sys.stderr)
    except httpx.HTTPError as e:
        print(f"error: cannot reach the sidecar at {args.url}: {type(e).__name__}",
              file=sys.stderr)
        return 1
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sidecar", description="An AI gateway for one host.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the gateway")
    s.add_argument("--config", help="TOML config (default: $SIDECAR_CONFIG)")
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.add_argument("--grpc-port", type=int)
    s.add_argument("--uds")
    s.set_defaults(func=cmd_serve)

    c = sub.add_parser("check", help="validate a config and print its routes")
    c.add_argument("--config", help="TOML config (default: $SIDECAR_CONFIG)")
    c.set_defaults(func=cmd_check)

    m = sub.add_parser("models", help="list local GGUF models")
    m.set_defaults(func=cmd_models)

    ch = sub.add_parser("chat", help="one-shot chat against a running sidecar")
    ch.add_argument("text")
    ch.add_argument("--model", default="chat")
    ch.add_argument("--url", default=os.environ.get("SIDECAR_URL", DEFAULT_URL))
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
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
