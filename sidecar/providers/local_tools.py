"""OpenAI tools for local models in llama.cpp's generic format (pure, no I/O).

A model without a tool template of its own is told about the tools in its system prompt and
its output is constrained, by the grammar of :attr:`ToolPlan.schema`, to exactly one of::

    {"tool_calls": [{"name": "get_weather", "arguments": {...}}, ...]}
    {"response": "the text answer"}

with each call's ``arguments`` valid for that tool's ``parameters`` schema.

* :func:`plan_tools` checks ``tools`` / ``tool_choice`` / ``parallel_tool_calls`` and
  builds the prompt and the output schema: ``auto`` allows both forms, ``required`` only
  tool calls, a named function only a call of it (exactly one), ``parallel_tool_calls``
  false at most one call (else at most one per tool offered, up to
  :data:`MAX_PARALLEL_CALLS`), ``none`` (or no tools) no plan at all.
* :func:`history` renders a conversation's messages for the chat template: text parts
  joined, an assistant's ``tool_calls`` as the JSON the model would have written, a tool
  result as a ``tool`` turn naming its call.
* :func:`parse_output` reads a whole answer back; :class:`ToolStream` does the same
  incrementally, as OpenAI stream deltas (content as it is generated; per call, the name
  once and then the arguments' JSON text in pieces).

Errors are :class:`ToolError` naming the request field (``param``).
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

import msgspec

from local_models import SchemaError, check_schema
from sidecar.types import Delta, FunctionCall, FunctionDelta, ToolCall, ToolCallDelta

__all__ = ["ToolError", "ToolPlan", "ToolStream", "history", "parse_output", "plan_tools"]

#: OpenAI's rule for function names.
NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
MAX_TOOLS = 128
#: Calls in one answer when parallel calls are allowed: one per tool offered, at most this
#: many. Small models, once they have made a call, tend to repeat it until max_tokens; the
#: bound ends the array (one tool: one call per turn).
MAX_PARALLEL_CALLS = 4

_NO_ARGUMENTS: dict[str, Any] = {"type": "object", "properties": {}}


class ToolError(ValueError):
    """A tool request that cannot be served; ``param`` names the field."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class ToolPlan(msgspec.Struct, frozen=True):
    system_prompt: str
    """The tools and how to answer: goes first in the system message."""
    schema: dict[str, Any]
    """The output's JSON Schema (its grammar constrains the generation)."""
    names: tuple[str, ...]


def _choice(tool_choice: object, names: list[str]) -> str:
    """"auto", "required", "none", or the one function's name."""
    if tool_choice is None:
        return "auto" if names else "none"
    if tool_choice in ("auto", "required", "none"):
        assert isinstance(tool_choice, str)
        return tool_choice
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
        function = tool_choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str):
            raise ToolError("tool_choice", "tool_choice.function.name is missing")
        if name not in names:
            raise ToolError("tool_choice", f"tool_choice names the function '{name[:64]}', "
                            "which is not in tools")
        return name
    raise ToolError("tool_choice", "tool_choice is 'none', 'auto', 'required' or "
                    '{"type": "function", "function": {"name": ...}}')


def _tool(i: int, tool: object) -> tuple[str, str | None, dict[str, Any]]:
    """(name, description, parameters) of ``tools[i]``, checked."""
    where = f"tools[{i}]"
    if not isinstance(tool, dict) or tool.get("type", "function") != "function":
        raise ToolError(where, f"{where} must be a function tool")
    function = tool.get("function")
    if not isinstance(function, dict):
        raise ToolError(f"{where}.function", f"{where}.function is missing")
    name = function.get("name")
    if not isinstance(name, str) or not NAME.match(name):
        raise ToolError(f"{where}.function.name", f"{where}.function.name must be 1 to 64 "
                        "letters, digits, underscores or dashes")
    description = function.get("description")
    parameters = function.get("parameters")
    if parameters is None or parameters == {}:
        parameters = _NO_ARGUMENTS
    if not isinstance(parameters, dict):
        raise ToolError(f"{where}.function.parameters",
                        f"{where}.function.parameters must be a JSON Schema object")
    try:
        check_schema(parameters)
    except SchemaError as e:
        raise ToolError(f"{where}.function.parameters",
                        f"{where}.function.parameters: {e}") from None
    return name, description if isinstance(description, str) else None, parameters


