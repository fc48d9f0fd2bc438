"""The semantic cache's decisions (pure): what a request asks, where its neighbours are kept,
and which of them answers it.

A route with ``cache_semantic`` answers a question from the cache when an earlier one
*meant the same*, not only when it was the same bytes. The rules, safest first:

* **Only the question may differ.** :func:`question_of` takes the last message of a chat
  call, when it is the user's and is text; everything else (the route, its targets, the
  client key, the parameters, the system prompt, the earlier turns, a Messages body's other
  fields) goes into the *index key* exactly, so a question is only compared with questions
  asked in the same conversation state with the same parameters.
* **The names and numbers must match.** Small embedding models rate "12 times 7" and "12
  times 8", or "the capital of France" and "the capital of Germany", as nearly the same
  question; here the numbers and the capitalised words a question names (but the first
  word of a sentence and the pronoun "I"; "France's" names France) must be the same
  before its similarity counts (:func:`terms_of`).
* **The similarity must reach the route's threshold** (cosine of L2-normalised vectors of
  the local model's last-token state after :data:`PROMPT`; mean pooling of the question
  alone with ``pooling = "mean"``, for an embedding model). docs/caching.md has what the
  default threshold, 0.97, does on the shipped question set.

An index holds the newest :data:`MAX_INDEX` questions of one index key: (exact cache key,
terms, float16 vector). Vectors are compared with numpy.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from hashlib import sha256
from typing import Any

import msgspec
import numpy as np

from sidecar.types import Call, Op

PROMPT = 'This sentence: "{}" means in one word: "'
"""How a question is put to the model before its last token's state is read (PromptEOL:
the model is asked to sum the sentence up, so the last state carries its meaning)."""

MAX_QUESTION_CHARS = 1000
"""A longer question is only looked up exactly."""
MAX_INDEX = 64
"""Questions kept per index key (the newest)."""

_VERSION = b"sidecar-semantic-1\0"
_TERM = re.compile(r"\d+(?:[.,]\d+)*|[^\W\d_][\w'\u2019-]*")
_SENTENCE_END = frozenset(".!?:;")
_encode_sorted = msgspec.json.Encoder(order="sorted").encode
_IGNORED = frozenset({"user", "metadata", "store", "service_tier"})


class Question(msgspec.Struct, frozen=True):
    """What one request asks, for the semantic cache."""

    text: str
    terms: str
    """The names and numbers it names (:func:`terms_of`)."""
    index_key: str
    """The hex key of the index it is looked up in and added to."""


class Indexed(msgspec.Struct, frozen=True, array_like=True):
    """A question kept in an index: its answer's exact cache key and how it reads."""

    key: str
    terms: str
    vector: bytes
    """float16, little-endian, L2-normalised."""


_index_encoder = msgspec.msgpack.Encoder()
_index_decoder = msgspec.msgpack.Decoder(list[Indexed])


def terms_of(text: str) -> str:
    """The numbers (digit runs, with their decimal or thousands marks) and the capitalised
    words ``text`` names, but a sentence's first word and "I", possessives cut ("France's":
    France), sorted, unique, space separated: two questions may share an answer only when
    these match."""
    terms: set[str] = set()
    for m in _TERM.finditer(text):
        word = m.group()
        before = text[:m.start()].rstrip()
        start = not before or before[-1] in _SENTENCE_END
        if word[0].isdigit():
            terms.add(word)
        elif word[0].isupper() and not start and word != "I":
            terms.add(re.sub("['\u2019]s$", "", word))
    return " ".join(sorted(terms))


def _text_of(content: Any) -> str | None:
    """A message content's text: a string, or a list of only text parts; else None."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content and all(
            isinstance(part, dict) and part.get("type") == "text"
            and isinstance(part.get("text"), str) for part in content):
        return "\n".join(part["text"] for part in content)
    return None


def _without_question(messages: Any) -> tuple[list[Any], str] | None:
    """(``messages`` with the last one's content blanked, that content's text) when the
    last message is the user's and is text; else None."""
    if not isinstance(messages, list) or not messages:
        return None
    last = messages[-1]
    if not isinstance(last, dict) or last.get("role") != "user":
        return None
    text = _text_of(last.get("content"))
    if text is None:
        return None
    return [*messages[:-1], {**last, "content": ""}], text


def question_of(call: Call, route_model: str, targets: Sequence[str], identity: str | None,
                embedder: str) -> Question | None:
    """The question ``call`` asks and its index (see the module docstring), or None when
    it has none the semantic cache takes: not a chat call, a last message that is not the
    user's text, an empty question or one longer than :data:`MAX_QUESTION_CHARS`."""
    if call.op is not Op.CHAT:
        return None
    found = _without_question(call.raw.get("messages"))
    if found is None:
        return None
    messages, text = found
    if not text.strip() or len(text) > MAX_QUESTION_CHARS:
        return None
    native: Any = None
    if call.messages is not None:  # the client's Messages body holds the question too
        found_native = _without_question(call.messages.get("messages"))
        if found_native is None:
            return None
        native = {**call.messages, "messages": found_native[0]}
        native.pop("model", None)
    body = {k: v for k, v in call.raw.items() if k not in _IGNORED and k != "model"}
    body["messages"] = messages
    h = sha256(_VERSION)
    h.update(_encode_sorted([route_model, list(targets), identity, embedder, body, native]))
    return Question(text.strip(), terms_of(text), h.hexdigest())


def prompt(question: Question, pooling: str = "last") -> str:
    """What the local model is asked to embed for ``question``: the question in
    :data:`PROMPT` for last-token pooling, the question alone for mean pooling."""
    return PROMPT.format(question.text) if pooling == "last" else question.text


def vector_bytes(vector: Sequence[float]) -> bytes:
    """``vector`` L2-normalised, as float16 bytes (what an index keeps). Raises
    :class:`ValueError` for an empty, zero or non-finite vector."""
    v = np.asarray(vector, dtype=np.float32)
    norm = float(np.linalg.norm(v))
    if v.ndim != 1 or not v.size or not np.isfinite(norm) or norm == 0:
        raise ValueError("not an embedding")
    return (v / norm).astype("<f2").tobytes()


def decode_index(data: bytes | None) -> list[Indexed]:
    """The questions an index value holds (none for None or bytes that are not an index)."""
    if data is None:
        return []
    try:
        return _index_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return []


def encode_index(index: Sequence[Indexed]) -> bytes:
    return _index_encoder.encode(list(index))


def with_question(index: Sequence[Indexed], item: Indexed) -> list[Indexed]:
    """``index`` with ``item`` as its newest question (an older one of the same key
    replaced), at most :data:`MAX_INDEX` kept."""
    kept = [i for i in index if i.key != item.key]
    kept.append(item)
    return kept[-MAX_INDEX:]


def nearest(index: Sequence[Indexed], vector: bytes, terms: str, min_similarity: float
            ) -> tuple[str, float] | None:
    """(exact key, similarity) of the indexed question most like ``vector`` among those
    naming the same ``terms``, when its similarity is at least ``min_similarity``; else
    None. Vectors of another length (another model) never match."""
    query = np.frombuffer(vector, dtype="<f2").astype(np.float32)
    candidates = [i for i in index if i.terms == terms and len(i.vector) == len(vector)]
    if not candidates:
        return None
    matrix = np.frombuffer(b"".join(i.vector for i in candidates), dtype="<f2")
    scores = matrix.reshape(len(candidates), -1).astype(np.float32) @ query
    best = int(np.argmax(scores))
    score = float(scores[best])
    if not score >= min_similarity:  # NaN never matches
        return None
    return candidates[best].key, score
