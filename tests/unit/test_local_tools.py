"""The generic tool format read as it streams: however the text is split into pieces, the
deltas add up to what the whole answer parses to, and arguments are valid JSON from their
first fragment (no leading whitespace)."""

from __future__ import annotations

import itertools
import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from sidecar.providers.local_tools import ToolStream, parse_output


def replay(text: str, cuts: list[int]) -> tuple[str, list[dict[str, str]]]:
    """(content, calls) from feeding ``text`` split at ``cuts``."""
    stream, content, calls = ToolStream(), "", []
    points = sorted({c % (len(text) + 1) for c in cuts} | {0, len(text)})
    pieces = [text[a:b] for a, b in itertools.pairwise(points)]
    deltas = [d for piece in pieces for d in stream.feed(piece)] + stream.finish()
    for delta in deltas:
        content += delta.content or ""
        for call in delta.tool_calls or []:
            assert call.function is not None
            if call.id is not None:
                calls.append({"id": call.id, "name": call.function.name or "",
                              "arguments": ""})
            calls[-1]["arguments"] += call.function.arguments or ""
    return content, calls


ARGS = st.dictionaries(st.text(max_size=5), st.one_of(
    st.integers(), st.text(max_size=8), st.lists(st.booleans(), max_size=3)), max_size=3)


@given(st.lists(st.tuples(st.sampled_from(["get_weather", "f", "a-b_c"]), ARGS),
                min_size=1, max_size=3),
       st.sampled_from([None, 0, 1]), st.lists(st.integers(0, 400), max_size=30))
def test_streamed_calls_add_up_to_the_parsed_answer(
        calls: list[tuple[str, dict[str, Any]]], indent: int | None, cuts: list[int]) -> None:
    text = json.dumps({"tool_calls": [{"name": n, "arguments": a} for n, a in calls]},
                      indent=indent, ensure_ascii=False)
    content, streamed = replay(text, cuts)
    _, parsed = parse_output(text)
    assert content == ""
    assert [c["name"] for c in streamed] == [c.function.name for c in parsed]
    for got, (_, args) in zip(streamed, calls, strict=True):
        assert got["arguments"] == got["arguments"].lstrip()
        assert json.loads(got["arguments"]) == args
        assert got["id"].startswith("call_")


@given(st.text(max_size=40), st.lists(st.integers(0, 200), max_size=20))
def test_a_text_answer_streams_as_its_content(answer: str, cuts: list[int]) -> None:
    text = json.dumps({"response": answer}, ensure_ascii=False)
    content, calls = replay(text, cuts)
    assert (content, calls) == (answer, [])
    assert parse_output(text) == (answer, [])


@given(st.text(max_size=60).filter(lambda t: not t.lstrip().startswith("{")),
       st.lists(st.integers(0, 100), max_size=10))
def test_text_outside_the_format_is_content_as_it_is(text: str, cuts: list[int]) -> None:
    assert replay(text, cuts) == (text, [])
