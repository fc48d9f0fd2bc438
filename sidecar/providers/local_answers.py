"""The local model pool's output as OpenAI answers: whole bodies and stream frames (pure).

The pool yields :class:`~local_models.Tokens` (text of one choice, with log-probabilities
when asked) and one :class:`~local_models.Done`. Here they become OpenAI's
``chat.completion`` / ``text_completion`` bodies and ``chat.completion.chunk`` frames,
every field of OpenAI's schema present (``refusal`` and ``logprobs`` null when not asked):

* Several choices (``n``) carry their ``index``; each ends with its own ``finish_reason``.
* In the generic tool format (:mod:`sidecar.providers.local_tools`) the text is parsed:
  ``{"response": ...}`` becomes content, ``{"tool_calls": [...]}`` becomes ``tool_calls``
  with ids and ``finish_reason: "tool_calls"``; a stream sends OpenAI's tool-call deltas as
  the text arrives (the arguments' pieces concatenate to the JSON the grammar produced).
* Log-probabilities: chat ``logprobs.content`` entries (token, logprob, bytes,
  top_logprobs); completions the legacy lists (tokens, token_logprobs, top_logprobs,
  text_offset).
"""

from __future__ import annotations

from typing import Any

import msgspec

from local_models import Done, TokenLogprob, Tokens
from sidecar.providers.local_requests import Job
from sidecar.providers.local_tools import ToolStream, parse_output
from sidecar.types import (
    ChatChunk,
    ChatCompletion,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    Delta,
    Meter,
    PromptTokensDetails,
    ResponseMessage,
    TextChoice,
    TextCompletion,
    TopLogprob,
    Usage,
)
from sidecar.types import TokenLogprob as ChatTokenLogprob

__all__ = ["Collected", "StreamFrames", "chat_body", "completion_body", "usage_of"]

_encoder = msgspec.json.Encoder()


def usage_of(done: Done) -> Usage:
    """OpenAI's usage; prompt tokens the worker's KV cache already held (prefix reuse) as
    ``prompt_tokens_details.cached_tokens``, when there were some."""
    details = PromptTokensDetails(done.cached_tokens) if done.cached_tokens else None
    return Usage(done.prompt_tokens, done.completion_tokens,
                 done.prompt_tokens + done.completion_tokens, details)


def _reasons(done: Done, n: int) -> list[str]:
    reasons: list[str] = list(done.finish_reasons) or [done.finish_reason]
    return (reasons + [done.finish_reason] * n)[:n]


def _text(piece: bytes) -> str:
    return piece.decode("utf-8", errors="replace")


def chat_logprobs(entries: list[TokenLogprob]) -> ChoiceLogprobs:
    return ChoiceLogprobs(content=[
        ChatTokenLogprob(_text(e.piece), e.logprob, list(e.piece),
                         [TopLogprob(_text(b), lp, list(b)) for b, lp in e.top])
        for e in entries
    ])


def completion_logprobs(entries: list[TokenLogprob], offset: int) -> dict[str, Any]:
    """OpenAI's legacy shape; ``offset``: characters of this choice's text before these."""
    tokens = [_text(e.piece) for e in entries]
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{_text(b): lp for b, lp in e.top} for e in entries],
            "text_offset": offsets}


class Collected:
    """Every choice's text and log-probabilities, for a whole answer."""

    def __init__(self, n: int) -> None:
        self.texts: list[list[str]] = [[] for _ in range(n)]
        self.logprobs: list[list[TokenLogprob]] = [[] for _ in range(n)]

    def add(self, item: Tokens) -> None:
        self.texts[item.index].append(item.text)
        self.logprobs[item.index].extend(item.logprobs)

    def text(self, index: int) -> str:
        return "".join(self.texts[index])


