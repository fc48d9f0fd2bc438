"""The semantic cache's rules in-process: what a question is and which index it belongs to
(sidecar.cache.semantic, pure), and the ResponseCache's lookups by meaning over a memory
store, with a bag-of-words embedding standing in for the model (the real model is in
tests/e2e/test_semantic_cache_e2e.py)."""

from __future__ import annotations

import asyncio
import logging
import math
import re
from collections.abc import Sequence
from typing import Any

import pytest

from sidecar.cache import MemoryCacheStore, plan
from sidecar.cache import semantic as s
from sidecar.config import SemanticCacheConfig
from sidecar.gateway.cached import Lookup, ResponseCache
from sidecar.protocols.messages import chat_call
from sidecar.providers.base import Reply
from sidecar.routing import Route, Target
from sidecar.types import Call, Op, Usage, validate_call

SEM = SemanticCacheConfig(model="smollm2")
ROUTE = Route("chat", "priority", (Target("fake", "a"),), 0, None, 60.0, False,
              cache_semantic=SEM)
FRANCE = "What is the capital of France?"


def chat(question: Any = FRANCE, *, system: str | None = None, **extra: Any) -> Call:
    messages: list[dict[str, Any]] = [] if system is None else [
        {"role": "system", "content": system}]
    messages.append({"role": "user", "content": question})
    return validate_call(Op.CHAT, {"model": "chat", "messages": messages,
                                   "temperature": 0, **extra})


def question(call: Call, identity: str | None = None, route: str = "chat"
             ) -> s.Question | None:
    return s.question_of(call, route, ["fake/a"], identity, "smollm2")


# --- what a question is ---------------------------------------------------------------------


@pytest.mark.parametrize(("text", "terms"), [
    ("What is 12 times 7?", "12 7"),
    ("What is 7 times 12?", "12 7"),
    ("Add 1,000.5 and 3", "1,000.5 3"),
    ("No names here. None at all!", ""),
    ("What is the capital of France?", "France"),
    ("Which city is France's capital?", "France"),
    ("Tell me: Which city is France\u2019s capital?", "France"),
    ("When did World War II end?", "II War World"),
    ("When did World War I end?", "War World"),
    ("How do I sort a list in Python?", "Python"),
])
def test_terms_of(text: str, terms: str) -> None:
    assert s.terms_of(text) == terms


def test_only_the_last_user_question_may_differ_within_an_index() -> None:
    base = question(chat())
    assert base is not None and base.text == FRANCE and base.terms == "France"
    same_index = question(chat("Tell me the capital of France."))
    assert same_index is not None and same_index.index_key == base.index_key
    for other in (question(chat(system="Answer in French.")),
                  question(chat(max_tokens=5)),
                  question(chat(), identity="team-b"),
                  question(chat(), route="other")):
        assert other is not None and other.index_key != base.index_key
    # fields that do not change the answer do not change the index either
    tagged = question(chat(user="u-1", metadata={"x": "y"}))
    assert tagged is not None and tagged.index_key == base.index_key


def test_text_parts_are_a_question_and_other_parts_are_not() -> None:
    parts = question(chat([{"type": "text", "text": "What is the capital"},
                           {"type": "text", "text": "of France?"}]))
    assert parts is not None and parts.text == "What is the capital\nof France?"
    image = chat([{"type": "text", "text": "What is this?"},
                  {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}])
    assert question(image) is None


def test_calls_without_a_question_of_their_own_are_not_looked_up_by_meaning() -> None:
    answered = validate_call(Op.CHAT, {"model": "chat", "temperature": 0, "messages": [
        {"role": "user", "content": FRANCE}, {"role": "assistant", "content": "Paris"}]})
    assert question(answered) is None
    assert question(chat("   ")) is None
    assert question(chat("x" * (s.MAX_QUESTION_CHARS + 1))) is None
    embeddings = validate_call(Op.EMBEDDINGS, {"model": "chat", "input": FRANCE})
    assert question(embeddings) is None


