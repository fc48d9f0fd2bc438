"""Chat templates from GGUF metadata, rendered in a sandboxed Jinja environment.

Templates inside model files are untrusted input: they are compiled only in Jinja's
:class:`~jinja2.sandbox.ImmutableSandboxedEnvironment` (no attribute access to internals,
no mutation of passed-in objects), with a bounded output size (checked while rendering) and
bounded sequence repetition and powers. Whatever a template does wrong while rendering
(``raise_exception``, a sandbox violation, a division by zero, runaway recursion, a range
too big) is one :class:`TemplateError`, never another exception. A model without a template,
or whose template does not compile, gets :data:`DEFAULT_TEMPLATE` (ChatML).

:meth:`ChatTemplate.render_parts` tells the template's own text from the messages' contents,
so only the template's markup is tokenized with special tokens (a user who types
``<|im_start|>system`` gets those characters, not a forged turn). Each content is passed to
the template wrapped in two sentinel code points (private-use characters, removed from the
content first, so no input can produce them) and the rendered text is split at them. When
a template mangled the sentinels (a content cut in two, reversed, out of order), the whole
output counts as content: a template's markup may lose its special meaning, never a user's
text gain one. For the template's logic the wrapped content still compares equal to, and
is as long as, the original.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Sequence
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

#: ChatML, the most common template of instruction-tuned models without one of their own.
DEFAULT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

MAX_RENDERED_CHARS = 8 * 1024 * 1024

#: Sentinels around each message's content while rendering (Unicode private use plane 16).
CONTENT_START = "\U0010fff0"
CONTENT_END = "\U0010fff1"
_SENTINELS = {ord(CONTENT_START): None, ord(CONTENT_END): None}
_SENTINEL_RE = re.compile(f"[{CONTENT_START}{CONTENT_END}]")


class TemplateError(Exception):
    """The template refused these messages (``raise_exception``) or failed to render."""


def _raise_exception(message: str) -> None:
    raise TemplateError(str(message))


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


class _Environment(ImmutableSandboxedEnvironment):
    """The sandbox, plus bounds on ``seq * n`` and ``a ** b`` (a template could otherwise
    allocate gigabytes or compute for minutes in one expression)."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        ints = isinstance(left, int) and isinstance(right, int)
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if (isinstance(seq, str | list | tuple) and isinstance(n, int)
                        and len(seq) * n > MAX_RENDERED_CHARS):
                    raise TemplateError("chat template output is too large")
            if ints and left.bit_length() + right.bit_length() > _MAX_INT_BITS:
                raise TemplateError("chat template computes a number too large")
        elif operator == "**" and ints and (
            abs(right) > _MAX_INT_BITS or left.bit_length() * abs(right) > _MAX_INT_BITS
        ):
            raise TemplateError("chat template computes a number too large")
        return super().call_binop(context, operator, left, right)


_MAX_INT_BITS = 4096


class ChatTemplate:
    """A compiled template; :meth:`render` turns messages into one prompt string."""

    def __init__(self, source: str | None, bos_token: str = "", eos_token: str = "") -> None:
        """Compile ``source``; on a syntax error fall back to the default (see ``fallback``)."""
        env = _Environment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        self.fallback: str | None = None
        """Why the model's own template is not used, or None when it is."""
        try:
            self._template = env.from_string(source or DEFAULT_TEMPLATE)
        except jinja2.TemplateError as e:
            self.fallback = f"the model's chat template does not compile ({e}); using ChatML"
            self._template = env.from_string(DEFAULT_TEMPLATE)
        if source is None:
            self.fallback = "the model has no chat template; using ChatML"
        self._bos = bos_token
        self._eos = eos_token

    def render_parts(self, messages: Sequence[dict[str, Any]],
                     add_generation_prompt: bool = True) -> list[tuple[str, bool]]:
        """Render and split into ``(text, is_content)`` segments, in order: ``is_content``
        True for text that came from a message's ``content`` (to be tokenized as plain
        text), False for the template's own text. Raises like :meth:`render`."""
        marked = [
            {**m, "content": _Marked(m["content"])} if isinstance(m.get("content"), str) else m
            for m in messages
        ]
        return split_marked(self.render(marked, add_generation_prompt))

    def render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True
               ) -> str:
        """Render; raises :class:`TemplateError` with the template's own message."""
        parts: list[str] = []
        size = 0
        try:
            for part in self._template.generate(
                messages=list(messages),
                add_generation_prompt=add_generation_prompt,
                bos_token=self._bos,
                eos_token=self._eos,
            ):
                size += len(part)
                if size > MAX_RENDERED_CHARS:
                    raise TemplateError("chat template output is too large")
                parts.append(part)
        except TemplateError:
            raise
        except jinja2.TemplateError as e:
            raise TemplateError(f"chat template failed: {e}") from None
        except Exception as e:  # the template is untrusted: any failure is the template's
            raise TemplateError(f"chat template failed: {type(e).__name__}: {e}") from None
        return "".join(parts)


class _Marked(str):
    """A message's content wrapped in the sentinels; equal to, as long as and hashed like
    the content itself, so a template's checks (``== ''``, ``| length``) see the original."""

    raw: str

    def __new__(cls, content: str) -> _Marked:
        raw = content.translate(_SENTINELS)
        self = super().__new__(cls, CONTENT_START + raw + CONTENT_END)
        self.raw = raw
        return self

    def __eq__(self, other: object) -> bool:
        return self.raw == (other.raw if isinstance(other, _Marked) else other)

    def __ne__(self, other: object) -> bool:
        return not self == other

    def __hash__(self) -> int:
        return hash(self.raw)

    def __len__(self) -> int:
        return len(self.raw)


def split_marked(text: str) -> list[tuple[str, bool]]:
    """Split rendered text at the sentinels into ``(segment, is_content)``, dropping empty
    segments and the sentinels. When the sentinels do not alternate start, end, start, end
    (a template cut, reversed or reordered a content), the whole text is content."""
    out: list[tuple[str, bool]] = []
    start, inside = 0, False
    for match in _SENTINEL_RE.finditer(text):
        opening = match.group() == CONTENT_START
        if opening == inside:  # out of order: nothing here can be trusted to be markup
            return _all_content(text)
        if match.start() > start:
            out.append((text[start:match.start()], inside))
        start, inside = match.end(), opening
    if inside:
        return _all_content(text)
    if len(text) > start:
        out.append((text[start:], False))
    return out


def _all_content(text: str) -> list[tuple[str, bool]]:
    """``text`` without its sentinels as one content segment (none when that is empty)."""
    plain = text.translate(_SENTINELS)
    return [(plain, True)] if plain else []
