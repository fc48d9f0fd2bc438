"""Pure cuts of text for the engine: prompt slices to tokenize, and generated text against
stop sequences. No state, no I/O."""

from __future__ import annotations

__all__ = ["cut", "cut_at_stop", "held_back"]


def cut(text: str, n: int) -> tuple[str, str]:
    """``text`` cut into a head of at most ``n`` characters (``n`` >= 1) and the rest; the
    cut goes before whitespace in the head's second half when there is some."""
    if len(text) <= n:
        return text, ""
    n = max(n, 1)
    at = max(text.rfind(" ", n // 2, n), text.rfind("\n", n // 2, n))
    at = at if at > 0 else n
    return text[:at], text[at:]


def cut_at_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """The text before the earliest stop sequence, and whether one was found."""
    at = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    return (text[:at], True) if at >= 0 else (text, False)


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters could still grow into a stop sequence."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best
