"""GBNF for the decimal integers of a closed range: JSON Schema's ``minimum`` / ``maximum``
(and the exclusive pair) on ``type: integer``, which llama-cpp-python's converter ignores.

Contract (pure): :func:`integer_alternatives` returns the range's canonical decimal forms
(no leading zeros, no ``-0``) as alternatives, each a sequence of digit ranges, so that a
string is in the range exactly when it matches one alternative; :func:`integer_rule`
renders them as a GBNF expression. :func:`integer_bounds` turns a schema's bounds into
that closed range, with an open side bounded at :data:`OPEN_DIGITS` digits (the converter's
own integers are at most 16 digits).
"""

from __future__ import annotations

import math

__all__ = ["MAX_MAGNITUDE", "OPEN_DIGITS", "integer_alternatives", "integer_bounds",
           "integer_rule"]

OPEN_DIGITS = 16
MAX_MAGNITUDE = 10**30
"""Bounds beyond this are refused: the grammar grows with the number of digits."""

Digits = tuple[int, int]
"""One position of a number: the digits it may hold, low to high inclusive."""


def integer_bounds(minimum: float | None, maximum: float | None,
                   exclusive_minimum: float | None, exclusive_maximum: float | None
                   ) -> tuple[int, int]:
    """The closed integer range the bounds allow; raises ``ValueError`` when it is empty
    or a bound is beyond :data:`MAX_MAGNITUDE` or not finite."""
    for value in (minimum, maximum, exclusive_minimum, exclusive_maximum):
        if value is not None and not (math.isfinite(value) and abs(value) <= MAX_MAGNITUDE):
            raise ValueError(f"a bound of {value} is beyond ±10^30")
    lows = [math.ceil(minimum) if minimum is not None else None,
            math.floor(exclusive_minimum) + 1 if exclusive_minimum is not None else None]
    highs = [math.floor(maximum) if maximum is not None else None,
             math.ceil(exclusive_maximum) - 1 if exclusive_maximum is not None else None]
    low = max((b for b in lows if b is not None), default=None)
    high = min((b for b in highs if b is not None), default=None)
    width = max([OPEN_DIGITS, *(len(str(abs(b))) for b in (low, high) if b is not None)])
    low = -(10**width - 1) if low is None else low
    high = 10**width - 1 if high is None else high
    if low > high:
        raise ValueError("no integer satisfies the bounds")
    return low, high


def integer_alternatives(low: int, high: int) -> list[tuple[str, list[Digits]]]:
    """(sign, digit ranges) alternatives matching exactly the integers in [low, high]."""
    out: list[tuple[str, list[Digits]]] = []
    if low < 0:  # the negatives, by magnitude
        out += [("-", alt) for alt in _naturals(max(1, -high), -low)]
    if high >= 0:
        out += [("", alt) for alt in _naturals(max(0, low), high)]
    return out


def integer_rule(low: int, high: int) -> str:
    """A GBNF expression (no trailing space rule) for the integers in [low, high]."""
    return " | ".join(_render(sign, alt) for sign, alt in integer_alternatives(low, high))


def _naturals(a: int, b: int) -> list[list[Digits]]:
    """Alternatives for the naturals a..b (0 <= a), split by number of digits."""
    if a > b:
        return []
    out: list[list[Digits]] = []
    for length in range(len(str(a)), len(str(b)) + 1):
        first = 0 if length == 1 else 10**(length - 1)
        x, y = max(a, first), min(b, 10**length - 1)
        out += _same_length(str(x), str(y))
    return out


def _same_length(x: str, y: str) -> list[list[Digits]]:
    """Alternatives for the numbers x..y written with the same number of digits."""
    if not x:
        return [[]]
    rest = len(x) - 1
    lo, hi = int(x[0]), int(y[0])
    if lo == hi:
        return [[(lo, lo), *alt] for alt in _same_length(x[1:], y[1:])]
    out: list[list[Digits]] = []
    start, end = lo, hi
    if x[1:] != "0" * rest:  # from x to x[0]99..9
        out += [[(lo, lo), *alt] for alt in _same_length(x[1:], "9" * rest)]
        start = lo + 1
    if y[1:] != "9" * rest:
        end = hi - 1
    if start <= end:  # whole middle decades
        out.append([(start, end), *[(0, 9)] * rest])
    if end < hi:  # from y[0]00..0 to y
        out += [[(hi, hi), *alt] for alt in _same_length("0" * rest, y[1:])]
    return out


def _render(sign: str, alt: list[Digits]) -> str:
    """One alternative as GBNF: fixed digits as one literal, repeated ranges counted."""
    parts = ['"-"'] if sign else []
    i = 0
    while i < len(alt):
        lo, hi = alt[i]
        run = 1
        if lo == hi:
            while i + run < len(alt) and alt[i + run][0] == alt[i + run][1]:
                run += 1
            parts.append('"' + "".join(str(d) for d, _ in alt[i:i + run]) + '"')
        else:
            while i + run < len(alt) and alt[i + run] == (lo, hi):
                run += 1
            parts.append(f"[{lo}-{hi}]" + (f"{{{run}}}" if run > 1 else ""))
        i += run
    return " ".join(parts)
