"""Internal request, response, chunk and usage Structs shared by every front end.

The OpenAI wire format is the gateway's lingua franca: front ends decode client bodies into
the request Structs below (which validate types and values), providers answer with OpenAI
JSON bodies or SSE frames, and the answer Structs (chat completion and chunk, text
completion, embeddings list, error envelope) are those bodies' one declaration: providers
that translate build them, and the places that must look inside a relayed answer (stream
validation, the gRPC front end) decode them.

A :class:`Call` keeps the client's original JSON object next to its validated form, so that
fields the gateway does not model (``tools``, ``response_format``, ``seed``, ``logprobs``,
...) pass through to OpenAI-compatible providers untouched.
"""

from __future__ import annotations

import enum
import math
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


class FunctionCall(msgspec.Struct):
    """Always encoded whole: OpenAI's clients read ``arguments`` even when it is empty."""

    name: str
    arguments: str = ""


class ToolCall(msgspec.Struct):
    """Always encoded with its ``type`` (OpenAI's format has it on every tool call)."""

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
INT32_MAX = 2**31 - 1
MaxTokens = Annotated[int, Meta(ge=1, le=INT32_MAX)]
Seed = Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)]
Penalty = Annotated[float, Meta(ge=-2, le=2)]
TokenId = Annotated[int, Meta(ge=0, le=INT32_MAX)]
ModelName = Annotated[str, Meta(min_length=1, max_length=256, pattern=r"^[!-~]+( [!-~]+)*(?!\n)$")]
"""Printable ASCII, single inner spaces: a model name ends up in headers (``x-sidecar-target``),
gRPC metadata and upstream URLs, where CR, LF, NUL or non-Latin-1 text would break them."""


