"""OpenAI chat and completion requests translated for the local model pool (pure).

:func:`translate` turns a validated :class:`~sidecar.types.Call` into a :class:`Job`: the
messages or prompt, the sampling settings, and what the answer must look like (a grammar
for ``response_format`` or tools, ``n`` choices, log-probabilities). What a local model
cannot do, or a request that is wrong for any model, raises
:class:`~sidecar.errors.UpstreamUnsupported` naming the field (400 when no other target of
the route takes it):

* ``response_format``: ``json_object`` (any JSON object) and ``json_schema`` (the schema's
  grammar, :mod:`local_models.grammar`; a keyword it cannot enforce is refused by name).
* ``tools`` / ``tool_choice`` / ``parallel_tool_calls``: the generic format of
  :mod:`sidecar.providers.local_tools` (tool list in the system prompt, output constrained
  to a text answer or tool calls valid for their schemas); tool calls and tool results in the
  history are rendered in the same format.
* ``logprobs`` / ``top_logprobs`` (chat), ``logprobs`` 0-5 (completions), ``logit_bias``,
  ``n``, ``seed``, penalties.
* Refused: images and audio parts, ``audio``, ``prediction``, legacy ``functions``,
  token-array prompts for completions, ``best_of`` other than ``n``, ``echo``.
"""

from __future__ import annotations

from typing import Any

import msgspec

from local_models import ChatMessage, Sampling, SchemaError, schema_grammar
from sidecar.errors import UpstreamUnsupported
from sidecar.providers.local_tools import ToolError, ToolPlan, history, plan_tools
from sidecar.types import Call, ChatRequest, CompletionRequest, EmbeddingRequest

__all__ = ["DEFAULT_MIN_P", "DEFAULT_TEMPERATURE", "DEFAULT_TOP_K", "DEFAULT_TOP_P", "Job",
           "translate"]

# Sampling defaults for fields the client leaves out (llama.cpp's own defaults; OpenAI's
# temperature 1.0 without top-k makes small models ramble).
DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_P = 0.95
DEFAULT_TOP_K = 40
DEFAULT_MIN_P = 0.05

#: Entries of one ``logit_bias`` (OpenAI takes up to 300; a bound on the chain's size).
MAX_LOGIT_BIAS = 1024

_REFUSED_FIELDS = ("functions", "function_call", "audio", "prediction", "echo", "suffix")


class Job(msgspec.Struct, frozen=True):
    """What to ask the pool for one chat or completion call, and how to answer."""

    messages: tuple[ChatMessage, ...] | None
    """For the chat template; None for a text completion."""
    prompt: str | None
    max_tokens: int | None
    stop: tuple[str, ...]
    sampling: Sampling
    include_usage: bool
    n: int = 1
    grammar: str | None = None
    logprobs: int | None = None
    """None: none asked for; k: each token's log-probability with k alternatives."""
    tools: ToolPlan | None = None
    """Set when the output is in the generic tool format (to be parsed into tool calls)."""


def _refuse(target: str, param: str, message: str) -> UpstreamUnsupported:
    return UpstreamUnsupported(f"{target}: {message}", target=target, param=param)


def translate(call: Call, target: str) -> Job:
    """The :class:`Job` for a chat or completion call; raises UpstreamUnsupported."""
    req = call.request
    assert not isinstance(req, EmbeddingRequest)
    raw = call.raw
    for name in _REFUSED_FIELDS:
        if raw.get(name) not in (None, False, [], {}, ""):
            raise _refuse(target, name, f"'{name}' is not supported by local models")
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    sampling = _sampling(call, target)
    n = req.n or 1
    if isinstance(req, ChatRequest):
        return _chat(call, req, target, stop, sampling, include_usage, n)
    assert isinstance(req, CompletionRequest)
    if req.best_of is not None and req.best_of != n:
        raise _refuse(target, "best_of", "local models take best_of only equal to n")
    prompt = req.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1 or not isinstance(prompt[0], str):
            raise _refuse(target, "prompt", "local completions take one text prompt")
        prompt = prompt[0]
    return Job(None, prompt, req.max_tokens or call.token_cap or 16, stop, sampling,
               include_usage, n, logprobs=req.logprobs)


