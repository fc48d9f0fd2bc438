"""The confidence cascade's decisions (pure): is this step's answer good enough to serve?

A ``strategy = "cascade"`` route tries its targets cheapest first (ordered as the ``cost``
strategy orders them) and the gateway moves on to the next one only when the answer it got
is judged not good enough. What is judged, and how, is decided here; the gateway
(:mod:`sidecar.gateway.pipeline`) asks, settles and walks. No I/O, no clock: each rule is
tested in milliseconds (``tests/unit/test_cascade.py``).

* **Asking.** A judged step is sent :func:`asking` (the call with ``logprobs`` on) when the
  client did not ask for log-probabilities itself; :func:`judge_reply` /
  :func:`judge_stream` then take them out of the answer again (each choice's ``logprobs``
  null, as OpenAI answers when none are asked for) unless the client asked.
* **Reading.** :func:`read_body` and :func:`read_stream` read an OpenAI chat or text
  completion answer (a whole body, or a whole stream's SSE frames) into an :class:`Answer`:
  each choice's text and its tokens' log-probabilities (None when the answer has none).
* **Judging** (:func:`judge`, in this order, the first that applies):

  1. ``schema``: ``check_schema`` is on, the request has ``response_format`` of type
     ``json_object`` or ``json_schema``, and a choice's text is not JSON, not an object
     (json_object) or does not match the schema (:mod:`sidecar.routing.schema_check`);
  2. ``empty``: a choice has no text, no tool call and no token;
  3. ``no_logprobs``: the answer (or a choice) has no log-probabilities: escalated only with
     ``no_logprobs = "escalate"``, else served (reason ``no_logprobs``);
  4. ``low_mean_logprob``: a choice's mean token log-probability is below
     ``min_mean_logprob``;
  5. ``low_min_logprob``: a choice has a token below ``min_token_logprob``;
  6. else ``confident``.

  The log-probabilities are the model's own (the local worker's are of the raw softmax,
  before temperature), so the same answer gets the same verdict at any temperature.

:func:`reason` spells the route reason ``cascade:<step>:<why>``: the plan index of the step
that answered and, for a judged step, its verdict (``confident``, ``no_logprobs``); for an
unjudged one (the last step that could be tried) the verdict that escalated the step
before it, ``fallback`` when that step failed instead, or ``unjudged`` when it is the first
step and nothing after it could be tried; ``kept`` when the steps after an escalated answer
all failed and it is served after all.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import msgspec

from sidecar.config import CascadeConfig
from sidecar.routing.schema_check import schema_problem
from sidecar.types import Call, ChatRequest, CompletionRequest, Op

CONFIDENT = "confident"
NO_LOGPROBS = "no_logprobs"
LOW_MEAN = "low_mean_logprob"
LOW_MIN = "low_min_logprob"
SCHEMA = "schema"
EMPTY = "empty"
FALLBACK = "fallback"
UNJUDGED = "unjudged"
KEPT = "kept"

#: Every ``why`` of an escalation (the labels of ``sidecar_cascade_escalations_total``).
ESCALATIONS = (SCHEMA, EMPTY, NO_LOGPROBS, LOW_MEAN, LOW_MIN)


class Answer(msgspec.Struct, frozen=True):
    """What the cascade reads of an answer: per choice (by index)."""

    texts: tuple[str | None, ...]
    """The text (chat: the message's content; None when it has none, e.g. tool calls)."""
    logprobs: tuple[tuple[float, ...] | None, ...]
    """Its tokens' log-probabilities; None: the answer gave none for this choice."""
    tool_calls: tuple[bool, ...] = ()
    """Whether the choice called a tool (chat)."""


class Confidence(msgspec.Struct, frozen=True):
    """An answer's token log-probabilities summed up (of several choices: the tokens of
    all, the lowest mean, the lowest token)."""

    tokens: int
    mean: float
    min: float


class Verdict(msgspec.Struct, frozen=True):
    """Whether to escalate, and why (one of the names above)."""

    escalate: bool
    why: str
    confidence: Confidence | None = None
    """The least confident choice's figures, when there were log-probabilities."""
    detail: str | None = None
    """What failed, for a schema verdict (e.g. ``$.age: expected integer``)."""


def reason(step: int, why: str) -> str:
    """The route reason ``cascade:<step>:<why>``."""
    return f"cascade:{step}:{why}"


def confidence(logprobs: Sequence[float]) -> Confidence | None:
    """Mean and least log-probability of a choice's tokens (None: no token). A value that is
    not a finite number counts as ``-inf`` (the least confident possible)."""
    if not logprobs:
        return None
    values = [v if isinstance(v, int | float) and math.isfinite(v) else -math.inf
              for v in logprobs]
    return Confidence(len(values), math.fsum(values) / len(values), min(values))


def judge(answer: Answer | None, settings: CascadeConfig, response_format: Any = None
          ) -> Verdict:
    """The verdict on ``answer`` (None: an answer the cascade cannot read, judged as one
    without log-probabilities) for a request with ``response_format`` (the module's rules)."""
    if answer is not None and settings.check_schema:
        for i, text in enumerate(answer.texts):
            called = i < len(answer.tool_calls) and answer.tool_calls[i]
            problem = None if called else format_problem(text, response_format)
            if problem is not None:
                return Verdict(True, SCHEMA, detail=problem)
    if answer is None or not answer.logprobs:
        return _no_logprobs(settings)
    found: list[Confidence] = []
    for i, lps in enumerate(answer.logprobs):
        called = i < len(answer.tool_calls) and answer.tool_calls[i]
        text = answer.texts[i] if i < len(answer.texts) else None
        c = None if lps is None else confidence(lps)
        if c is None:
            return Verdict(True, EMPTY) if not text and not called else _no_logprobs(settings)
        found.append(c)
    worst = Confidence(sum(c.tokens for c in found), min(c.mean for c in found),
                       min(c.min for c in found))
    if settings.min_mean_logprob is not None and worst.mean < settings.min_mean_logprob:
        return Verdict(True, LOW_MEAN, worst)
    if settings.min_token_logprob is not None and worst.min < settings.min_token_logprob:
        return Verdict(True, LOW_MIN, worst)
    return Verdict(False, CONFIDENT, worst)


def _no_logprobs(settings: CascadeConfig) -> Verdict:
    return Verdict(settings.no_logprobs == "escalate", NO_LOGPROBS)


def format_problem(text: str | None, response_format: Any) -> str | None:
    """Why ``text`` does not satisfy ``response_format`` (OpenAI's: ``json_object`` wants
    a JSON object, ``json_schema`` one matching ``json_schema.schema``), or None (also for
    ``text``, no format, or a format this does not know)."""
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind not in ("json_object", "json_schema"):
        return None
    try:
        value = msgspec.json.decode((text or "").encode())
    except msgspec.DecodeError:
        return "not JSON"
    if kind == "json_object":
        return None if isinstance(value, dict) else "not a JSON object"
    spec = response_format.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, dict) else None
    return schema_problem(value, schema if isinstance(schema, dict) else {"type": "object"})


