"""JSON Schema -> GBNF: what is enforced, what is refused with which keyword, and the integer
ranges (checked against every integer of a window, through a regular expression built from
the same alternatives the grammar renders)."""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from local_models import SchemaError, check_schema, schema_grammar
from local_models.integer_grammar import integer_alternatives, integer_bounds, integer_rule


def matcher(low: int, high: int) -> re.Pattern[str]:
    return re.compile("|".join(
        re.escape(sign) + "".join(f"[{a}-{b}]" for a, b in digits)
        for sign, digits in integer_alternatives(low, high)))


@given(st.integers(-10**6, 10**6), st.integers(0, 10**4))
def test_an_integer_range_matches_exactly_its_integers(low: int, span: int) -> None:
    high = low + span
    pattern = matcher(low, high)
    window = [*range(low - 30, low + 30), *range(high - 30, high + 30)]
    for n in window:
        assert bool(pattern.fullmatch(str(n))) == (low <= n <= high), n
    for text in ("-0", "00", "01", "-01", "", "+1"):
        assert not pattern.fullmatch(text)


@given(st.integers(-10**30, 10**30), st.integers(0, 10**30), st.lists(st.integers(), max_size=20))
def test_wide_integer_ranges_hold_at_their_edges(low: int, span: int, probes: list[int]) -> None:
    high = low + span
    pattern = matcher(low, high)
    for n in (low - 1, low, high, high + 1, *(low + p for p in probes)):
        assert bool(pattern.fullmatch(str(n))) == (low <= n <= high), n


def test_bounds_become_a_closed_range() -> None:
    assert integer_bounds(1, 10, None, None) == (1, 10)
    assert integer_bounds(None, None, 0, 5) == (1, 4)
    assert integer_bounds(0.5, 2.5, None, None) == (1, 2)
    assert integer_bounds(None, None, 1.5, 3.5) == (2, 3)
    assert integer_bounds(3, None, 5, None) == (6, 10**16 - 1)  # the tighter of each pair
    assert integer_bounds(None, None, None, None) == (-(10**16 - 1), 10**16 - 1)
    assert integer_bounds(10**20, None, None, None) == (10**20, 10**21 - 1)
    for bad in [(3, 2, None, None), (None, None, 2, 3), (10**31, None, None, None),
                (float("inf"), None, None, None), (float("nan"), None, None, None)]:
        with pytest.raises(ValueError):
            integer_bounds(*bad)


def test_the_rule_is_compact_gbnf() -> None:
    assert integer_rule(1, 10) == '[1-9] | "10"'
    assert integer_rule(-5, 5) == '"-" [1-5] | [0-5]'
    assert integer_rule(0, 999) == "[0-9] | [1-9] [0-9] | [1-9] [0-9]{2}"


#: zod's z.number().int() and pydantic's conint, as they reach the gateway.
ZOD_INT = {"type": "integer", "minimum": -9007199254740991, "maximum": 9007199254740991}


@pytest.mark.parametrize("schema", [
    ZOD_INT,
    {"type": "integer", "exclusiveMinimum": 0, "maximum": 120},
    {"type": "object", "properties": {"age": {"type": "integer", "minimum": 0}},
     "required": ["age"], "additionalProperties": False,
     "$schema": "https://json-schema.org/draft/2020-12/schema"},
    {"anyOf": [{"type": "integer", "minimum": 1}, {"type": "null"}]},
])
def test_schemas_with_integer_bounds_convert(schema: dict[str, Any]) -> None:
    grammar = schema_grammar(schema)
    assert "root ::=" in grammar


def test_a_bounded_integer_property_gets_its_own_rule() -> None:
    grammar = schema_grammar({"type": "object", "properties": {
        "n": {"type": "integer", "minimum": 1, "maximum": 10}}, "required": ["n"]})
    assert '([1-9] | "10") space' in grammar


@pytest.mark.parametrize(("schema", "keyword"), [
    ({"type": "number", "minimum": 0}, "minimum"),
    ({"type": "integer", "minimum": "3"}, "minimum"),
    ({"type": "integer", "minimum": True}, "minimum"),
    ({"type": "integer", "minimum": 5, "maximum": 4}, "minimum"),
    ({"type": "integer", "maximum": 10**40}, "maximum"),
    ({"type": ["integer", "null"], "minimum": 0}, "type"),
    ({"type": "integer", "enum": [1, 2], "minimum": 0}, "minimum"),
    ({"type": "integer", "multipleOf": 2}, "multipleOf"),
    ({"type": "string", "pattern": "^a$"}, "pattern"),
    ({"type": "string", "format": "email"}, "format"),
    ({"type": "array", "minItems": 1}, "minItems"),
    ({"type": "string", "maxLength": 10**6}, "maxLength"),
    ({"$ref": "https://example.com/s.json"}, "$ref"),
    ({"type": "decimal"}, "type"),
])
def test_what_cannot_be_enforced_is_refused_naming_the_keyword(
        schema: dict[str, Any], keyword: str) -> None:
    with pytest.raises(SchemaError) as e:
        check_schema(schema)
    assert e.value.keyword == keyword
    assert f"'{keyword}'" in str(e.value)


def test_a_deep_schema_is_refused_before_conversion() -> None:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(1000):
        schema = {"type": "array", "items": schema}
    with pytest.raises(SchemaError, match="nests deeper"):
        schema_grammar(schema)


def test_literals_with_quotes_and_backslashes_are_escaped() -> None:
    grammar = schema_grammar({"enum": ['a"b', "c\\d"]})
    assert r'"\"a\\\"b\""' in grammar and r'"\"c\\\\d\""' in grammar
