"""Anthropic's native Messages API, translated to and from the OpenAI chat format.

The gateway only speaks OpenAI, so everything Anthropic-specific stays in this module and
:mod:`sidecar.providers.anthropic_answers`:

* :func:`build_request` turns a validated :class:`~sidecar.types.ChatRequest` into a
  Messages API body (system prompt lifted out, roles merged, images, tools, tool results).
* :func:`~sidecar.providers.anthropic_answers.translate_message` turns an Anthropic message
  into a ``chat.completion``.
* :class:`~sidecar.providers.anthropic_answers.StreamTranslator` turns Anthropic's SSE
  events into ``chat.completion.chunk`` frames.

The three are pure (no I/O), so they are tested without a network; :class:`AnthropicMessages`
adds only the HTTP exchange and the translation of failures.

What the Messages API cannot express (``n`` > 1, audio or file parts, the legacy ``function``
role, tool-call arguments that are not a JSON object) is refused before anything is sent, as a
400 :class:`~sidecar.errors.UpstreamUnsupported`: the gateway tries the route's next target,
and answers 400 when no target can take the request. OpenAI fields without an Anthropic
equivalent (``response_format``, ``seed``, ``logprobs``, ``presence_penalty``, ...) are not
sent.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

import msgspec

from sidecar.config import AnthropicProvider
from sidecar.errors import UpstreamMalformed, UpstreamUnreachable, UpstreamUnsupported
from sidecar.providers.anthropic_answers import StreamTranslator, translate_message
from sidecar.providers.base import Reply, Upstream, check_usage
from sidecar.types import MAX_USAGE_TOKENS, Call, ChatRequest, Message, Meter, Op, Stop, Tool

_PATH = "/v1/messages"
_COUNT_PATH = "/v1/messages/count_tokens"
_COUNTED = frozenset({"messages", "system", "tools", "tool_choice", "thinking", "mcp_servers"})
"""The fields of a Messages body that ``count_tokens`` takes (besides ``model``)."""
_encoder = msgspec.json.Encoder()

# --- OpenAI -> Anthropic ---------------------------------------------------------------------

_IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})
_TOOL_CHOICES = {"auto": "auto", "none": "none", "required": "any"}


class _TextPart(msgspec.Struct):
    text: str


class _ImageURL(msgspec.Struct):
    url: str


class _ImagePart(msgspec.Struct):
    image_url: _ImageURL


def _bad(message: str, target: str, param: str | None = None) -> UpstreamUnsupported:
    return UpstreamUnsupported(f"{target}: {message}", target=target, param=param)


def build_request(
    request: ChatRequest, model: str, *, default_max_tokens: int, target: str = "anthropic"
) -> dict[str, Any]:
    """Translate an OpenAI chat request into a Messages API body for ``model``.

    System and developer messages are joined into ``system``; ``tool`` messages become user
    ``tool_result`` blocks; consecutive messages of one role are merged, as Anthropic
    requires alternating roles. Raises a 400 :class:`UpstreamUnsupported` naming the offending
    field (``param``) for anything Anthropic cannot be asked.
    """
    if request.n is not None and request.n > 1:
        raise _bad("n > 1 is not supported", target, "n")
    system: list[str] = []
    messages: list[dict[str, Any]] = []
    for i, msg in enumerate(request.messages):
        where = f"messages[{i}]"
        if msg.role in ("system", "developer"):
            blocks = _content_blocks(msg.content, where, target, images=False)
            if blocks:
                system.append("\n".join(b["text"] for b in blocks))
            continue
        role, blocks = _message_blocks(msg, where, target)
        if not blocks:
            continue  # Anthropic refuses empty messages; dropping one keeps the rest valid
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"].extend(blocks)
        else:
            messages.append({"role": role, "content": blocks})
    if not messages:
        raise _bad("at least one user or assistant message with content is required",
                   target, "messages")

    body: dict[str, Any] = {
        "model": model,
        "max_tokens": request.token_limit or default_max_tokens,
        "messages": messages,
    }
    if system:
        body["system"] = "\n\n".join(system)
    if request.temperature is not None:
        body["temperature"] = min(request.temperature, 1.0)  # OpenAI allows up to 2
    if request.top_p is not None:
        body["top_p"] = request.top_p
    stops = _stop_sequences(request.stop)
    if stops:
        body["stop_sequences"] = stops
    if request.tools:
        body["tools"] = [_tool(t, f"tools[{i}]", target) for i, t in enumerate(request.tools)]
        if request.tool_choice is not None:
            body["tool_choice"] = _tool_choice(request.tool_choice, target)
    if request.user:
        body["metadata"] = {"user_id": request.user}
    if request.stream:
        body["stream"] = True
    return body


def _message_blocks(msg: Message, where: str, target: str) -> tuple[str, list[dict[str, Any]]]:
    """The Anthropic role and content blocks of one non-system message."""
    if msg.role == "user":
        return "user", _content_blocks(msg.content, where, target, images=True)
    if msg.role == "assistant":
        blocks = _content_blocks(msg.content, where, target, images=False)
        for j, call in enumerate(msg.tool_calls or ()):
            param = f"{where}.tool_calls[{j}].function.arguments"
            blocks.append({
                "type": "tool_use",
                "id": call.id,
                "name": call.function.name,
                "input": _arguments(call.function.arguments, param, target),
            })
        return "assistant", blocks
    if msg.role == "tool":
        if not msg.tool_call_id:
            raise _bad("a tool message needs tool_call_id", target, f"{where}.tool_call_id")
        result: dict[str, Any] = {"type": "tool_result", "tool_use_id": msg.tool_call_id}
        content = _content_blocks(msg.content, where, target, images=True)
        if content:
            result["content"] = content
        return "user", [result]
    raise _bad(f"role {msg.role!r} is not supported; use tools and tool messages",
               target, f"{where}.role")


def _content_blocks(
    content: str | list[dict[str, Any]] | None, where: str, target: str, *, images: bool
) -> list[dict[str, Any]]:
    """Text and (where ``images``) image blocks; empty text is dropped, as Anthropic wants."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    blocks: list[dict[str, Any]] = []
    for k, part in enumerate(content):
        param = f"{where}.content[{k}]"
        kind = part.get("type")
        try:
            if kind == "text":
                text = msgspec.convert(part, _TextPart).text
                if text:
                    blocks.append({"type": "text", "text": text})
                continue
            if kind == "image_url" and images:
                url = msgspec.convert(part, _ImagePart).image_url.url
                blocks.append({"type": "image", "source": _image_source(url, param, target)})
                continue
        except msgspec.ValidationError as e:
            raise _bad(f"invalid {kind} content part: {e}", target, param) from None
        raise _bad(f"content part type {kind!r} is not supported here", target, param)
    return blocks


