"""Whether a JSON value matches a JSON Schema, for the cascade's schema check (pure).

:func:`schema_problem` answers with the first problem found (a short text naming the path,
e.g. ``$.age: expected integer``) or None. It checks the keywords structured output uses
(the ones the local grammar enforces, :mod:`local_models.grammar`): ``type`` (one or a
list), ``enum``, ``const``, ``properties``, ``required``, ``additionalProperties`` (false
or a schema), ``items`` (one schema), ``prefixItems``, ``minItems`` / ``maxItems``,
``minLength`` / ``maxLength``, ``minimum`` / ``maximum`` / ``exclusiveMinimum`` /
``exclusiveMaximum``, ``anyOf`` / ``oneOf`` / ``allOf``, and local ``$ref`` to ``#/$defs/...``
or ``#/definitions/...``. Any other keyword is not checked (the value passes it): the check
is there to catch an answer that is plainly wrong (cut off, the wrong shape), not to be a
full validator. Recursion follows the schema, and through a recursive ``$ref`` the value:
past :data:`MAX_DEPTH` levels that is itself a problem.
"""

from __future__ import annotations

from typing import Any

MAX_DEPTH = 64

_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,), "array": (list,), "string": (str,), "boolean": (bool,),
    "null": (type(None),), "number": (int, float), "integer": (int,),
}


def _is(value: Any, kind: str) -> bool:
    if kind == "integer" and isinstance(value, float):
        return value.is_integer()
    if isinstance(value, bool) and kind in ("number", "integer"):
        return False
    types = _TYPES.get(kind)
    return True if types is None else isinstance(value, types)


def schema_problem(value: Any, schema: Any, root: Any = None, path: str = "$",
                   depth: int = 0) -> str | None:
    """The first way ``value`` fails ``schema`` (see the module's keywords), or None."""
    if depth > MAX_DEPTH:
        return f"{path}: nested deeper than {MAX_DEPTH} levels"
    if schema is True or not isinstance(schema, dict):
        return None if schema is not False else f"{path}: no value is allowed here"
    root = schema if root is None else root
    ref = schema.get("$ref")
    if isinstance(ref, str):
        target = _resolve(root, ref)
        if target is not None:
            return schema_problem(value, target, root, path, depth + 1)
    kinds = schema.get("type")
    if isinstance(kinds, str):
        kinds = [kinds]
    if isinstance(kinds, list) and not any(_is(value, k) for k in kinds if isinstance(k, str)):
        return f"{path}: expected {' or '.join(map(str, kinds))}"
    if "enum" in schema and isinstance(schema["enum"], list) and not any(
            _same(value, e) for e in schema["enum"]):
        return f"{path}: not one of the enum's values"
    if "const" in schema and not _same(value, schema["const"]):
        return f"{path}: not the const value"
    for check in (_object, _array, _string, _number, _combined):
        problem = check(value, schema, root, path, depth)
        if problem is not None:
            return problem
    return None


def _same(a: Any, b: Any) -> bool:
    return (type(a) is type(b) and a == b) or (
        _is(a, "number") and _is(b, "number") and a == b)


def _resolve(root: Any, ref: str) -> Any:
    for prefix in ("#/$defs/", "#/definitions/"):
        if ref.startswith(prefix) and isinstance(root, dict):
            defs = root.get(prefix[2:-1])
            return defs.get(ref[len(prefix):]) if isinstance(defs, dict) else None
    return None


def _object(value: Any, schema: dict[str, Any], root: Any, path: str, depth: int
            ) -> str | None:
    if not isinstance(value, dict):
        return None
    required = schema.get("required")
    for name in required if isinstance(required, list) else ():
        if name not in value:
            return f"{path}: missing required property {name!r}"
    props = schema.get("properties")
    props = props if isinstance(props, dict) else {}
    extra = schema.get("additionalProperties", True)
    for name, item in value.items():
        sub = f"{path}.{name}"
        if name in props:
            problem = schema_problem(item, props[name], root, sub, depth + 1)
        elif extra is False:
            problem = f"{path}: property {name!r} is not allowed"
        else:
            problem = schema_problem(item, extra, root, sub, depth + 1)
        if problem is not None:
            return problem
    return None


def _array(value: Any, schema: dict[str, Any], root: Any, path: str, depth: int
           ) -> str | None:
    if not isinstance(value, list):
        return None
    low, high = schema.get("minItems"), schema.get("maxItems")
    if isinstance(low, int) and len(value) < low:
        return f"{path}: fewer than {low} items"
    if isinstance(high, int) and len(value) > high:
        return f"{path}: more than {high} items"
    prefix = schema.get("prefixItems")
    prefix = prefix if isinstance(prefix, list) else []
    items = schema.get("items", True)
    for i, item in enumerate(value):
        sub = prefix[i] if i < len(prefix) else items
        problem = schema_problem(item, sub, root, f"{path}[{i}]", depth + 1)
        if problem is not None:
            return problem
    return None


def _string(value: Any, schema: dict[str, Any], root: Any, path: str, depth: int
            ) -> str | None:
    if not isinstance(value, str):
        return None
    low, high = schema.get("minLength"), schema.get("maxLength")
    if isinstance(low, int) and len(value) < low:
        return f"{path}: shorter than {low} characters"
    if isinstance(high, int) and len(value) > high:
        return f"{path}: longer than {high} characters"
    return None


def _number(value: Any, schema: dict[str, Any], root: Any, path: str, depth: int
            ) -> str | None:
    if not _is(value, "number"):
        return None
    for key, words in (("minimum", "below"), ("maximum", "above"),
                       ("exclusiveMinimum", "not above"), ("exclusiveMaximum", "not below")):
        bound = schema.get(key)
        if not _is(bound, "number"):
            continue
        fails = {"minimum": value < bound, "maximum": value > bound,
                 "exclusiveMinimum": value <= bound, "exclusiveMaximum": value >= bound}[key]
        if fails:
            return f"{path}: {words} {bound}"
    return None


def _combined(value: Any, schema: dict[str, Any], root: Any, path: str, depth: int
              ) -> str | None:
    for sub in schema.get("allOf") or ():
        problem = schema_problem(value, sub, root, path, depth + 1)
        if problem is not None:
            return problem
    for key in ("anyOf", "oneOf"):
        options = schema.get(key)
        if isinstance(options, list) and options:
            fits = sum(schema_problem(value, o, root, path, depth + 1) is None for o in options)
            if fits == 0 or (key == "oneOf" and fits > 1):
                return f"{path}: matches {fits} of its {key} schemas"
    return None