class ChatRequest(msgspec.Struct, kw_only=True):
    """``POST /v1/chat/completions``. Fields not listed here are kept in ``Call.raw``."""

    model: ModelName
    messages: Annotated[list[Message], Meta(min_length=1)]
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: Annotated[float, Meta(ge=0, le=1)] | None = None
    n: Annotated[int, Meta(ge=1, le=128)] | None = None
    seed: Seed | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    stop: Stop = None
    tools: list[Tool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    user: str | None = None
    metadata: dict[str, Any] | None = None

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


Prompt = str | list[str | TokenId | list[TokenId]]


class CompletionRequest(msgspec.Struct, kw_only=True):
    """``POST /v1/completions`` (legacy text completion)."""

    model: ModelName
    prompt: Prompt
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: Annotated[float, Meta(ge=0, le=1)] | None = None
    n: Annotated[int, Meta(ge=1, le=128)] | None = None
    best_of: Annotated[int, Meta(ge=1, le=128)] | None = None
    seed: Seed | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logprobs: Annotated[int, Meta(ge=0, le=5)] | None = None
    stop: Stop = None


class EmbeddingRequest(msgspec.Struct, kw_only=True):
    """``POST /v1/embeddings``."""

    model: ModelName
    input: Prompt
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: Annotated[int, Meta(ge=1, le=INT32_MAX)] | None = None


Request = ChatRequest | CompletionRequest | EmbeddingRequest

REQUEST_TYPES: dict[Op, type[ChatRequest] | type[CompletionRequest] | type[EmbeddingRequest]] = {
    Op.CHAT: ChatRequest,
    Op.COMPLETIONS: CompletionRequest,
    Op.EMBEDDINGS: EmbeddingRequest,
}


MAX_DEPTH = 64
"""How deeply a request's JSON may nest (objects and arrays). Real requests (a tool's JSON
Schema included) stay far below; deeper ones would only exhaust the recursion limit of a
decoder, encoder or template further on."""
_INT64 = (-(2**63), 2**63 - 1)


def _out_of_bounds(value: Any, depth: int) -> str | None:
    """What is wrong with this one value, ignoring what it contains."""
    if depth > MAX_DEPTH and isinstance(value, dict | list):
        return f"nested deeper than {MAX_DEPTH} levels"
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and not _INT64[0] <= value <= _INT64[1]:
        return "an integer outside the 64-bit range"
    if isinstance(value, float) and not math.isfinite(value):
        return "a number that is not finite"
    return None


def _first_bad(value: Any, depth: int, path: str) -> tuple[str, str] | None:
    """(path, problem) of the first out-of-bounds value under ``value`` (recursive: only
    called once :func:`check_bounds` found one, so the depth is bounded)."""
    problem = _out_of_bounds(value, depth)
    if problem is not None:
        return path, problem
    children: Any = (value.items() if isinstance(value, dict)
                     else enumerate(value) if isinstance(value, list) else ())
    for key, child in children:
        sub = f"{path}[{key}]" if isinstance(key, int) else (f"{path}.{key}" if path else key)
        found = _first_bad(child, depth + 1, sub)
        if found is not None:
            return found
    return None


def check_bounds(raw: Any) -> None:
    """Reject a decoded JSON value that nests deeper than :data:`MAX_DEPTH`, holds an
    integer outside 64 bits or a non-finite number, anywhere (fields the gateway does not
    model too: they reach providers and the local model as they are). Level by level, each
    container's values checked with builtins (a 4 MB array of numbers costs milliseconds,
    not seconds), so any depth is safe. Raises :class:`~sidecar.errors.InvalidRequest`
    naming the path."""
    level: list[Any] = [raw]
    depth = 1
    while level:
        bad = depth > MAX_DEPTH
        below: list[Any] = []
        for container in level:
            if bad:
                break
            values = list(container.values()) if type(container) is dict else container
            kinds = set(map(type, values))
            if int in kinds:
                ints = values if len(kinds) == 1 else [v for v in values if type(v) is int]
                bad = min(ints) < _INT64[0] or max(ints) > _INT64[1]
            if float in kinds and not bad:
                floats = values if len(kinds) == 1 else [v for v in values if type(v) is float]
                bad = not all(map(math.isfinite, floats))
            if list in kinds or dict in kinds:
                below.extend(v for v in values if type(v) is list or type(v) is dict)
        if bad:
            found = _first_bad(raw, 1, "")
            assert found is not None
            path, problem = found
            path = path if len(path) <= 200 else path[:197] + "..."
            where = f" at '{path}'" if path else ""
            raise InvalidRequest(f"Invalid request: {problem}{where}.", param=path or None)
        level = below
        depth += 1


def validate_call(op: Op, raw: dict[str, Any]) -> Call:
    """Validate a client's JSON object for ``op``, whichever front end it came through:
    :func:`check_bounds`, then the request Struct's types and ranges. Raises
    :class:`~sidecar.errors.InvalidRequest` naming the offending field."""
    check_bounds(raw)
    try:
        request = msgspec.convert(raw, REQUEST_TYPES[op])
    except msgspec.ValidationError as e:
        message, _, path = str(e).partition(" - at `$.")
        param = path.rstrip("`") or None
        if param == "model" and "regex" in message:
            message = "a model name is 1 to 256 printable ASCII characters"
        raise InvalidRequest(
            f"Invalid request: {message}" + (f" at '{param}'." if param else "."), param=param
        ) from None
    return Call(op, request, raw)


class Call(msgspec.Struct, frozen=True):
    """One validated client request: the operation, its typed form, the original object.

    ``token_cap`` is set by the gateway when the client gave no token limit and a budget
    can pay for at most that many completion tokens: providers must send it upstream.

    ``messages`` is the client's Anthropic Messages body when the call came in as one
    (``request`` and ``raw`` are then its translation to OpenAI chat): a provider that
    speaks that API sends it as it is (see ``Provider.native_messages``), every other
    provider serves the translation."""

    op: Op
    request: Request
    raw: dict[str, Any]
    token_cap: int | None = None
    messages: dict[str, Any] | None = None

    @property
    def stream(self) -> bool:
        return not isinstance(self.request, EmbeddingRequest) and self.request.stream


# --- usage and metering ---------------------------------------------------------------------


class PromptTokensDetails(msgspec.Struct, omit_defaults=True):
    cached_tokens: int = 0


MAX_USAGE_TOKENS = 10**9
"""More tokens than any one call can use: a usage beyond it is a lie or garbage."""


class Usage(msgspec.Struct, omit_defaults=True):
    """As a provider reported it, unchecked: see :meth:`problem`."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None

    @property
    def cached_tokens(self) -> int:
        d = self.prompt_tokens_details
        return d.cached_tokens if d is not None else 0

    def problem(self) -> str | None:
        """Why this usage cannot be true (a count below 0 or above
        :data:`MAX_USAGE_TOKENS`), or None. Money and token limits trust only usages
        without a problem."""
        counts = {"prompt_tokens": self.prompt_tokens,
                  "completion_tokens": self.completion_tokens,
                  "total_tokens": self.total_tokens,
                  "cached_tokens": self.cached_tokens}
        for name, n in counts.items():
            if not 0 <= n <= MAX_USAGE_TOKENS:
                return f"{name} = {n}"
        return None


class Meter:
    """What a provider call measured, for spend and limits; filled in by the provider as
    it goes, so it is accurate however the call ends (finished, failed, cancelled)."""

    __slots__ = ("content_chars", "content_chunks", "limited_for_s", "usage", "usage_invalid")

    def __init__(self) -> None:
        self.usage: Usage | None = None
        """The usage the provider reported, if it did (only one without a problem)."""
        self.usage_invalid = False
        """The provider answered with an impossible usage (the call failed as
        malformed): what it billed is unknown, so the attempt is charged its reservation."""
        self.content_chunks = 0
        """Stream chunks that carried content (about one token each)."""
        self.content_chars = 0
        self.limited_for_s: float | None = None
        """The provider said its rate limit is used up for this many seconds."""

    def completion_estimate(self) -> int:
        """Completion tokens when the provider reported none: the larger of the chunks
        relayed and a quarter of the characters."""
        return max(self.content_chunks, -(-self.content_chars // 4))


# --- answers --------------------------------------------------------------------------------
# Each OpenAI answer shape is declared once, here, for both directions: providers that
# translate build them (every field set), and the places that read a relayed answer decode
# them (the OpenAI provider's stream validation, the gRPC front end). So a field that a
# provider may leave out or send as null is optional, and a field that only readers need is
# UNSET by default (never encoded): what the gateway builds encodes as it always did.


class ResponseMessage(msgspec.Struct):
    """A chat choice's ``message`` (``refusal`` is required by OpenAI's schema: null)."""

    role: str | None = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] | UnsetType | None = UNSET
    refusal: str | None = None


class TopLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(msgspec.Struct):
    """One token of a chat answer's ``logprobs.content``."""

    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = []


