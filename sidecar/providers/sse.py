"""Server-sent events: split a byte stream into events without copying more than needed."""

from __future__ import annotations

from collections.abc import Iterator

import msgspec


class Event(msgspec.Struct):
    """One SSE event: its ``event:`` name (``""`` when absent) and its joined ``data:``."""

    name: bytes
    data: bytes


class SSEDecoder:
    """Incremental SSE parser. Feed bytes as they arrive; get whole events back.

    Not safe for concurrent use; one per stream. Lines may end in ``\\n`` or ``\\r\\n``.
    Comment lines (``:``) and fields other than ``event``/``data`` are skipped.
    """

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, piece: bytes) -> Iterator[Event]:
        buf = self._buf + piece if self._buf else piece
        if b"\r" in buf:
            buf = buf.replace(b"\r\n", b"\n")
        start = 0
        while True:
            end = buf.find(b"\n\n", start)
            if end < 0:
                break
            block = buf[start:end]
            start = end + 2
            event = _parse(block)
            if event is not None:
                yield event
        self._buf = buf[start:]

    @property
    def pending(self) -> bool:
        """Whether bytes of an unfinished event are buffered."""
        return bool(self._buf.strip())


def _parse(block: bytes) -> Event | None:
    if block.startswith(b"data: ") and b"\n" not in block:
        return Event(b"", block[6:])
    name = b""
    data: list[bytes] = []
    for line in block.split(b"\n"):
        field, _, value = line.partition(b":")
        if value.startswith(b" "):
            value = value[1:]
        if field == b"data":
            data.append(value)
        elif field == b"event":
            name = value
    if not data and not name:
        return None
    return Event(name, b"\n".join(data))