def chat_body(rid: str, created: int, model: str, job: Job, got: Collected,
              done: Done) -> ChatCompletion:
    choices = []
    for i, reason in enumerate(_reasons(done, job.n)):
        text = got.text(i)
        message = ResponseMessage(content=text)
        if job.tools is not None:
            content, calls = parse_output(text)
            message = ResponseMessage(content=content, tool_calls=calls or msgspec.UNSET)
            if calls and reason == "stop":
                reason = "tool_calls"
        lp = chat_logprobs(got.logprobs[i]) if job.logprobs is not None else None
        choices.append(Choice(i, message, reason, lp))
    return ChatCompletion(rid, created, model, choices, usage_of(done))


def completion_body(rid: str, created: int, model: str, job: Job, got: Collected,
                    done: Done) -> TextCompletion:
    choices = [
        TextChoice(i, got.text(i), reason,
                   completion_logprobs(got.logprobs[i], 0) if job.logprobs is not None
                   else None)
        for i, reason in enumerate(_reasons(done, job.n))
    ]
    return TextCompletion(rid, created, model, choices, usage_of(done))


class StreamFrames:
    """SSE frames of one streamed answer, choice by choice as the pool's text arrives."""

    def __init__(self, rid: str, created: int, model: str, job: Job, chat: bool,
                 meter: Meter | None) -> None:
        self.rid, self.created, self.model, self.job, self.chat = rid, created, model, job, chat
        self.meter = meter
        self.started = [False] * job.n
        self.offsets = [0] * job.n
        self.held: list[list[TokenLogprob]] = [[] for _ in range(job.n)]
        self.tools = [ToolStream() for _ in range(job.n)] if job.tools is not None else None

    def _frame(self, body: ChatChunk | TextCompletion) -> bytes:
        return b"data: " + _encoder.encode(body) + b"\n\n"

    def _count(self, text: str | None) -> None:
        if self.meter is not None and text:
            self.meter.content_chunks += 1
            self.meter.content_chars += len(text)

    def tokens(self, item: Tokens) -> bytes:
        """The frames for one text delta (empty while a tool call's text is incomplete)."""
        i = item.index
        self._count(item.text)
        if not self.chat:
            lp = (completion_logprobs(list(item.logprobs), self.offsets[i])
                  if self.job.logprobs is not None else None)
            self.offsets[i] += len(item.text)
            return self._frame(TextCompletion(self.rid, self.created, self.model,
                                              [TextChoice(i, item.text, None, lp)]))
        self.held[i].extend(item.logprobs)
        deltas = [Delta(content=item.text)] if self.tools is None else self.tools[i].feed(
            item.text)
        return b"".join(self._delta(i, d) for d in deltas)

    def _delta(self, i: int, delta: Delta, reason: str | None = None) -> bytes:
        if not self.started[i]:
            delta.role = "assistant"
            self.started[i] = True
        lp = None
        if self.job.logprobs is not None and self.held[i]:
            lp = chat_logprobs(self.held[i])
            self.held[i] = []
        return self._frame(ChatChunk(self.rid, self.created, self.model,
                                     [ChunkChoice(i, delta, reason, lp)]))

    def end(self, done: Done) -> bytes:
        """Each choice's last frame with its finish reason, then the usage when asked."""
        out = []
        for i, reason in enumerate(_reasons(done, self.job.n)):
            if not self.chat:
                out.append(self._frame(TextCompletion(self.rid, self.created, self.model,
                                                      [TextChoice(i, "", reason)])))
                continue
            if self.tools is not None:
                stream = self.tools[i]
                out.extend(self._delta(i, d) for d in stream.finish())
                if stream.called and reason == "stop":
                    reason = "tool_calls"
            out.append(self._delta(i, Delta(), reason))
        if self.job.include_usage:
            usage = usage_of(done)
            out.append(self._frame(
                ChatChunk(self.rid, self.created, self.model, [], usage) if self.chat
                else TextCompletion(self.rid, self.created, self.model, [], usage)))
        return b"".join(out)