def _image_source(url: str, param: str, target: str) -> dict[str, Any]:
    if url.startswith("data:"):
        header, comma, data = url[5:].partition(",")
        media_type, *params = header.split(";")
        if not comma or "base64" not in params or not data:
            raise _bad("image data URLs must be base64: 'data:image/png;base64,...'",
                       target, param)
        if media_type not in _IMAGE_TYPES:
            raise _bad(f"image type {media_type!r} is not supported (jpeg, png, gif, webp)",
                       target, param)
        return {"type": "base64", "media_type": media_type, "data": data}
    if url.startswith(("https://", "http://")):
        return {"type": "url", "url": url}
    raise _bad("image_url must be a base64 data: URL or an http(s) URL", target, param)


def _arguments(arguments: str, param: str, target: str) -> dict[str, Any]:
    if not arguments.strip():
        return {}  # some clients send "" for a function without parameters
    try:
        return msgspec.json.decode(arguments, type=dict[str, Any])
    except msgspec.DecodeError:  # ValidationError included: valid JSON but not an object
        raise _bad("tool call arguments must be a JSON object", target, param) from None


def _tool(tool: Tool, param: str, target: str) -> dict[str, Any]:
    if tool.type != "function":
        raise _bad(f"tool type {tool.type!r} is not supported", target, f"{param}.type")
    fn = tool.function
    spec: dict[str, Any] = {
        "name": fn.name,
        "input_schema": fn.parameters or {"type": "object", "properties": {}},
    }
    if fn.description:
        spec["description"] = fn.description
    return spec


def _tool_choice(choice: str | dict[str, Any], target: str) -> dict[str, Any]:
    if isinstance(choice, str):
        if choice in _TOOL_CHOICES:
            return {"type": _TOOL_CHOICES[choice]}
    else:
        fn = choice.get("function")
        if (choice.get("type") == "function" and isinstance(fn, dict)
                and isinstance(fn.get("name"), str)):
            return {"type": "tool", "name": fn["name"]}
    raise _bad("tool_choice must be 'auto', 'none', 'required' or "
               "{'type': 'function', 'function': {'name': ...}}", target, "tool_choice")


