"""Strict conversion of plain dicts (from YAML) into typed, frozen dataclasses, and ConfigError.

This module sits below every subpackage (launcher, parallelism, ...), so any layer may refuse a config
with a dotted field path without importing a layer above it.

Every error is a ConfigError naming the dotted field path, the bad value and what is allowed.
Validation never uses `assert`, so it also holds under `python -O`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Any, Literal, Union



MESSAGE_MAX = 1000  # a message quoting a huge value (a 1 MB string) keeps its head and its fix


class ConfigError(ValueError):
    """A config that cannot be run. `path` is the dotted field path ('' for the whole document)."""

    def __init__(self, path: str, message: str):
        if len(message) > MESSAGE_MAX:
            keep = MESSAGE_MAX // 2 - 50
            message = f"{message[:keep]} ... ({len(message)} chars) ... {message[-keep:]}"
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}" if path else message)


EXCERPT_MAX = 200
INT_MAX = 2**53  # exact in float64 and JSON, far inside int64: no field needs more


def excerpt(value: Any, limit: int = EXCERPT_MAX) -> str:
    """`repr(value)` cut to about `limit` characters, with its full length: `[1, 2, ... (5000 chars)`.

    Never builds the whole repr: a YAML value whose aliases expand to billions of items, or a huge
    string, costs time proportional to its distinct parts and the limit, not to its expanded size."""
    parts: list[str] = []
    budget = [limit]

    def emit(text: str) -> bool:
        parts.append(text[: max(budget[0], 0)])
        budget[0] -= len(text)
        return budget[0] > 0

    def walk(v: Any, depth: int) -> bool:
        if depth > 64 or not isinstance(v, (list, tuple, dict)):
            return emit("..." if depth > 64 else _scalar_repr(v, budget[0] + 1))
        items = list(v.items()) if isinstance(v, dict) else v
        brackets = {dict: "{}", tuple: "()" if len(v) != 1 else "(,)"}.get(type(v), "[]")
        if not emit(brackets[0]):
            return False
        for i, item in enumerate(items):
            if i and not emit(", "):
                return False
            if isinstance(v, dict):
                if not (walk(item[0], depth + 1) and emit(": ") and walk(item[1], depth + 1)):
                    return False
            elif not walk(item, depth + 1):
                return False
        return emit(brackets[1:])

    if walk(value, 0):
        return "".join(parts)
    return f"{''.join(parts)} ... ({_repr_len(value, {}, 0)} chars)"


def _scalar_repr(v: Any, limit: int) -> str:
    if isinstance(v, str) and len(v) > limit:
        return repr(v[:limit])[:-1]  # the open string, cut
    if isinstance(v, int) and not isinstance(v, bool) and v.bit_length() > 4 * limit:
        return f"<integer of about {int(v.bit_length() * 0.30103)} digits>"
    return repr(v)


def _repr_len(v: Any, memo: dict[int, int], depth: int) -> int:
    """Length of repr(v), each shared (aliased) container measured once."""
    if not isinstance(v, (list, tuple, dict)):
        if isinstance(v, int) and not isinstance(v, bool) and v.bit_length() > 14000:
            return int(v.bit_length() * 0.30103) + 1  # about: str() refuses ints over 4300 digits
        return len(v) + 2 if isinstance(v, str) else len(repr(v))
    if id(v) in memo or depth > 64:
        return memo.get(id(v), 3)
    items = [x for kv in v.items() for x in kv] if isinstance(v, dict) else list(v)
    sep = 2 * max(len(v) - 1, 0) + (2 * len(v) if isinstance(v, dict) else 0) + (type(v) is tuple and len(v) == 1)
    memo[id(v)] = 2 + sep + sum(_repr_len(x, memo, depth + 1) for x in items)
    return memo[id(v)]


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "mapping"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def convert(tp: Any, value: Any, path: str) -> Any:
    """Return `value` converted to type `tp`, or raise ConfigError naming `path`."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value in allowed and type(value) is type(allowed[0]):
            return value
        raise ConfigError(path, f"got {excerpt(value)}; allowed: {', '.join(repr(a) for a in allowed)}")
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1 and value is not None:  # `X | None`: X's own error, with its nested field path
            return convert(options[0], value, path)
        errors = []
        for arg in options:
            try:
                return convert(arg, value, path)
            except ConfigError as exc:
                errors.append(exc.message)
        raise ConfigError(path, f"got {excerpt(value)}; expected {_type_name(tp)}")
    if dataclasses.is_dataclass(tp):
        return build(tp, value, path)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(path, f"got {excerpt(value)}; expected a list")
        (item_tp,) = typing.get_args(tp)
        return tuple(convert(item_tp, v, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(path, f"got {excerpt(value)}; expected a mapping")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(path, f"got {excerpt(value)}; expected true or false (YAML 'yes'/'no' are not booleans here)")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if abs(value) > INT_MAX:
                raise ConfigError(path, f"got {excerpt(value)}; integers in a config are at most 2**53 "
                                  f"({INT_MAX}): use a value in the field's range")
            return value
        raise ConfigError(path, f"got {excerpt(value)} ({type(value).__name__}); expected an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(path, f"got {excerpt(value)}; expected a finite number")
            return float(value)
        hint = " (quoted numbers are strings: write 3e-4, not '3e-4')" if isinstance(value, str) else ""
        raise ConfigError(path, f"got {excerpt(value)} ({type(value).__name__}); expected a number{hint}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(path, f"got {excerpt(value)} ({type(value).__name__}); expected a string")
    raise TypeError(f"unsupported config type {tp!r} at {path}")


def build(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass `cls` from mapping `data`: unknown keys, missing required keys and wrong types
    are errors. Then the dataclass's own `validate(path)` method (if any) checks value ranges."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(path, f"got {excerpt(data)}; expected a mapping with keys {sorted(_field_names(cls))}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in data if k not in fields)
    if unknown:
        where = path or "config"
        close = difflib.get_close_matches(unknown[0], list(fields), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(_join(path, unknown[0]),
                          f"unknown key in {where}{hint}; allowed keys: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, field in fields.items():
        sub = _join(path, name)
        if name in data:
            kwargs[name] = convert(hints[name], data[name], sub)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            doc = _field_doc(cls, name)
            raise ConfigError(sub, f"required but missing; expected {_type_name(hints[name])}"
                              + (f" ({doc})" if doc else ""))
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate(path)
    return obj


def field_defaults(cls: type) -> dict[str, Any]:
    """The defaults of a config dataclass's fields (those without one left out): what a stand-in config
    built in code (benchmarks, GPU test programs) starts from, so it carries every field the real one has."""
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


def to_dict(obj: Any) -> Any:
    """Plain-data form of a config dataclass (tuples become lists), for YAML/JSON records."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def _field_doc(cls: type, name: str) -> str:
    """First line of a field's docstring (the string literal under it in the class body), if any."""
    import ast
    import inspect

    try:
        tree = ast.parse(inspect.getsource(cls))
    except (OSError, TypeError, SyntaxError):
        return ""
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == name
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            return nxt.value.value.strip().splitlines()[0]
    return ""


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def check(cond: bool, path: str, message: str) -> None:
    """Range check used by `validate` methods (not `assert`, so `python -O` keeps it)."""
    if not cond:
        raise ConfigError(path, message)