def _chat(call: Call, req: ChatRequest, target: str, stop: tuple[str, ...],
          sampling: Sampling, include_usage: bool, n: int) -> Job:
    raw = call.raw
    if req.top_logprobs is not None and not req.logprobs:
        raise _refuse(target, "top_logprobs", "top_logprobs needs logprobs: true")
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    try:
        plan = plan_tools(raw.get("tools") or [], raw.get("tool_choice"),
                          raw.get("parallel_tool_calls"))
    except ToolError as e:
        raise _refuse(target, e.param, str(e)) from None
    grammar = _response_grammar(raw.get("response_format"), target) if plan is None else None
    if plan is not None:
        try:
            grammar = schema_grammar(plan.schema)
        except SchemaError as e:
            raise _refuse(target, "tools", str(e)) from None
    try:
        turns = history(raw["messages"])
    except ToolError as e:
        raise _refuse(target, e.param, str(e)) from None
    turns = [("system" if role == "developer" else role, text) for role, text in turns]
    if plan is not None:
        turns = _with_system(turns, plan.system_prompt)
    limit = req.token_limit or call.token_cap
    messages = tuple(ChatMessage(role, text) for role, text in turns)
    return Job(messages, None, limit, stop, sampling, include_usage, n, grammar, logprobs, plan)


def _with_system(turns: list[tuple[str, str]], text: str) -> list[tuple[str, str]]:
    """``text`` first in the system message (one is added when there is none)."""
    if turns and turns[0][0] == "system":
        return [("system", text + "\n\n" + turns[0][1]), *turns[1:]]
    return [("system", text), *turns]


def _response_grammar(fmt: Any, target: str) -> str | None:
    """The grammar ``response_format`` asks for (None for text)."""
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return schema_grammar({"type": "object"})
    if kind != "json_schema":
        raise _refuse(target, "response_format",
                      "response_format.type is one of 'text', 'json_object', 'json_schema'")
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise _refuse(target, "response_format.json_schema",
                      "response_format.json_schema needs a 'name' and a 'schema'")
    schema = spec.get("schema", {"type": "object"})
    if not isinstance(schema, dict):
        raise _refuse(target, "response_format.json_schema.schema",
                      "response_format.json_schema.schema must be a JSON Schema object")
    try:
        return schema_grammar(schema)
    except SchemaError as e:
        raise _refuse(target, "response_format.json_schema.schema", str(e)) from None


def _sampling(call: Call, target: str) -> Sampling:
    req = call.request
    assert not isinstance(req, EmbeddingRequest)
    raw_seed = call.raw.get("seed")
    return Sampling(
        temperature=req.temperature if req.temperature is not None else DEFAULT_TEMPERATURE,
        top_p=req.top_p if req.top_p is not None else DEFAULT_TOP_P,
        top_k=DEFAULT_TOP_K,
        min_p=DEFAULT_MIN_P,
        seed=raw_seed if isinstance(raw_seed, int) and not isinstance(raw_seed, bool) else None,
        presence_penalty=_number(call.raw.get("presence_penalty")),
        frequency_penalty=_number(call.raw.get("frequency_penalty")),
        logit_bias=_logit_bias(call.raw.get("logit_bias"), target),
    )


def _logit_bias(value: Any, target: str) -> tuple[tuple[int, float], ...]:
    """OpenAI's ``{"token id": bias}`` (bias -100 to 100) as pairs, checked."""
    if value is None:
        return ()
    if not isinstance(value, dict) or len(value) > MAX_LOGIT_BIAS:
        raise _refuse(target, "logit_bias", "logit_bias maps token ids (as strings) to a bias "
                      f"from -100 to 100, at most {MAX_LOGIT_BIAS} of them")
    pairs: list[tuple[int, float]] = []
    for key, bias in value.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit() and len(key) < 10):
            raise _refuse(target, "logit_bias", f"logit_bias key {key!r} is not a token id")
        if isinstance(bias, bool) or not isinstance(bias, int | float) or not -100 <= bias <= 100:
            raise _refuse(target, "logit_bias",
                          f"logit_bias of token {key} must be a number from -100 to 100")
        pairs.append((int(key), float(bias)))
    return tuple(pairs)


def _number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0
