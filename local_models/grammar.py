"""JSON Schema -> GBNF for llama.cpp's grammar sampler, with llama-cpp-python's converter.

The converter (``llama_cpp.llama_grammar.SchemaConverter``, a port of llama.cpp's
``json_schema_to_grammar``) is used as it is, with one fix: its string literals do not
escape backslashes, so a property name, ``enum`` or ``const`` value holding ``\\`` or
``"`` would give a grammar that produces a different value or does not compile.

Contract:

* :func:`check_schema` (pure, no llama.cpp) accepts only schemas whose every keyword the
  converter enforces, or that are annotations; anything it would silently ignore (so the
  output could break the schema) raises :class:`SchemaError` naming the keyword and where
  it is. It also bounds what a hostile schema can make the converter build: nesting,
  number of subschemas, repetition counts (expanded into nested rules), enum sizes.
* :func:`schema_grammar` checks, converts and bounds the grammar's size; every failure of
  the converter is a :class:`SchemaError`, never another exception.
* ``$ref`` only inside the schema (``#/...``): nothing is ever fetched.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from local_models.integer_grammar import integer_bounds, integer_rule

__all__ = ["MAX_GRAMMAR_CHARS", "SchemaError", "check_schema", "schema_grammar"]

#: Bounds on one schema.
MAX_DEPTH = 32
MAX_SUBSCHEMAS = 2000
MAX_REPEAT = 1000
"""minItems, maxItems, minLength, maxLength: each unit is a nested rule of the grammar."""
MAX_ENUM = 1000
MAX_GRAMMAR_CHARS = 256 * 1024

TYPES = frozenset({"string", "number", "integer", "boolean", "null", "object", "array"})
FORMATS = frozenset({"date", "time", "date-time", "uuid", "uuid1", "uuid2", "uuid3", "uuid4",
                     "uuid5"})

#: Keywords that change nothing about valid output (annotations, vocabularies).
ANNOTATIONS = frozenset({
    "title", "description", "default", "examples", "example", "$schema", "$id", "$comment",
    "$anchor", "deprecated", "readOnly", "writeOnly", "contentEncoding", "contentMediaType",
    "discriminator",
})

#: Numeric bounds: enforced on ``type: integer`` only (local_models.integer_grammar).
BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")

#: Keywords the converter enforces, each with what may hold subschemas under it.
ENFORCED = frozenset({
    "type", "properties", "required", "additionalProperties", "items", "prefixItems",
    "minItems", "maxItems", "minLength", "maxLength", "enum", "const", "anyOf", "oneOf",
    "allOf", "format", "$ref", "$defs", "definitions", *BOUNDS,
})
# Not "pattern": the converter's regular-expression translation mishandles escapes ("\\d",
# "\\.") and quantifiers after them, giving grammars that do not compile or that allow
# other strings.


class SchemaError(ValueError):
    """A schema local models cannot enforce; ``str()`` names the keyword and where."""

    def __init__(self, message: str, keyword: str | None = None, path: str = "") -> None:
        super().__init__(message)
        self.keyword = keyword
        self.path = path


def _where(path: str) -> str:
    return f" at '{path}'" if path else ""


def _unsupported(keyword: str, path: str, why: str = "") -> SchemaError:
    tail = f" ({why})" if why else ""
    return SchemaError(f"'{keyword}'{_where(path)} is not supported by local models' "
                       f"structured output{tail}", keyword, path)


def check_schema(schema: object) -> None:
    """Raise :class:`SchemaError` unless the converter enforces all of ``schema``."""
    count = [0]
    _check(schema, "", 0, count)


def _check(node: object, path: str, depth: int, count: list[int]) -> None:
    if isinstance(node, bool):
        if node:
            return  # true: anything
        raise SchemaError(f"a 'false' schema{_where(path)} allows nothing", None, path)
    if not isinstance(node, dict):
        raise SchemaError(f"a schema{_where(path)} must be an object", None, path)
    count[0] += 1
    if depth > MAX_DEPTH:
        raise SchemaError(f"the schema nests deeper than {MAX_DEPTH} levels{_where(path)}",
                          None, path)
    if count[0] > MAX_SUBSCHEMAS:
        raise SchemaError(f"the schema has more than {MAX_SUBSCHEMAS} subschemas", None, path)
    for key in node:
        if key not in ENFORCED and key not in ANNOTATIONS:
            raise _unsupported(str(key), path)
    _check_type(node, path)
    _check_keywords(node, path)

    def sub(child: object, where: str) -> None:
        _check(child, where, depth + 1, count)

    for key in ("properties", "$defs", "definitions"):
        value = node.get(key)
        if value is None:
            continue
        if not isinstance(value, dict):
            raise SchemaError(f"'{key}'{_where(path)} must be an object", key, path)
        for name, child in value.items():
            sub(child, f"{path}/{key}/{name}")
    for key in ("anyOf", "oneOf", "allOf", "prefixItems"):
        value = node.get(key)
        if value is None:
            continue
        if not isinstance(value, list) or not value:
            raise SchemaError(f"'{key}'{_where(path)} must be a non-empty array", key, path)
        for i, child in enumerate(value):
            sub(child, f"{path}/{key}/{i}")
    items = node.get("items")
    if isinstance(items, list):
        for i, child in enumerate(items):
            sub(child, f"{path}/items/{i}")
    elif items is not None:
        sub(items, f"{path}/items")
    extra = node.get("additionalProperties")
    if isinstance(extra, dict):
        sub(extra, f"{path}/additionalProperties")


def _check_type(node: dict[str, Any], path: str) -> None:
    kind = node.get("type")
    kinds = kind if isinstance(kind, list) else [kind] if kind is not None else []
    for k in kinds:
        if k not in TYPES:
            raise SchemaError(f"'type'{_where(path)} is {k!r}; JSON Schema's types are "
                              f"{', '.join(sorted(TYPES))}", "type", path)
    if isinstance(kind, list) and (len(kinds) > 1) and any(
            key in node for key in ("properties", "items", "minLength", "maxLength",
                                    "pattern", "format", "enum", "const", *BOUNDS)):
        raise _unsupported("type", path, "a list of types together with constraints")


def _count(node: dict[str, Any], key: str, path: str) -> int | None:
    value = node.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SchemaError(f"'{key}'{_where(path)} must be a non-negative integer", key, path)
    if value > MAX_REPEAT:
        raise SchemaError(f"'{key}'{_where(path)} is {value}; local models' structured output "
                          f"takes at most {MAX_REPEAT}", key, path)
    return value


def _check_keywords(node: dict[str, Any], path: str) -> None:
    kind = node.get("type")
    for lo, hi in (("minItems", "maxItems"), ("minLength", "maxLength")):
        low, high = _count(node, lo, path), _count(node, hi, path)
        if low is not None and high is not None and low > high:
            raise SchemaError(f"'{lo}' is more than '{hi}'{_where(path)}", lo, path)
    if "minItems" in node or "maxItems" in node:
        key = "minItems" if "minItems" in node else "maxItems"
        items = node.get("items")
        fixed = items if isinstance(items, list) else node.get("prefixItems")
        if isinstance(fixed, list):  # a tuple: exactly its length
            if not node.get("minItems", 0) <= len(fixed) <= node.get("maxItems", len(fixed)):
                raise _unsupported(key, path, "a tuple's length is its number of items")
        elif items is None:
            raise _unsupported(key, path, "only together with an 'items' schema")
    if ("minLength" in node or "maxLength" in node) and (
            kind != "string" or "format" in node or "enum" in node):
        key = "minLength" if "minLength" in node else "maxLength"
        raise _unsupported(key, path, "only on a plain type 'string'")
    if "format" in node and node["format"] not in FORMATS:
        raise _unsupported("format", path, f"format {node['format']!r}; supported: "
                           f"{', '.join(sorted(FORMATS))}")
    if any(key in node for key in BOUNDS):
        _bounds(node, path)
    enum = node.get("enum")
    if enum is not None and (not isinstance(enum, list) or not enum or len(enum) > MAX_ENUM):
        raise SchemaError(f"'enum'{_where(path)} must be an array of 1 to {MAX_ENUM} values",
                          "enum", path)
    required = node.get("required")
    if required is not None and not (isinstance(required, list)
                                     and all(isinstance(r, str) for r in required)):
        raise SchemaError(f"'required'{_where(path)} must be an array of names", "required",
                          path)
    extra = node.get("additionalProperties")
    if extra is not None and not isinstance(extra, bool | dict):
        raise SchemaError(f"'additionalProperties'{_where(path)} must be a boolean or a schema",
                          "additionalProperties", path)
    ref = node.get("$ref")
    if ref is not None and not (isinstance(ref, str) and ref.startswith("#/")):
        raise _unsupported("$ref", path, "only references inside the schema, '#/...'")
    for i, part in enumerate(node.get("allOf") or []):
        if isinstance(part, dict) and set(part) - {"properties", "required", "type", "$ref",
                                                   "anyOf", *ANNOTATIONS}:
            extra_keys = sorted(set(part) - {"properties", "required", "type", "$ref",
                                             "anyOf", *ANNOTATIONS})
            raise _unsupported("allOf", f"{path}/allOf/{i}",
                               f"only object parts; this one has {', '.join(extra_keys)}")


def _bounds(node: dict[str, Any], path: str) -> tuple[int, int]:
    """The closed range of an integer schema's bounds; raises :class:`SchemaError`."""
    key = next(k for k in BOUNDS if k in node)
    if node.get("type") != "integer" or "enum" in node or "const" in node:
        raise _unsupported(key, path, "only on a plain type 'integer'")
    values = [node.get(k) for k in BOUNDS]
    for k, value in zip(BOUNDS, values, strict=True):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise SchemaError(f"'{k}'{_where(path)} must be a number", k, path)
    try:
        return integer_bounds(*values)
    except ValueError as e:
        raise SchemaError(f"'{key}'{_where(path)}: {e}", key, path) from None