# --- asking for log-probabilities, and taking them out again --------------------------------

def client_asked(call: Call) -> bool:
    """Whether the client asked for log-probabilities itself."""
    req = call.request
    if isinstance(req, ChatRequest):
        return bool(req.logprobs)
    return isinstance(req, CompletionRequest) and req.logprobs is not None


def asking(call: Call) -> Call:
    """``call`` asking for its tokens' log-probabilities (itself when it does, or when it is
    not a chat or text completion)."""
    req = call.request
    if client_asked(call):
        return call
    if isinstance(req, ChatRequest):
        return msgspec.structs.replace(call, request=msgspec.structs.replace(req, logprobs=True),
                                       raw={**call.raw, "logprobs": True})
    if isinstance(req, CompletionRequest):
        return msgspec.structs.replace(call, request=msgspec.structs.replace(req, logprobs=0),
                                       raw={**call.raw, "logprobs": 0})
    return call


def _without_logprobs(obj: Any) -> bool:
    """Set every choice's ``logprobs`` of a decoded answer or chunk to null; whether any
    was set."""
    changed = False
    choices = obj.get("choices") if isinstance(obj, dict) else None
    for choice in choices if isinstance(choices, list) else ():
        if isinstance(choice, dict) and choice.get("logprobs") is not None:
            choice["logprobs"] = None
            changed = True
    return changed


def strip_body(body: bytes) -> bytes:
    """``body`` with every choice's ``logprobs`` null (itself when there were none, or when
    it is not JSON)."""
    try:
        obj = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return body
    return msgspec.json.encode(obj) if _without_logprobs(obj) else body


def strip_stream(data: bytes) -> bytes:
    """SSE ``data`` (whole ``data: {...}`` events) with every chunk's choices' ``logprobs``
    null; events that are not JSON chunks are kept as they are."""
    out = []
    for block in _blocks(data):
        payload = _payload(block)
        obj = None
        if payload is not None:
            try:
                obj = msgspec.json.decode(payload)
            except msgspec.DecodeError:
                obj = None
        if obj is not None and _without_logprobs(obj):
            out.append(b"data: " + msgspec.json.encode(obj) + b"\n\n")
        else:
            out.append(block + b"\n\n")
    return b"".join(out)


# --- reading answers ------------------------------------------------------------------------

class _Choice:
    __slots__ = ("called", "logprobs", "text")

    def __init__(self) -> None:
        self.text: list[str] = []
        self.logprobs: list[float] | None = None
        self.called = False

    def add_logprobs(self, values: Sequence[Any]) -> None:
        floats = [float(v) if isinstance(v, int | float) and not isinstance(v, bool)
                  else -math.inf for v in values]
        self.logprobs = floats if self.logprobs is None else self.logprobs + floats