def test_a_messages_call_is_compared_by_its_question_alone() -> None:
    def messages_call(text: str, system: str = "Be brief.") -> Call:
        return chat_call({"model": "chat", "max_tokens": 50, "temperature": 0,
                          "system": system, "messages": [{"role": "user", "content": text}]})

    base = question(messages_call(FRANCE))
    assert base is not None and base.text == FRANCE
    paraphrase = question(messages_call("Tell me the capital of France."))
    assert paraphrase is not None and paraphrase.index_key == base.index_key
    other_system = question(messages_call(FRANCE, system="Be verbose."))
    assert other_system is not None and other_system.index_key != base.index_key
    # the Messages body's own index: never compared with an OpenAI chat question
    openai_chat = question(chat(FRANCE, max_tokens=50))
    assert openai_chat is not None and openai_chat.index_key != base.index_key


def test_the_plan_carries_the_question_only_on_a_semantic_route() -> None:
    found = plan(chat(), ROUTE, None, "default")
    assert found is not None and found.semantic is not None
    assert found.semantic.question.text == FRANCE and found.semantic.min_similarity == 0.97
    exact_only = Route("chat", "priority", (Target("fake", "a"),), 0, None, 60.0, False)
    exact = plan(chat(), exact_only, None, "default")
    assert exact is not None and exact.semantic is None


# --- vectors and indexes --------------------------------------------------------------------


def test_vectors_are_normalised_float16_and_garbage_is_refused() -> None:
    data = s.vector_bytes([3.0, 4.0])
    assert len(data) == 4
    index = [s.Indexed("k", "", data)]
    found = s.nearest(index, s.vector_bytes([6.0, 8.0]), "", 0.999)
    assert found == ("k", pytest.approx(1.0, abs=1e-3))
    for bad in ([], [0.0, 0.0], [math.nan, 1.0], [math.inf, 1.0]):
        with pytest.raises(ValueError):
            s.vector_bytes(bad)


def test_nearest_needs_the_same_terms_the_threshold_and_the_same_length() -> None:
    a, b = s.vector_bytes([1.0, 0.0, 0.0]), s.vector_bytes([0.8, 0.6, 0.0])
    index = [s.Indexed("seven", "12 7", a), s.Indexed("other", "", b)]
    assert s.nearest(index, a, "12 7", 0.97) == ("seven", pytest.approx(1.0, abs=1e-3))
    assert s.nearest(index, a, "12 8", 0.5) is None  # another number: never the same question
    assert s.nearest(index, a, "", 0.9) is None  # 0.8 is below the threshold
    assert s.nearest(index, a, "", 0.75) == ("other", pytest.approx(0.8, abs=1e-3))
    assert s.nearest(index, s.vector_bytes([1.0, 0.0]), "12 7", 0.1) is None  # another model


def test_an_index_keeps_the_newest_questions_once_each() -> None:
    v = s.vector_bytes([1.0])
    index: list[s.Indexed] = []
    for i in range(s.MAX_INDEX + 10):
        index = s.with_question(index, s.Indexed(f"k{i}", "", v))
    assert len(index) == s.MAX_INDEX and index[-1].key == f"k{s.MAX_INDEX + 9}"
    index = s.with_question(index, s.Indexed("k20", "", v))
    assert [i.key for i in index].count("k20") == 1 and index[-1].key == "k20"
    assert s.decode_index(s.encode_index(index)) == index
    assert s.decode_index(b"\x93garbage") == [] and s.decode_index(None) == []


# --- lookups by meaning -----------------------------------------------------------------------

_WORDS = re.compile(r"[a-z]+")
_SYNONYMS = {"tell": "what", "me": "is"}


async def bag_of_words(model: str, text: str, pooling: str) -> list[float]:
    """A stand-in embedding: counts of a small vocabulary, with a few synonyms folded."""
    vocab = ["what", "is", "the", "capital", "of", "france", "germany", "spain", "bread",
             "city"]
    words = [_SYNONYMS.get(w, w) for w in _WORDS.findall(text.lower())]
    return [float(words.count(w)) for w in vocab] + [0.01]


def reply(text: str) -> Reply:
    return Reply(f'{{"answer": "{text}"}}'.encode(), Usage(3, 1, 4))


async def keep(cache: ResponseCache, call: Call, text: str, embed: Any = bag_of_words
               ) -> Lookup:
    p = plan(call, ROUTE, None, "default")
    assert p is not None
    found = await cache.lookup(p, stream=False, embed=embed)
    if found.entry is None:
        await cache.keep_reply(p, found, "fake/a", reply(text))
    return found


