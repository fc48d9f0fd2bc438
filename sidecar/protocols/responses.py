"""OpenAI's Responses API (``POST /v1/responses``), stateless, to and from OpenAI chat.

Three entry points, all pure (no I/O); the HTTP front end decodes the body, calls these, and
runs the gateway in between (the last two live in :mod:`sidecar.protocols.responses_answers`):

* :func:`chat_call` turns a decoded Responses request into an :data:`~sidecar.types.Op.CHAT`
  :class:`~sidecar.types.Call` (the chat body it builds goes through
  :func:`~sidecar.types.validate_call`, so every usual check applies). Anything it cannot
  express raises :class:`~sidecar.errors.InvalidRequest` (400) naming the Responses field
  (``param``), e.g. ``input[2].content[0].type``.
* :func:`response_body` turns the gateway's ``chat.completion`` answer into a ``response``
  object.
* :class:`ResponseStream` turns the gateway's ``chat.completion.chunk`` SSE frames into the
  Responses stream events (``response.created`` ... ``response.completed``).

Stateless: this gateway stores nothing. A response is never kept, so ``previous_response_id``
is refused with a 400 saying so (the client sends the whole conversation in ``input``), and
so are ``conversation``, ``background: true``, stored ``prompt`` templates, ``item_reference``
items, ``file_id`` images and ``truncation: "auto"`` (which needs the stored context). ``store``
is accepted because SDKs send it, and ignored: every response says ``"store": false``.
``include``, ``truncation: "disabled"``, ``service_tier``, ``reasoning``, ``stream_options``,
``prompt_cache_key``, ``prompt_cache_retention``, ``safety_identifier`` and ``text.verbosity``
are accepted and ignored (``include: ["message.output_text.logprobs"]`` and ``top_logprobs``
ask the chat call for logprobs, which come back on the ``output_text`` parts). Other
top-level fields are ignored, so a newer SDK's additions do not break every request.

Only function tools exist here (Responses' flat ``{"type": "function", "name", ...}``
shape); built-in tools (web search, file search, computer use, MCP, ...) are refused naming
``tools[i].type``. Only the chat answer's first choice is used.
"""

from __future__ import annotations

import re
from typing import Any, TypeVar

from sidecar.errors import InvalidRequest
from sidecar.types import (
    Call,
    Op,
    check_bounds,
    validate_call,
)

T = TypeVar("T")

# --- request: Responses -> chat -------------------------------------------------------------

_STATEFUL = {
    "previous_response_id": "this gateway does not store responses; send the whole "
                            "conversation in input",
    "conversation": "this gateway does not store conversations; send the whole conversation "
                    "in input",
    "prompt": "stored prompts are not supported by this gateway; send instructions and input "
              "themselves",
}
_PASSED = ("temperature", "top_p", "user", "metadata", "seed")
_ROLES = frozenset({"user", "system", "developer", "assistant"})
_TOOL_CHOICES = frozenset({"auto", "none", "required"})
_IMAGE_DETAILS = frozenset({"auto", "low", "high"})
_LOGPROBS_INCLUDE = "message.output_text.logprobs"
_KINDS: dict[type, str] = {str: "a string", dict: "an object", list: "an array", bool: "a boolean"}

# chat paths in validate_call's errors, back to the Responses fields they came from
_CHAT_PARAMS = (
    (re.compile(r"^max_completion_tokens"), "max_output_tokens"),
    (re.compile(r"^tools\[(\d+)\]\.function"), r"tools[\1]"),
    (re.compile(r"^response_format\.json_schema"), "text.format"),
    (re.compile(r"^response_format"), "text.format"),
    (re.compile(r"^messages(\[\d+\].*)?$"), "input"),
)


def _bad(param: str, problem: str) -> InvalidRequest:
    return InvalidRequest(f"Invalid request at '{param}': {problem}.", param=param)