class ChoiceLogprobs(msgspec.Struct):
    """A chat choice's ``logprobs`` (built by the gateway; relayed ones are read as any
    JSON, see :class:`Choice`)."""

    content: list[TokenLogprob] | None = None
    refusal: list[TokenLogprob] | None = None


class Choice(msgspec.Struct):
    """``logprobs`` is required by OpenAI's schema (null when not asked for); read as any
    JSON, so a provider's own shape of it never breaks the relay."""

    index: int = 0
    message: ResponseMessage | None = None
    finish_reason: str | None = None
    logprobs: Any = None


class ChatCompletion(msgspec.Struct):
    """A ``chat.completion``. ``created`` is a number: some providers send floats."""

    id: str | None = None
    created: float | None = None
    model: str | None = None
    choices: list[Choice] | None = None
    usage: Usage | None = None
    object: str | None = "chat.completion"


class FunctionDelta(msgspec.Struct, omit_defaults=True):
    """A tool call's function in a stream chunk: the name once, then argument fragments."""

    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(msgspec.Struct, omit_defaults=True):
    index: int | UnsetType = UNSET
    """Always set by the gateway; some providers leave it out (it is 0 then)."""
    id: str | None = None
    type: str | None = None
    function: FunctionDelta | None = None


class Delta(msgspec.Struct, omit_defaults=True):
    role: str | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None
    refusal: str | None = None
    function_call: FunctionDelta | None = None
    """The legacy form of a tool call, from older servers."""

    @property
    def has_token(self) -> bool:
        """Whether this delta carries generated output (text or a tool call)."""
        return bool(self.content or self.tool_calls or self.function_call)