def _logprob_values(op: Op, lp: Any) -> list[Any] | None:
    """The token log-probabilities of a choice's ``logprobs`` (chat: ``content[].logprob``;
    completions: ``token_logprobs``), or None when it holds none."""
    if not isinstance(lp, dict):
        return None
    if op is Op.CHAT:
        content = lp.get("content")
        if not isinstance(content, list):
            return None
        return [e.get("logprob") if isinstance(e, dict) else None for e in content]
    values = lp.get("token_logprobs")
    return values if isinstance(values, list) else None


def _answer(choices: dict[int, _Choice]) -> Answer:
    got = [choices[i] for i in sorted(choices)]
    return Answer(
        tuple("".join(c.text) if c.text or not c.called else None for c in got),
        tuple(None if c.logprobs is None else tuple(c.logprobs) for c in got),
        tuple(c.called for c in got))


def _index(choice: dict[str, Any], default: int) -> int:
    index = choice.get("index", default)
    return index if isinstance(index, int) and not isinstance(index, bool) else default


def read_body(op: Op, body: bytes) -> Answer | None:
    """A whole chat or text completion answer; None when it is not one (no ``choices``)."""
    if op not in (Op.CHAT, Op.COMPLETIONS):
        return None
    try:
        obj = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return None
    choices = obj.get("choices") if isinstance(obj, dict) else None
    if not isinstance(choices, list) or not choices:
        return None
    got: dict[int, _Choice] = {}
    for n, c in enumerate(choices):
        if not isinstance(c, dict):
            return None
        choice = got.setdefault(_index(c, n), _Choice())
        if op is Op.CHAT:
            message = c.get("message")
            message = message if isinstance(message, dict) else {}
            content = message.get("content")
            if isinstance(content, str):
                choice.text.append(content)
            choice.called = bool(message.get("tool_calls"))
        elif isinstance(c.get("text"), str):
            choice.text.append(c["text"])
        values = _logprob_values(op, c.get("logprobs"))
        if values is not None:
            choice.add_logprobs(values)
    return _answer(got)


def read_stream(op: Op, data: bytes) -> Answer | None:
    """A whole stream's SSE frames (``data: {...}`` events, as providers yield them); None
    when they are not chat or text completion chunks."""
    if op not in (Op.CHAT, Op.COMPLETIONS):
        return None
    got: dict[int, _Choice] = {}
    for block in _blocks(data):
        payload = _payload(block)
        if payload is None:
            return None
        try:
            obj = msgspec.json.decode(payload)
        except msgspec.DecodeError:
            return None
        choices = obj.get("choices") if isinstance(obj, dict) else None
        if not isinstance(choices, list):
            return None
        for c in choices:
            if not isinstance(c, dict):
                return None
            choice = got.setdefault(_index(c, 0), _Choice())
            if op is Op.CHAT:
                delta = c.get("delta")
                delta = delta if isinstance(delta, dict) else {}
                if isinstance(delta.get("content"), str):
                    choice.text.append(delta["content"])
                choice.called |= bool(delta.get("tool_calls"))
            elif isinstance(c.get("text"), str):
                choice.text.append(c["text"])
            values = _logprob_values(op, c.get("logprobs"))
            if values is not None:
                choice.add_logprobs(values)
    return _answer(got) if got else None


def _blocks(data: bytes) -> list[bytes]:
    return [b for b in data.split(b"\n\n") if b.strip()]


def _payload(block: bytes) -> bytes | None:
    """The data of one SSE event (None: it has none)."""
    for line in block.split(b"\n"):
        if line.startswith(b"data:"):
            return line[5:].lstrip(b" ")
    return None


# --- the two the gateway calls --------------------------------------------------------------

def judge_reply(call: Call, body: bytes, settings: CascadeConfig, *, native: bool = False
                ) -> tuple[Verdict, bytes]:
    """The verdict on a whole answer ``body`` to the :func:`asking` form of the client's
    ``call``, and the body to serve (now, or when it is kept after the later steps failed):
    log-probabilities taken out when the client did not ask for them. ``native``: an
    Anthropic message, which has none."""
    answer = None if native else read_body(call.op, body)
    verdict = judge(answer, settings, call.raw.get("response_format"))
    if not native and not client_asked(call):
        body = strip_body(body)
    return verdict, body


def judge_stream(call: Call, data: bytes, settings: CascadeConfig, *, native: bool = False
                 ) -> tuple[Verdict, bytes]:
    """:func:`judge_reply` for a whole stream's SSE ``data``."""
    answer = None if native else read_stream(call.op, data)
    verdict = judge(answer, settings, call.raw.get("response_format"))
    if not native and not client_asked(call):
        data = strip_stream(data)
    return verdict, data