async def test_a_question_that_means_the_same_is_a_hit_and_another_is_not() -> None:
    cache = ResponseCache(MemoryCacheStore(max_bytes=2**20, max_entry_bytes=2**16))
    first = await keep(cache, chat(), "Paris")
    assert first.entry is None and first.indexed is not None
    same = await keep(cache, chat("Tell me the capital of France."), "unused")
    assert same.entry is not None and same.entry.body == reply("Paris").body
    assert same.similarity is not None and same.similarity >= 0.97
    other = await keep(cache, chat("What is the bread of France?"), "Baguette")
    assert other.entry is None  # the same names, but not alike enough

    async def blind(model: str, text: str, pooling: str) -> list[float]:
        return [1.0, 2.0]  # every question alike: only the names and numbers tell them apart

    germany = await keep(cache, chat("What is the capital of Germany?"), "Berlin", blind)
    assert germany.entry is None
    berlin = await keep(cache, chat("Which city is Germany's capital?"), "-", blind)
    assert berlin.entry is not None and berlin.entry.body == reply("Berlin").body
    # exact repeats are still exact hits (no similarity)
    again = await keep(cache, chat(), "unused")
    assert again.entry is not None and again.similarity is None


async def test_a_refresh_is_indexed_without_reading_and_a_stream_is_not_a_body() -> None:
    cache = ResponseCache(MemoryCacheStore(max_bytes=2**20, max_entry_bytes=2**16))
    fresh = plan(chat(), ROUTE, None, "no-cache")
    assert fresh is not None
    found = await cache.lookup(fresh, stream=False, embed=bag_of_words)
    assert found.entry is None and found.indexed is not None
    await cache.keep_reply(fresh, found, "fake/a", reply("Paris"))
    paraphrase = plan(chat("Tell me the capital of France."), ROUTE, None, "default")
    assert paraphrase is not None
    hit = await cache.lookup(paraphrase, stream=False, embed=bag_of_words)
    assert hit.entry is not None
    streamed = plan(chat("Tell me the capital of France.", stream=True), ROUTE, None,
                    "default")
    assert streamed is not None  # its own index: a stream is answered only by a stream
    assert (await cache.lookup(streamed, stream=True, embed=bag_of_words)).entry is None


async def test_an_embedding_that_fails_or_is_late_is_only_an_exact_miss(
        caplog: pytest.LogCaptureFixture) -> None:
    cache = ResponseCache(MemoryCacheStore(max_bytes=2**20, max_entry_bytes=2**16))
    await keep(cache, chat(), "Paris")

    async def broken(model: str, text: str, pooling: str) -> Sequence[float]:
        raise RuntimeError("model 'smollm2' failed to load")

    async def zero(model: str, text: str, pooling: str) -> Sequence[float]:
        return [0.0, 0.0]

    never = asyncio.Event()

    async def stalled(model: str, text: str, pooling: str) -> Sequence[float]:
        await never.wait()
        return [1.0]

    paraphrase = chat("Tell me the capital of France.")
    p = plan(paraphrase, ROUTE, None, "default")
    assert p is not None
    with caplog.at_level(logging.DEBUG, logger="sidecar.cache"):
        for embed in (broken, zero, stalled, broken):
            found = await cache.lookup(p, stream=False, embed=embed)
            assert found.entry is None and found.indexed is None
    await cache.keep_reply(p, found, "fake/a", reply("fresh"))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "failed to load" in warnings[0].getMessage()
    # the answer was kept exactly: the same words again are an exact hit without the model
    assert (await keep(cache, paraphrase, "unused", embed=broken)).entry is not None


async def test_an_index_larger_than_an_entry_may_be_keeps_its_newest_questions() -> None:
    store = MemoryCacheStore(max_bytes=2**20, max_entry_bytes=600)
    cache = ResponseCache(store)

    async def distinct(model: str, text: str, pooling: str) -> list[float]:
        n = int(re.findall(r"\d+", text)[0])
        return [math.cos(n), math.sin(n), 1.0] + [0.0] * 13

    for i in range(40):
        await keep(cache, chat(f"Question {i}?"), f"answer {i}", embed=distinct)
    p = plan(chat("Question 39?"), ROUTE, None, "default")
    assert p is not None and p.semantic is not None
    data = await store.get(p.semantic.question.index_key)
    assert data is not None and len(data) <= 600
    index = s.decode_index(data)
    assert 1 <= len(index) < 40 and index[-1].key == p.key
