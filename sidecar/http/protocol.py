"""The HTTP/1.1 protocol uvicorn runs for the sidecar: uvicorn's httptools protocol with caps
on a request's head, which neither uvicorn nor llhttp has.

A request line plus headers of more than :data:`MAX_HEAD_BYTES`, or more than
:data:`MAX_HEADERS` header fields, is answered ``431 Request Header Fields Too Large`` in
OpenAI's error envelope and the connection is closed, before the application sees it.
A request httptools cannot parse gets 400 in the same envelope (uvicorn's is plain text). The
bytes of a head still arriving are counted as they come, so one endless header costs at most
:data:`MAX_HEAD_BYTES` plus one read, not whatever the client sends.

It relies on uvicorn's :class:`HttpToolsProtocol` callbacks (``on_message_begin``,
``on_url``, ``on_header``, ``on_headers_complete``, ``on_message_complete``) and its
``transport``; nothing else of uvicorn's is changed.
"""

from __future__ import annotations

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from sidecar.errors import InvalidRequest
from sidecar.gateway import error_body
from sidecar.request_meta import MAX_HEAD_BYTES, MAX_HEADERS


class _HeadTooLarge(Exception):
    pass


def _answer(status_line: bytes, err: InvalidRequest) -> bytes:
    """A whole ``connection: close`` answer with ``err`` in OpenAI's envelope."""
    body = error_body(err)
    return (b"HTTP/1.1 " + status_line + b"\r\n"
            b"content-type: application/json\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n"
            b"x-should-retry: false\r\n"
            b"connection: close\r\n\r\n" + body)


def _answer_431() -> bytes:
    err = InvalidRequest(
        f"The request's headers are too large: at most {MAX_HEADERS} fields and "
        f"{MAX_HEAD_BYTES} bytes."
    )
    err.code = "request_header_fields_too_large"
    return _answer(b"431 Request Header Fields Too Large", err)


class CappedHttpToolsProtocol(HttpToolsProtocol):
    """Pass as uvicorn's ``http`` protocol class."""

    _head_bytes = 0
    """Bytes of the current head so far, as parsed (request line and header lines)."""
    _raw_bytes = 0
    """Bytes received since the last head ended (the current head and what follows it)."""
    _in_head = True
    _rejected = False

    def _count(self, n: int) -> None:
        self._head_bytes += n
        if self._head_bytes > MAX_HEAD_BYTES:
            raise _HeadTooLarge

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = 0
        self._in_head = True

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)
        if len(self.headers) >= MAX_HEADERS:
            raise _HeadTooLarge
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._raw_bytes = 0
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._in_head = True
        super().on_message_complete()

    def data_received(self, data: bytes) -> None:
        """uvicorn's own, with the caps (a cap is raised from a parser callback, which
        httptools wraps in HttpParserCallbackError)."""
        if self._rejected:
            return
        if self._in_head:
            self._raw_bytes += len(data)
        self._feed(data)
        if self._in_head and self._raw_bytes > MAX_HEAD_BYTES + 8192 and not self._rejected:
            self._reject()  # a head still unfinished that grows on (one endless header)

    def _feed(self, data: bytes) -> None:
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as e:
            if isinstance(e.__context__, _HeadTooLarge):
                self._reject()
                return
            self._bad_request()
        except httptools.HttpParserError:
            self._bad_request()
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()

    def _bad_request(self) -> None:
        msg = "Invalid HTTP request received."
        self.logger.warning(msg)
        self.send_400_response(msg)

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request it cannot parse (a control byte in a header
        value, a broken request line), in OpenAI's envelope instead of plain text."""
        if not self.transport.is_closing():
            self.transport.write(_answer(b"400 Bad Request", InvalidRequest(
                "The request is not valid HTTP/1.1 (its request line or a header is "
                "malformed).")))
            self.transport.close()

    def _reject(self) -> None:
        self._rejected = True
        if not self.transport.is_closing():
            self.transport.write(_answer_431())
            self.transport.close()
