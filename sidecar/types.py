"""Internal request, response, chunk and usage Structs shared by every front end.

The OpenAI wire format is the gateway's lingua franca: front ends decode client bodies into
the request Structs below (which validate types and values), providers answer with OpenAI
JSON bodies or SSE frames, and the response Structs describe those bodies for the places
that must look inside them (validation, translation, the gRPC front end).

A :class:`Call` keeps the client's original JSON object next to its validated form, so that
fields the gateway does not model (``tools``, ``response_format``, ``seed``, ``logprobs``,
...) pass through to OpenAI-compatible providers untouched.
"""

from __future__ import annotations

import enum
from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

from sidecar.errors import InvalidRequest


class Op(enum.Enum):
    """An operation; the value is the OpenAI path below ``/v1/``."""

    CHAT = "chat/completions"
    COMPLETIONS = "completions"
    EMBEDDINGS = "embeddings"


# --- requests -------------------------------------------------------------------------------

Role = Literal["system", "developer", "user", "assistant", "tool", "function"]


class FunctionCall(msgspec.Struct, omit_defaults=True):
    name: str
    arguments: str = ""


class ToolCall(msgspec.Struct, omit_defaults=True):
    id: str
    function: FunctionCall
    type: str = "function"


class Message(msgspec.Struct, omit_defaults=True):
    role: Role
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class StreamOptions(msgspec.Struct, omit_defaults=True):
    include_usage: bool = False


class FunctionDef(msgspec.Struct, omit_defaults=True):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(msgspec.Struct, omit_defaults=True):
    function: FunctionDef
    type: str = "function"


Stop = str | list[str] | None
Temperature = Annotated[float, Meta(ge=0, le=2)]
MaxTokens = Annotated[int, Meta(ge=1)]


class ChatRequest(msgspec.Struct, kw_only=True):
    """``POST /v1/chat/completions``. Fields not listed here are kept in ``Call.raw``."""

    model: Annotated[str, Meta(min_length=1)]
    messages: Annotated[list[Message], Meta(min_length=1)]
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: Annotated[float, Meta(ge=0, le=1)] | None = None
    n: Annotated[int, Meta(ge=1, le=128)] | None = None
    stop: Stop = None
    tools: list[Tool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    user: str | None = None
    metadata: dict[str, Any] | None = None

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


Prompt = str | list[str | int | list[int]]


class CompletionRequest(msgspec.Struct, kw_only=True):
    """``POST /v1/completions`` (legacy text completion)."""

    model: Annotated[str, Meta(min_length=1)]
    prompt: Prompt
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: Annotated[float, Meta(ge=0, le=1)] | None = None
    stop: Stop = None


class EmbeddingRequest(msgspec.Struct, kw_only=True):
    """``POST /v1/embeddings``."""

    model: Annotated[str, Meta(min_length=1)]
    input: Prompt
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: Annotated[int, Meta(ge=1)] | None = None


Request = ChatRequest | CompletionRequest | EmbeddingRequest

REQUEST_TYPES: dict[Op, type[ChatRequest] | type[CompletionRequest] | type[EmbeddingRequest]] = {
    Op.CHAT: ChatRequest,
    Op.COMPLETIONS: CompletionRequest,
    Op.EMBEDDINGS: EmbeddingRequest,
}


def validate_call(op: Op, raw: dict[str, Any]) -> Call:
    """Validate a client's JSON object for ``op``, whichever front end it came through.
    Raises :class:`~sidecar.errors.InvalidRequest` naming the offending field."""
    try:
        request = msgspec.convert(raw, REQUEST_TYPES[op])
    except msgspec.ValidationError as e:
        message, _, path = str(e).partition(" - at `$.")
        param = path.rstrip("`") or None
        raise InvalidRequest(
            f"Invalid request: {message}" + (f" at '{param}'." if param else "."), param=param
        ) from None
    return Call(op, request, raw)


class Call(msgspec.Struct, frozen=True):
    """One validated client request: the operation, its typed form, the original object.

    ``token_cap`` is set by the gateway when the client gave no token limit and a budget
    can pay for at most that many completion tokens: providers must send it upstream."""

    op: Op
    request: Request
    raw: dict[str, Any]
    token_cap: int | None = None

    @property
    def stream(self) -> bool:
        return not isinstance(self.request, EmbeddingRequest) and self.request.stream


# --- responses ------------------------------------------------------------------------------
# Fields that OpenAI leaves out when empty are UNSET (never encoded); the rest always are.


class PromptTokensDetails(msgspec.Struct, omit_defaults=True):
    cached_tokens: int = 0


class Usage(msgspec.Struct, omit_defaults=True):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None

    @property
    def cached_tokens(self) -> int:
        d = self.prompt_tokens_details
        return d.cached_tokens if d is not None else 0


class Meter:
    """What a provider call measured, for spend and limits; filled in by the provider as
    it goes, so it is accurate however the call ends (finished, failed, cancelled)."""

    __slots__ = ("content_chars", "content_chunks", "limited_for_s", "usage")

    def __init__(self) -> None:
        self.usage: Usage | None = None
        """The usage the provider reported, if it did."""
        self.content_chunks = 0
        """Stream chunks that carried content (about one token each)."""
        self.content_chars = 0
        self.limited_for_s: float | None = None
        """The provider said its rate limit is used up for this many seconds."""

    def completion_estimate(self) -> int:
        """Completion tokens when the provider reported none: the larger of the chunks
        relayed and a quarter of the characters."""
        return max(self.content_chunks, -(-self.content_chars // 4))


class ResponseMessage(msgspec.Struct):
    role: str = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] | UnsetType = UNSET


class Choice(msgspec.Struct):
    index: int
    message: ResponseMessage
    finish_reason: str | None = None


class ChatCompletion(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[Choice]
    usage: Usage | None = None
    object: str = "chat.completion"


class ToolCallDelta(msgspec.Struct, omit_defaults=True):
    index: int
    id: str | None = None
    type: str | None = None
    function: dict[str, str] | None = None


class Delta(msgspec.Struct, omit_defaults=True):
    role: str | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChunkChoice(msgspec.Struct):
    index: int
    delta: Delta
    finish_reason: str | None = None


class ChatChunk(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | UnsetType | None = UNSET
    """OpenAI sends ``"usage": null`` on every chunk but the last when usage is asked for."""
    object: str = "chat.completion.chunk"


class BodyShape(msgspec.Struct):
    """What every OpenAI-format answer must have; used to reject garbage cheaply.

    ``choices`` for chat and completions, ``data`` for embeddings. Unknown fields are
    ignored, so decoding into this costs little more than scanning the bytes.
    """

    choices: list[Any] | None = None
    data: list[Any] | None = None
    usage: Usage | None = None
    error: Any = None