class ChunkChoice(msgspec.Struct):
    index: int = 0
    delta: Delta | None = None
    finish_reason: str | None = None
    logprobs: Any = None
    """As in :class:`Choice`: null, or this chunk's tokens (a :class:`ChoiceLogprobs`)."""

    @property
    def content_chars(self) -> int:
        d = self.delta
        return len(d.content or "") if d is not None else 0

    @property
    def has_token(self) -> bool:
        """Whether this choice carries output or its end (not just the role preamble)."""
        d = self.delta
        return bool(self.finish_reason or (d is not None and d.has_token))


class ErrorDetail(msgspec.Struct):
    """The inside of OpenAI's error envelope (Anthropic's has ``message`` and ``type`` too).
    The gateway's own errors set every field; upstream ones may set any."""

    message: str | None = None
    type: str | None = None
    code: str | int | None = None
    param: str | None = None


class ErrorEnvelope(msgspec.Struct):
    """OpenAI's error answer ``{"error": {...}}``; some servers send a bare string."""

    error: ErrorDetail | str | None = None


class ChatChunk(msgspec.Struct):
    """A ``chat.completion.chunk``. ``error`` is set only by a stream's error event
    (``data: {"error": {...}}``), which has no other field."""

    id: str | None = None
    created: float | None = None
    model: str | None = None
    choices: list[ChunkChoice] | None = None
    usage: Usage | UnsetType | None = UNSET
    """OpenAI sends ``"usage": null`` on every chunk but the last when usage is asked for."""
    object: str | None = "chat.completion.chunk"
    error: ErrorDetail | str | UnsetType | None = UNSET


class TextChoice(msgspec.Struct):
    """A legacy completion's choice; ``logprobs`` null, or OpenAI's legacy shape (tokens,
    token_logprobs, top_logprobs, text_offset)."""

    index: int = 0
    text: str | None = None
    finish_reason: str | None = None
    logprobs: dict[str, Any] | None = None

    @property
    def content_chars(self) -> int:
        return len(self.text or "")

    @property
    def has_token(self) -> bool:
        return bool(self.finish_reason or self.text)


class TextCompletion(msgspec.Struct):
    """A ``text_completion``: a whole answer, or one stream chunk (``error`` as in
    :class:`ChatChunk`)."""

    id: str | None = None
    created: float | None = None
    model: str | None = None
    choices: list[TextChoice] | None = None
    usage: Usage | UnsetType | None = UNSET
    object: str | None = "text_completion"
    error: ErrorDetail | str | UnsetType | None = UNSET


class Embedding(msgspec.Struct):
    """One vector: a list of floats, or base64 of little-endian float32 when asked."""

    index: int = 0
    embedding: list[float] | str = []
    object: str | None = "embedding"


class EmbeddingList(msgspec.Struct):
    data: list[Embedding] = []
    model: str | None = None
    usage: Usage | None = None
    object: str | None = "list"


class BodyShape(msgspec.Struct):
    """What every OpenAI-format answer must have; used to reject garbage cheaply.

    ``choices`` for chat and completions, ``data`` for embeddings. Unknown fields are
    ignored and the lists' items are not looked into, so decoding into this costs little
    more than scanning the bytes: non-stream answers are relayed as the provider's bytes.
    """

    choices: list[Any] | None = None
    data: list[Any] | None = None
    usage: Usage | None = None
    error: Any = None
