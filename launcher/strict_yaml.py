"""A YAML reader that refuses the traps PyYAML falls into.

PyYAML implements YAML 1.1: it keeps the last of two duplicate keys, reads `no`/`off`/`yes` as
booleans and reads `3e-4` as a *string* (its float pattern needs a dot). A training config read that
way fails an hour later, or never. This loader follows the YAML 1.2 core schema instead:

- duplicate keys in one mapping are an error naming the key and both lines;
- only `true`/`false` are booleans (`yes`, `no`, `on`, `off` stay strings, so a bool field refuses them);
- `3e-4`, `1e5`, `.5` are floats; `0x1F`-style and sexagesimal integers are not special.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from ..typed import ConfigError


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 core-schema scalars and duplicate-key detection."""


# Drop YAML 1.1 implicit resolvers for bool/int/float and install 1.2 core-schema ones.
_Loader.yaml_implicit_resolvers = {
    key: [(tag, rx) for tag, rx in resolvers if tag not in (
        "tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int", re.compile(r"^[-+]?[0-9]+$"), list("-+0123456789"))
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
               r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def _construct_int(loader: yaml.SafeLoader, node: yaml.Node) -> int:
    return int(loader.construct_scalar(node))


def _construct_float(loader: yaml.SafeLoader, node: yaml.Node) -> float:
    text = str(loader.construct_scalar(node)).lower()
    if text.endswith("inf"):
        return float("-inf") if text.startswith("-") else float("inf")
    if text.endswith("nan"):
        return float("nan")
    return float(text)


_MERGE_TAG = "tag:yaml.org,2002:merge"


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict:
    """Mapping construction; duplicates were already refused by `_check_duplicates`. Merge keys
    (`<<: *base`) are allowed: keys written in the mapping override merged ones (YAML's merge rule)."""
    for key_node, _ in node.value:
        if key_node.tag != _MERGE_TAG and not isinstance(key_node, yaml.ScalarNode):
            line = key_node.start_mark.line + 1
            raise ConfigError("", f"line {line}: mapping keys must be scalars, not a {key_node.id}")
    loader.flatten_mapping(node)
    return {loader.construct_object(k): loader.construct_object(v) for k, v in node.value}


def _check_duplicates(node: yaml.Node, path: str, done: set[int], ancestors: frozenset[int] = frozenset()) -> None:
    """Refuse a key written twice in one mapping, naming its dotted path and both lines (only keys
    written in the mapping count; keys brought in by a merge `<<` may be overridden), and refuse an
    alias that contains itself (a recursive structure no config field can hold)."""
    if id(node) in ancestors:
        raise ConfigError(path, f"line {node.start_mark.line + 1}: recursive alias (a value that contains itself)")
    if id(node) in done:  # an alias of a node already checked
        return
    done.add(id(node))
    ancestors = ancestors | {id(node)}
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_duplicates(item, f"{path}[{i}]", done, ancestors)
    elif isinstance(node, yaml.MappingNode):
        lines: dict[str, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                _check_duplicates(value_node, path, done, ancestors)
                continue
            key = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else f"<{key_node.id}>"
            sub = f"{path}.{key}" if path else key
            line = key_node.start_mark.line + 1
            if key in lines:
                raise ConfigError(sub, f"duplicate key (lines {lines[key]} and {line}); YAML would "
                                  "silently keep the last one. Remove one of them.")
            lines[key] = line
            _check_duplicates(value_node, sub, done, ancestors)


_Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)
_Loader.add_constructor("tag:yaml.org,2002:float", _construct_float)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml(text: str, source: str = "<config>") -> Any:
    """Parse YAML text strictly; syntax errors become ConfigError naming the source and line."""
    loader = _Loader(text)
    loader.name = source  # error marks name the file, not "<unicode string>"
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_duplicates(node, "", set())
        return loader.construct_document(node)
    except ConfigError:
        raise
    except yaml.YAMLError as exc:
        raise ConfigError("", f"{source} is not valid YAML: {exc}") from None
    finally:
        loader.dispose()


def parse_scalar(text: str) -> Any:
    """Parse one `--set key=value` value with the same rules as a YAML scalar. Text that is not valid
    YAML on its own (e.g. a layer pattern `*-|*-`, which YAML reads as an alias) stays a string; the
    typed conversion then decides whether a string is allowed there."""
    if not text.strip():
        return ""
    try:
        return load_yaml(text, "--set value")
    except ConfigError as exc:
        if exc.path:  # a duplicate key inside an inline mapping: a real error
            raise
        return text