def _at(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def field(obj: dict[str, Any], key: str, kind: type[T], path: str = "") -> T | None:
    """``obj[key]`` when it is a ``kind`` (never a bool for another kind), None when absent
    or null; else InvalidRequest naming ``path.key``."""
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise _bad(_at(path, key), f"must be {_KINDS.get(kind, kind.__name__)}")
    return value


def _need(obj: dict[str, Any], key: str, kind: type[T], path: str = "") -> T:
    """:func:`field`, and the field is required."""
    value = field(obj, key, kind, path)
    if value is None:
        raise _bad(_at(path, key), f"'{key}' is required")
    return value


def _object(value: Any, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _bad(path, "must be an object")
    return value


def _check_top_level(raw: dict[str, Any]) -> None:
    """Refuse what needs stored state."""
    for key, why in _STATEFUL.items():
        if raw.get(key) is not None:
            raise _bad(key, why)
    if field(raw, "background", bool):
        raise _bad("background", "background responses are stored and polled, and this "
                                 "gateway stores nothing; send the request without background")
    truncation = raw.get("truncation")
    if truncation not in (None, "disabled"):
        raise _bad("truncation", "only 'disabled' is supported: send input that fits the "
                                 "model's context")


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def _image_part(part: dict[str, Any], path: str) -> dict[str, Any]:
    if part.get("file_id") is not None:
        raise _bad(_at(path, "file_id"), "this gateway stores no files; send the image as "
                                         "a URL or a data URL in image_url")
    url = _need(part, "image_url", str, path)
    image: dict[str, Any] = {"url": url}
    detail = field(part, "detail", str, path)
    if detail is not None:
        if detail not in _IMAGE_DETAILS:
            raise _bad(_at(path, "detail"), "must be 'auto', 'low' or 'high'")
        image["detail"] = detail
    return {"type": "image_url", "image_url": image}


def _content_part(part: Any, path: str, *, text_only: bool) -> dict[str, Any]:
    """One Responses content part as a chat content part."""
    part = _object(part, path)
    kind = _need(part, "type", str, path)
    if kind in ("input_text", "output_text"):
        return _text_part(_need(part, "text", str, path))
    if kind == "refusal":
        return _text_part(_need(part, "refusal", str, path))
    if kind == "input_image" and not text_only:
        return _image_part(part, path)
    allowed = "text parts" if text_only else "text and image parts"
    raise _bad(_at(path, "type"), f"content part type '{kind}' is not supported here "
                                  f"(only {allowed})")


def _content(value: Any, path: str, *, text_only: bool = False) -> str | list[dict[str, Any]]:
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise _bad(path, "must be a string or an array of content parts")
    return [_content_part(p, _at(path, j), text_only=text_only) for j, p in enumerate(value)]


def _message(item: dict[str, Any], path: str) -> dict[str, Any]:
    role = _need(item, "role", str, path)
    if role not in _ROLES:
        raise _bad(_at(path, "role"), "must be 'user', 'system', 'developer' or 'assistant'")
    if "content" not in item:
        raise _bad(_at(path, "content"), "'content' is required")
    return {"role": role, "content": _content(item["content"], _at(path, "content"))}


def _tool_call(item: dict[str, Any], path: str) -> dict[str, Any]:
    return {"id": _need(item, "call_id", str, path), "type": "function",
            "function": {"name": _need(item, "name", str, path),
                         "arguments": _need(item, "arguments", str, path)}}


def _tool_result(item: dict[str, Any], path: str) -> dict[str, Any]:
    if "output" not in item:
        raise _bad(_at(path, "output"), "'output' is required")
    return {"role": "tool", "tool_call_id": _need(item, "call_id", str, path),
            "content": _content(item["output"], _at(path, "output"), text_only=True)}


def _add_call(messages: list[dict[str, Any]], call: dict[str, Any]) -> None:
    """Calls join the assistant turn they follow (consecutive calls are one chat turn)."""
    last = messages[-1] if messages else None
    if last is not None and last["role"] == "assistant":
        last.setdefault("tool_calls", []).append(call)
    else:
        messages.append({"role": "assistant", "content": None, "tool_calls": [call]})


def _add_item(messages: list[dict[str, Any]], item: Any, path: str) -> None:
    item = _object(item, path)
    kind = field(item, "type", str, path)
    if kind in (None, "message"):
        messages.append(_message(item, path))
    elif kind == "function_call":
        _add_call(messages, _tool_call(item, path))
    elif kind == "function_call_output":
        messages.append(_tool_result(item, path))
    elif kind == "item_reference":
        raise _bad(_at(path, "type"), "this gateway stores no items; send the item itself")
    elif kind != "reasoning":  # reasoning items are the model's own notes: dropped
        raise _bad(_at(path, "type"), f"input item type '{kind}' is not supported (only "
                                      "message, function_call, function_call_output, reasoning)")


def _messages(raw: dict[str, Any]) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    instructions = field(raw, "instructions", str)
    if instructions:
        messages.append({"role": "system", "content": instructions})
    items = raw.get("input")
    if isinstance(items, str):
        messages.append({"role": "user", "content": items})
        return messages
    if items is None:
        raise _bad("input", "'input' is required")
    if not isinstance(items, list):
        raise _bad("input", "must be a string or an array of input items")
    if not items:
        raise _bad("input", "must not be empty")
    for i, item in enumerate(items):
        _add_item(messages, item, _at("input", i))
    return messages


def _function_tool(tool: Any, path: str) -> dict[str, Any]:
    """A Responses function tool, whole: ``{"type", "name", "description", "parameters",
    "strict"}`` (absent ones null), as the response object echoes it."""
    tool = _object(tool, path)
    kind = _need(tool, "type", str, path)
    if kind != "function":
        raise _bad(_at(path, "type"), f"tool type '{kind}' is not supported: this gateway "
                                      "has function tools only")
    return {"type": "function", "name": _need(tool, "name", str, path),
            "description": field(tool, "description", str, path),
            "parameters": field(tool, "parameters", dict, path),
            "strict": field(tool, "strict", bool, path)}


def function_tools(raw: dict[str, Any]) -> list[dict[str, Any]]:
    """The request's function tools in Responses' flat shape, every field present (an
    answer echoes them). Raises InvalidRequest."""
    return [_function_tool(t, _at("tools", i))
            for i, t in enumerate(field(raw, "tools", list) or [])]


def _chat_tool(tool: dict[str, Any]) -> dict[str, Any]:
    function = {k: v for k, v in tool.items() if k != "type" and v is not None}
    return {"type": "function", "function": function}


def _tool_choice(value: Any) -> str | dict[str, Any]:
    if isinstance(value, str) and value in _TOOL_CHOICES:
        return value
    if isinstance(value, dict) and value.get("type") == "function":
        return {"type": "function", "function": {"name": _need(value, "name", str,
                                                                "tool_choice")}}
    raise _bad("tool_choice", "must be 'auto', 'none', 'required' or "
                              "{\"type\": \"function\", \"name\": ...}")


def _response_format(raw: dict[str, Any]) -> dict[str, Any] | None:
    text = field(raw, "text", dict)
    fmt = field(text, "format", dict, "text") if text is not None else None
    if fmt is None:
        return None
    kind = _need(fmt, "type", str, "text.format")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind != "json_schema":
        raise _bad("text.format.type", "must be 'text', 'json_object' or 'json_schema'")
    spec: dict[str, Any] = {"name": _need(fmt, "name", str, "text.format"),
                            "schema": _need(fmt, "schema", dict, "text.format")}
    for key, kind_ in (("strict", bool), ("description", str)):
        value = field(fmt, key, kind_, "text.format")
        if value is not None:
            spec[key] = value
    return {"type": "json_schema", "json_schema": spec}


def _wants_logprobs(raw: dict[str, Any]) -> bool:
    include = field(raw, "include", list) or []
    for i, name in enumerate(include):
        if not isinstance(name, str):
            raise _bad(_at("include", i), "must be a string")
    top = raw.get("top_logprobs")
    return _LOGPROBS_INCLUDE in include or (isinstance(top, int) and top > 0)


def _options(raw: dict[str, Any], chat: dict[str, Any]) -> None:
    """The sampling and output options, onto the chat body."""
    for key in _PASSED:
        if raw.get(key) is not None:
            chat[key] = raw[key]
    if raw.get("max_output_tokens") is not None:
        chat["max_completion_tokens"] = raw["max_output_tokens"]
    if raw.get("top_logprobs") is not None:
        chat["top_logprobs"] = raw["top_logprobs"]
    if _wants_logprobs(raw):
        chat["logprobs"] = True
    if field(raw, "stream", bool):
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    fmt = _response_format(raw)
    if fmt is not None:
        chat["response_format"] = fmt


def _tool_options(raw: dict[str, Any], chat: dict[str, Any]) -> None:
    tools = function_tools(raw)
    if tools:
        chat["tools"] = [_chat_tool(t) for t in tools]
    if raw.get("tool_choice") is not None:
        chat["tool_choice"] = _tool_choice(raw["tool_choice"])
    parallel = field(raw, "parallel_tool_calls", bool)
    if parallel is not None:
        chat["parallel_tool_calls"] = parallel


def _renamed(err: InvalidRequest) -> InvalidRequest:
    """A chat validation error, naming the Responses field instead of the chat one."""
    param = err.param
    if param is None:
        return err
    for pattern, name in _CHAT_PARAMS:
        new = pattern.sub(name, param, count=1)
        if new != param:
            message = err.message.replace(f"'{param}'", f"'{new}'")
            return InvalidRequest(message, param=new)
    return err


def chat_call(raw: dict[str, Any]) -> Call:
    """Validate a decoded Responses request body; return the chat :class:`Call` it asks for.

    Raises :class:`~sidecar.errors.InvalidRequest` naming the offending Responses field
    (see the module docstring for what is refused)."""
    if not isinstance(raw, dict):
        raise InvalidRequest("Invalid request: the body must be a JSON object.")
    check_bounds(raw)
    _check_top_level(raw)
    chat: dict[str, Any] = {"model": raw.get("model"), "messages": _messages(raw)}
    _tool_options(raw, chat)
    _options(raw, chat)
    if chat["model"] is None:
        del chat["model"]
    try:
        return validate_call(Op.CHAT, chat)
    except InvalidRequest as e:
        raise _renamed(e) from None