def plan_tools(tools: list[Any], tool_choice: object,
               parallel_tool_calls: bool | None) -> ToolPlan | None:
    """The prompt and output schema for ``tools``; None for plain text. Raises ToolError."""
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise ToolError("tools", f"tools is a list of at most {MAX_TOOLS} function tools")
    specs = [_tool(i, t) for i, t in enumerate(tools)]
    names = [name for name, _, _ in specs]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ToolError(f"tools[{i}].function.name", f"two tools are named '{name}'")
    choice = _choice(tool_choice, names)
    if choice == "none":
        return None
    if not names:
        raise ToolError("tool_choice", f"tool_choice '{choice}' needs tools")
    chosen = [s for s in specs if choice in ("auto", "required") or s[0] == choice]
    calls = [{"type": "object", "properties": {"name": {"const": name}, "arguments": params},
              "required": ["name", "arguments"], "additionalProperties": False}
             for name, _, params in chosen]
    array: dict[str, Any] = {"type": "array", "items": calls[0] if len(calls) == 1
                             else {"anyOf": calls}, "minItems": 1}
    if parallel_tool_calls is False or choice not in ("auto", "required"):
        array["maxItems"] = 1
    else:
        array["maxItems"] = min(len(chosen), MAX_PARALLEL_CALLS)
    call_form = {"type": "object", "properties": {"tool_calls": array},
                 "required": ["tool_calls"], "additionalProperties": False}
    text_form = {"type": "object", "properties": {"response": {"type": "string"}},
                 "required": ["response"], "additionalProperties": False}
    schema = {"anyOf": [call_form, text_form]} if choice == "auto" else call_form
    return ToolPlan(_prompt(chosen, choice), schema, tuple(names))


def _prompt(chosen: list[tuple[str, str | None, dict[str, Any]]], choice: str) -> str:
    listing = "\n".join(
        json.dumps({"name": name, **({"description": d} if d else {}), "parameters": params},
                   ensure_ascii=False)
        for name, d, params in chosen)
    call = '{"tool_calls": [{"name": <tool name>, "arguments": <arguments object>}]}'
    if choice == "auto":
        how = (f"To call tools, answer with {call}. To answer the user directly, answer "
               'with {"response": <your answer>}.')
    elif choice == "required":
        how = f"You must call at least one tool: answer with {call}."
    else:
        how = f"You must call the tool '{choice}': answer with {call}."
    return (f"You can call these tools (JSON Schema of their arguments):\n{listing}\n\n"
            f"Answer with one JSON object and nothing else. {how}")


# --- the conversation -----------------------------------------------------------------------


