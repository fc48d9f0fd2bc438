from sidecar.providers.sse import Event, SSEDecoder


def test_events_split_across_reads_and_crlf() -> None:
    d = SSEDecoder()
    assert list(d.feed(b'data: {"a"')) == []
    assert d.pending
    assert list(d.feed(b":1}\n\ndata: [DONE]\n\n")) == [
        Event(b"", b'{"a":1}'),
        Event(b"", b"[DONE]"),
    ]
    assert not d.pending
    events = list(d.feed(b"event: ping\r\ndata: {}\r\n\r\n: comment\r\n\r\ndata:x\r\n\r\n"))
    assert events == [Event(b"ping", b"{}"), Event(b"", b"x")]


def test_multiline_data_is_joined() -> None:
    assert list(SSEDecoder().feed(b"data: a\ndata: b\n\n")) == [Event(b"", b"a\nb")]
