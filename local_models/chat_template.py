"""Chat templates from GGUF metadata, rendered in a sandboxed Jinja environment.

Templates inside model files are untrusted input: they are compiled only in Jinja's
:class:`~jinja2.sandbox.ImmutableSandboxedEnvironment` (no attribute access to internals,
no mutation of passed-in objects) with a bounded output size. A model without a template,
or whose template does not compile, gets :data:`DEFAULT_TEMPLATE` (ChatML).
"""

from __future__ import annotations

import datetime
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


class TemplateError(Exception):
    """The template refused these messages (``raise_exception``) or failed to render."""


def _raise_exception(message: str) -> None:
    raise TemplateError(str(message))


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


class ChatTemplate:
    """A compiled template; :meth:`render` turns messages into one prompt string."""

    def __init__(self, source: str | None, bos_token: str = "", eos_token: str = "") -> None:
        """Compile ``source``; on a syntax error fall back to the default (see ``fallback``)."""
        env = ImmutableSandboxedEnvironment(
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

    def render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True
               ) -> str:
        """Render; raises :class:`TemplateError` with the template's own message."""
        try:
            text = self._template.render(
                messages=list(messages),
                add_generation_prompt=add_generation_prompt,
                bos_token=self._bos,
                eos_token=self._eos,
            )
        except TemplateError:
            raise
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError) as e:
            raise TemplateError(f"chat template failed: {e}") from None
        if len(text) > MAX_RENDERED_CHARS:
            raise TemplateError("chat template output is too large")
        return text