def _stop_sequences(stop: Stop) -> list[str]:
    if stop is None:
        return []
    return [s for s in ([stop] if isinstance(stop, str) else stop) if s]


# --- the provider ----------------------------------------------------------------------------


class AnthropicMessages:
    """Provider for Anthropic's Messages API (chat only). Safe for concurrent use.

    A call that came in as a Messages body (``Call.messages``) is sent as that body (model,
    stream and a budget's token cap set) and answered in Anthropic's format, so what only
    Anthropic knows (thinking blocks, cache control, ``top_k``, ...) is neither lost nor
    translated twice; its answer is still read for usage and validity."""

    native_messages = True

    def __init__(self, config: AnthropicProvider) -> None:
        self.name = config.name
        self._config = config
        headers = {"anthropic-version": config.version}
        if config.api_key:
            headers["x-api-key"] = config.api_key
        self._http = Upstream(config, headers)

    def supports(self, op: Op) -> bool:
        return op is Op.CHAT

    def _body(self, call: Call, model: str, target: str, *, stream: bool) -> bytes:
        if call.messages is not None:
            body = {**call.messages, "model": model}
            if call.token_cap is not None:
                body["max_tokens"] = min(call.token_cap, body.get("max_tokens", call.token_cap))
        else:
            body = build_request(_chat(call, target), model,
                                 default_max_tokens=self._config.default_max_tokens,
                                 target=target)
            if call.token_cap is not None:
                body["max_tokens"] = call.token_cap
        if stream:
            body["stream"] = True
        else:
            body.pop("stream", None)
        return _encoder.encode(body)

    async def send(self, call: Call, model: str, timeout_s: float,
                   meter: Meter | None = None) -> Reply:
        target = f"{self.name}/{model}"
        content = self._body(call, model, target, stream=False)
        body = await self._http.post(_PATH, content, timeout_s, target, meter)
        completion = translate_message(body, target=target)
        check_usage(completion.usage, target, meter)
        if call.messages is not None:
            return Reply(body, completion.usage, native=True)
        return Reply(_encoder.encode(completion), completion.usage)

    async def stream(self, call: Call, model: str, timeout_s: float,
                     meter: Meter | None = None) -> AsyncGenerator[bytes, None]:
        target = f"{self.name}/{model}"
        content = self._body(call, model, target, stream=True)
        options = _chat(call, target).stream_options
        translator = StreamTranslator(target, include_usage=bool(options and options.include_usage),
                                      native=call.messages is not None)
        meter = meter or Meter()
        async with self._http.open_stream(_PATH, content, timeout_s, target, meter) as pieces:
            held = b""
            async for piece in pieces:
                if translator.finished:
                    continue  # drain to the end so the connection can be reused
                out = translator.feed(piece)
                meter.content_chunks = translator.content_chunks
                meter.content_chars = translator.content_chars
                usage = translator.usage
                check_usage(usage, target, meter)  # before a usage chunk can be relayed
                if translator.finished:
                    meter.usage = usage
                # The role preamble is held back until the first token, so a failure before
                # it can still be replaced by another target.
                if out and translator.started:
                    yield held + out if held else out
                    held = b""
                else:
                    held += out
            if held:
                yield held
        if not translator.finished:
            raise UpstreamUnreachable(f"{target} ended the stream early", target=target)

    async def count_tokens(self, body: dict[str, Any], model: str, timeout_s: float) -> int:
        """Anthropic's own count of the input tokens of a Messages ``body`` for ``model``.
        Raises :class:`~sidecar.errors.UpstreamError`."""
        target = f"{self.name}/{model}"
        sent = {k: v for k, v in body.items() if k in _COUNTED} | {"model": model}
        answer = await self._http.post(_COUNT_PATH, _encoder.encode(sent), timeout_s, target)
        try:
            count = msgspec.json.decode(answer, type=_Count).input_tokens
        except msgspec.DecodeError:  # ValidationError included
            raise UpstreamMalformed(f"{target} answered count_tokens with an invalid body",
                                    target=target) from None
        if not 0 <= count <= MAX_USAGE_TOKENS:
            raise UpstreamMalformed(f"{target} counted {count} tokens", target=target)
        return count

    async def aclose(self) -> None:
        await self._http.aclose()


class _Count(msgspec.Struct):
    input_tokens: int


def _chat(call: Call, target: str) -> ChatRequest:
    if not isinstance(call.request, ChatRequest):
        raise _bad(f"only {Op.CHAT.value} is supported", target)
    return call.request
