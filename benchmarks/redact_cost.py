"""What redaction costs per reply body: :meth:`Redactor.data` over typical answers, with
the secrets of a realistic config (3 provider keys, a provider header, 4 client keys, a
Redis password: every form of each is searched).

    python benchmarks/redact_cost.py [--secrets 9] [--number 5000]

Prints µs per call (best of 5 runs) for bodies of 0.5, 2, 16 and 128 KB without a secret (the common
case: nothing is copied) and for a 2 KB body with one.
"""

from __future__ import annotations

import argparse
import json
import secrets
import timeit

from sidecar.redact import Redactor


def body(size: int, leak: str = "") -> bytes:
    text = ("The quick brown fox jumps over the lazy dog. " * (size // 45 + 1))[:size]
    return json.dumps({"id": "chatcmpl-1", "object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": text + leak},
         "finish_reason": "stop"}], "usage": {"prompt_tokens": 9, "completion_tokens": 99}
    }).encode()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--secrets", type=int, default=9)
    p.add_argument("--number", type=int, default=5000)
    args = p.parse_args()
    keys = [f"sk-{secrets.token_urlsafe(24)}" for _ in range(args.secrets)]
    r = Redactor(keys)
    print(f"{args.secrets} secrets, {len(r.forms)} forms searched")
    frame = b'data: {"choices":[{"index":0,"delta":{"content":"hello"}}]}\n\n'
    cases = [("SSE frame (70 B), no secret", frame)]
    cases += [(f"{kb} KB body, no secret", body(int(kb * 1024))) for kb in (0.5, 2, 16, 128)]
    cases.append(("2 KB body, one secret", body(2048, keys[0])))
    for name, data in cases:
        n = args.number if len(data) < 64 * 1024 else args.number // 20
        t = min(timeit.repeat(lambda d=data: r.data(d), number=n, repeat=5)) / n  # type: ignore[misc]
        print(f"{name:<32} {t * 1e6:8.2f} µs")


if __name__ == "__main__":
    main()
