"""One cached answer as the stores keep it: :class:`Entry`, encoded as MessagePack.

A non-stream answer keeps its body (OpenAI JSON, or Anthropic's message when ``native``),
a stream its relayed frames, both already redacted. :func:`decode_entry` returns None for
bytes that are not an entry of this version (another version's value, a damaged file), so
such a value is only a miss.
"""

from __future__ import annotations

import msgspec

from sidecar.types import Usage


class Entry(msgspec.Struct, frozen=True, array_like=True, tag=1):
    """``target`` answered it at ``stored_at`` (Unix seconds); exactly one of ``body``
    (a non-stream answer) and ``frames`` (a stream's SSE frames, in order) is set."""

    target: str
    stored_at: float
    usage: Usage | None = None
    native: bool = False
    body: bytes | None = None
    frames: list[bytes] | None = None

    @property
    def size(self) -> int:
        """The answer's bytes (what ``max_entry_bytes`` bounds)."""
        return len(self.body or b"") + sum(len(f) for f in self.frames or ())


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Entry)


def encode_entry(entry: Entry) -> bytes:
    return _encoder.encode(entry)


def decode_entry(data: bytes) -> Entry | None:
    """The entry ``data`` holds, or None when it holds none (see the module docstring)."""
    try:
        entry = _decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    return entry if (entry.body is None) != (entry.frames is None) else None