def _text(content: object, i: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for part in content if isinstance(content, list) else ():
        if not isinstance(part, dict) or part.get("type") != "text" \
                or not isinstance(part.get("text"), str):
            raise ToolError("messages", f"messages[{i}]: only text content parts are "
                            "supported by local models")
        texts.append(part["text"])
    return "\n".join(texts)


def _arguments(text: object) -> object:
    """A call's arguments as JSON when they parse, else as the text they are."""
    if not isinstance(text, str):
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def history(messages: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """``(role, text)`` turns for the chat template (see the module's docstring)."""
    names: dict[str, str] = {}
    turns: list[tuple[str, str]] = []
    for i, m in enumerate(messages):
        role, text = m.get("role", "user"), _text(m.get("content"), i)
        calls = m.get("tool_calls") or []
        if role == "assistant" and calls:
            rendered = []
            for call in calls:
                function = call.get("function") or {}
                name = str(function.get("name", ""))
                names[str(call.get("id", ""))] = name
                rendered.append({"name": name,
                                 "arguments": _arguments(function.get("arguments", "{}"))})
            text = json.dumps({"tool_calls": rendered}, ensure_ascii=False)
        elif role in ("tool", "function"):
            call_id = str(m.get("tool_call_id") or "")
            name = names.get(call_id) or m.get("name") or ""
            result = {"tool_call_id": call_id, "name": name, "content": _arguments(text)}
            role, text = "tool", json.dumps(
                {k: v for k, v in result.items() if v != ""}, ensure_ascii=False)
        turns.append((role, text))
    return turns


# --- the answer -----------------------------------------------------------------------------


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def parse_output(text: str) -> tuple[str | None, list[ToolCall]]:
    """``(content, tool_calls)`` of a whole answer; text that is not in the format (an
    answer cut by max_tokens) is the content as it is."""
    try:
        value = json.loads(text)
    except ValueError:
        return text, []
    if isinstance(value, dict) and isinstance(value.get("tool_calls"), list):
        calls = [ToolCall(_call_id(), FunctionCall(
            str(c.get("name", "")),
            json.dumps(c.get("arguments", {}), ensure_ascii=False, separators=(",", ":"))))
            for c in value["tool_calls"] if isinstance(c, dict)]
        return None, calls
    if isinstance(value, dict) and isinstance(value.get("response"), str):
        return value["response"], []
    return text, []


_HEAD = re.compile(r'\s*\{\s*"(tool_calls|response)"\s*:\s*')
_CALL = re.compile(r'\s*,?\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "b": "\b", "f": "\f", "/": "/", "\\": "\\",
            '"': '"'}
#: Characters of an answer's start after which it is known not to be in the format.
_HEAD_WINDOW = 40


class ToolStream:
    """An answer in the generic format read as it is generated; :meth:`feed` returns the
    OpenAI deltas its new text completes. Not thread-safe."""

    def __init__(self) -> None:
        self.buf = ""
        self.pos = 0
        self.state = "head"
        self.calls = 0
        self.depth = 0
        self.in_string = False
        self.escaped = False

    @property
    def called(self) -> bool:
        """Whether the answer is tool calls (known once the first one started)."""
        return self.calls > 0

    def feed(self, text: str) -> list[Delta]:
        self.buf += text
        out: list[Delta] = []
        while self._step(out):
            pass
        return out

    def finish(self) -> list[Delta]:
        """What is left at the end: text that never was in the format, as content."""
        if self.state in ("head", "raw") and self.pos < len(self.buf):
            rest, self.pos = self.buf[self.pos:], len(self.buf)
            return [Delta(content=rest)]
        return []

    def _step(self, out: list[Delta]) -> bool:
        """Advance by one element; whether to try again."""
        rest = self.buf[self.pos:]
        if self.state == "head":
            m = _HEAD.match(rest)
            if m is None:
                if len(rest) > _HEAD_WINDOW or rest.lstrip()[:1] not in ("", "{"):
                    self.state = "raw"
                    return True
                return False
            self.pos += m.end()
            self.state = "open_calls" if m.group(1) == "tool_calls" else "open_text"
            return True
        if self.state == "raw":
            if rest:
                out.append(Delta(content=rest))
                self.pos = len(self.buf)
            return False
        if self.state in ("open_text", "open_calls"):
            stripped = rest.lstrip()
            if not stripped:
                return False
            self.pos += len(rest) - len(stripped) + 1  # the '"' or '['
            self.state = "text" if self.state == "open_text" else "call"
            return True
        if self.state == "text":
            text = self._string()
            if text:
                out.append(Delta(content=text))
            return False
        if self.state == "call":
            stripped = rest.lstrip()
            if stripped.startswith("]"):
                self.state = "done"
                return False
            m = _CALL.match(rest)
            if m is None:
                return False
            self.pos += m.end()
            name = json.loads(f'"{m.group(1)}"')
            out.append(Delta(tool_calls=[ToolCallDelta(
                index=self.calls, id=_call_id(), type="function",
                function=FunctionDelta(name=name, arguments=""))]))
            self.calls += 1
            self.state, self.depth, self.in_string, self.escaped = "arguments", 0, False, False
            return True
        if self.state == "arguments":
            piece = self._value()
            if piece:
                out.append(Delta(tool_calls=[ToolCallDelta(
                    index=self.calls - 1, function=FunctionDelta(arguments=piece))]))
            return self.state == "close_call"
        if self.state == "close_call":
            stripped = rest.lstrip()
            if not stripped:
                return False
            self.pos += len(rest) - len(stripped) + 1  # the call's '}'
            self.state = "call"
            return True
        return False  # done

    def _string(self) -> str:
        """Decode the JSON string from ``pos`` as far as it is complete."""
        buf, i, out = self.buf, self.pos, []
        while i < len(buf):
            c = buf[i]
            if c == '"':
                self.state = "done"
                i += 1
                break
            if c != "\\":
                out.append(c)
                i += 1
                continue
            if i + 1 >= len(buf):
                break
            e = buf[i + 1]
            if e != "u":
                out.append(_ESCAPES.get(e, e))
                i += 2
                continue
            if i + 6 > len(buf):
                break
            code = int(buf[i + 2:i + 6], 16)
            if 0xD800 <= code < 0xDC00:  # a surrogate pair: wait for its second half
                if i + 12 > len(buf):
                    break
                if buf[i + 6:i + 8] == "\\u":
                    low = int(buf[i + 8:i + 12], 16)
                    out.append(chr(0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00)))
                    i += 12
                    continue
            out.append(chr(code))
            i += 6
        self.pos = i
        return "".join(out)

    def _value(self) -> str:
        """The arguments' JSON text from ``pos`` up to the end of the value, as far as it
        has been generated; whitespace before the value is dropped."""
        buf, i = self.buf, self.pos
        if self.depth == 0 and not self.in_string:
            while i < len(buf) and buf[i] in " \t\r\n":
                i += 1
        start = i
        while i < len(buf):
            c = buf[i]
            i += 1
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif c == "\\":
                    self.escaped = True
                elif c == '"':
                    self.in_string = False
                    if self.depth == 0:
                        self.state = "close_call"
                        break
            elif self.depth == 0 and c in ",}]":  # the end of a bare scalar
                i -= 1
                self.state = "close_call"
                break
            elif c in "{[":
                self.depth += 1
            elif c in "}]":
                self.depth -= 1
                if self.depth == 0:
                    self.state = "close_call"
                    break
            elif c == '"':
                self.in_string = True
        self.pos = i
        return buf[start:i]