#: A character inside a JSON string: the converter's own rule lets raw control characters
#: through, which JSON forbids (llama.cpp's C++ converter excludes them too).
JSON_CHAR = (r'[^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F] [0-9a-fA-F] '
             r'[0-9a-fA-F] [0-9a-fA-F])')


@functools.cache
def _converter_class() -> Any:
    from llama_cpp.llama_grammar import (  # the maintained one
        RESERVED_NAMES,
        BuiltinRule,
        SchemaConverter,
    )

    class Converter(SchemaConverter):
        """The converter with three fixes: literals escaped for GBNF (backslash and quote
        included), no raw control characters inside strings, integer bounds enforced."""

        def visit(self, schema: Any, name: str) -> str:
            if isinstance(schema, dict) and any(k in schema for k in BOUNDS):
                low, high = _bounds(schema, "")
                rule_name = name + "-" if name in RESERVED_NAMES else name or "root"
                rule = f"({integer_rule(low, high)}) space"
                return str(self._add_rule(rule_name, rule))  # type: ignore[no-untyped-call]
            return str(super().visit(schema, name))  # type: ignore[no-untyped-call]

        def _format_literal(self, literal: str) -> str:
            escaped = (literal.replace("\\", "\\\\").replace('"', '\\"')
                       .replace("\r", "\\r").replace("\n", "\\n"))
            return f'"{escaped}"'

        def _add_primitive(self, name: str, rule: Any) -> str:
            if name == "char":
                rule = BuiltinRule(JSON_CHAR, [])
            return str(super()._add_primitive(name, rule))

    return Converter


def schema_grammar(schema: dict[str, Any]) -> str:
    """The GBNF grammar (root rule ``root``) of the JSON values ``schema`` allows; raises
    :class:`SchemaError`."""
    check_schema(schema)
    converter = _converter_class()(prop_order={}, allow_fetch=False, dotall=False,
                                   raw_pattern=False)
    try:
        # a copy: the converter resolves references in place
        resolved = converter.resolve_refs(json.loads(json.dumps(schema)), "input")
        converter.visit(resolved, "")
        grammar: str = converter.format_grammar()
    except RecursionError:
        raise SchemaError("the schema's references nest too deeply") from None
    except Exception as e:  # the converter asserts and raises plain errors
        message = str(e).split("\n")[0][:200] or type(e).__name__
        raise SchemaError(f"the schema cannot be turned into a grammar: {message}") from None
    if len(grammar) > MAX_GRAMMAR_CHARS:
        raise SchemaError(f"the schema's grammar is {len(grammar)} characters; local models "
                          f"take at most {MAX_GRAMMAR_CHARS}")
    return grammar
