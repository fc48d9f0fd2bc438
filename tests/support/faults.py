"""What the fault tests share: a raw HTTP/1.1 client (bytes exactly as given, no header
validation) and a reader that keeps a sidecar's output flowing into ``SidecarProcess.output``
while it runs (so a chatty child never blocks on a full pipe, and tests can look at it)."""

from __future__ import annotations

import json
import socket
import threading
from typing import Any

from tests.support.process import SidecarProcess


class RawResponse:
    """One HTTP response: status, lowercased headers (repeated ones joined by ``, ``), the
    de-chunked body."""

    def __init__(self, status: int, headers: dict[str, str], body: bytes, head: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self.head = head

    def json(self) -> Any:
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"<{self.status} {self.body[:300]!r}>"


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    while data:
        line, sep, rest = data.partition(b"\r\n")
        if not sep:
            break
        size = int(line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out += rest[:size]
        data = rest[size + 2 :]
    return bytes(out)


def raw_request(
    port: int,
    method: str,
    path: str,
    body: bytes = b"",
    headers: list[tuple[bytes, bytes]] | None = None,
    timeout: float = 30.0,
) -> RawResponse:
    """Send one request on a new connection (``connection: close``) and read the whole
    answer until the server closes. ``headers`` go out byte for byte after the defaults."""
    head = [
        f"{method} {path} HTTP/1.1".encode(),
        b"host: 127.0.0.1",
        b"content-type: application/json",
        b"content-length: " + str(len(body)).encode(),
        b"connection: close",
    ]
    head += [k + b": " + v for k, v in headers or []]
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(b"\r\n".join(head) + b"\r\n\r\n" + body)
        chunks = []
        while True:
            data = s.recv(65536)
            if not data:
                break
            chunks.append(data)
    raw = b"".join(chunks)
    top, _, payload = raw.partition(b"\r\n\r\n")
    lines = top.split(b"\r\n")
    status = int(lines[0].split(b" ")[1])
    hdrs: dict[str, str] = {}
    for line in lines[1:]:
        k, _, v = line.partition(b":")
        key = k.decode("latin-1").strip().lower()
        val = v.decode("latin-1").strip()
        hdrs[key] = f"{hdrs[key]}, {val}" if key in hdrs else val
    if "chunked" in hdrs.get("transfer-encoding", ""):
        payload = _dechunk(payload)
    return RawResponse(status, hdrs, payload, top)


def assert_envelope(r: RawResponse) -> dict[str, Any]:
    """``r`` is an error whose body is OpenAI's error envelope; returns the error object."""
    assert r.status >= 400, r
    try:
        obj = r.json()
    except ValueError:
        raise AssertionError(f"a {r.status} whose body is not JSON: {r.body[:300]!r}") from None
    assert isinstance(obj, dict) and set(obj) == {"error"}, r
    err = obj["error"]
    assert isinstance(err, dict) and set(err) == {"message", "type", "code", "param"}, r
    assert isinstance(err["message"], str) and err["message"], r
    assert isinstance(err["type"], str) and err["type"], r
    assert err["code"] is None or isinstance(err["code"], str), r
    assert err["param"] is None or isinstance(err["param"], str), r
    return err


def follow_output(sc: SidecarProcess) -> threading.Thread:
    """Append the sidecar's output lines (stdout and stderr: SidecarProcess merges them) to
    ``sc.output`` as they come, until it exits."""
    assert sc.proc.stdout is not None
    stream = sc.proc.stdout

    def run() -> None:
        for line in iter(stream.readline, b""):
            sc.output.append(line.decode(errors="replace"))

    t = threading.Thread(target=run, name=f"sidecar-{sc.port}-output", daemon=True)
    t.start()
    return t


def tracebacks(output: list[str]) -> list[str]:
    """The output around each ``Traceback`` (empty when there is none)."""
    text = "".join(output)
    found = []
    at = text.find("Traceback")
    while at >= 0:
        found.append(text[max(0, at - 200) : at + 1500])
        at = text.find("Traceback", at + 1)
    return found
