"""A YAML reader that refuses the traps PyYAML falls into.

PyYAML implements YAML 1.1: it keeps the last of two duplicate keys, reads `no`/`off`/`yes` as
booleans and reads `3e-4` as a *string* (its float pattern needs a dot). A training config read that
way fails an hour later, or never. This loader follows the YAML 1.2 core schema instead:

- duplicate keys in one mapping are an error naming the key and both lines;
- only `true`/`false` are booleans (`yes`, `no`, `on`, `off` stay strings, so a bool field refuses them);
- `3e-4`, `1e5`, `.5` are floats; `0x1F`-style and sexagesimal integers are not special;
- size limits hold before anything is expanded: the text (MAX_DOCUMENT_BYTES), the nesting depth
  (MAX_DEPTH, checked while composing, so 800 nested brackets are a ConfigError, not RecursionError),
  the number of aliases (MAX_ALIASES) and the size the aliases would expand to (MAX_EXPANDED_NODES,
  counted on the node graph, each shared node once: a "billion laughs" document is refused at once).
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from ..typed import ConfigError

MAX_DOCUMENT_BYTES = 1 << 20
MAX_DEPTH = 64
MAX_ALIASES = 256
MAX_EXPANDED_NODES = 100_000


class YamlLimitError(ConfigError):
    """A document over one of the size limits: refused even where a malformed `--set` value would
    otherwise be kept as plain text."""


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 core-schema scalars, duplicate-key detection and depth/alias limits."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0
        self._aliases = 0

    def compose_node(self, parent, index):
        line = self.peek_event().start_mark.line + 1
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                raise YamlLimitError("", f"{self.name} line {line}: more than {MAX_ALIASES} aliases (*name); "
                                     "write the values out or use fewer aliases")
            return super().compose_node(parent, index)
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise YamlLimitError("", f"{self.name} line {line}: nested deeper than {MAX_DEPTH} levels; "
                                 "no config field needs more, flatten the value")
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


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
    text = loader.construct_scalar(node)
    try:
        return int(text)
    except ValueError:  # more digits than Python converts (sys.get_int_max_str_digits)
        raise ConfigError("", f"line {node.start_mark.line + 1}: got an integer of {len(text)} digits; "
                          "use a number of at most 4300 digits") from None


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


def _expanded_sizes(node: yaml.Node, memo: dict[int, int]) -> int:
    """Nodes in `node` once every alias is expanded; each distinct node is counted once (memo), so a
    document of a few aliases that would expand to billions of values costs microseconds."""
    if id(node) not in memo:
        memo[id(node)] = 1 + sum(_expanded_sizes(child, memo) for child in _children(node))
    return memo[id(node)]


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _check_expansion(node: yaml.Node, source: str) -> None:
    """Refuse a document whose aliases expand past MAX_EXPANDED_NODES, naming the outermost field
    path below which no single part is that large (e.g. `train.steps[6]`)."""
    memo: dict[int, int] = {}
    total = _expanded_sizes(node, memo)
    if total <= MAX_EXPANDED_NODES:
        return
    path = ""
    while True:
        if isinstance(node, yaml.MappingNode):
            big = [(f"{path}.{k.value}" if path else str(k.value), v) for k, v in node.value
                   if isinstance(k, yaml.ScalarNode) and memo[id(v)] > MAX_EXPANDED_NODES]
        elif isinstance(node, yaml.SequenceNode):
            big = [(f"{path}[{i}]", v) for i, v in enumerate(node.value) if memo[id(v)] > MAX_EXPANDED_NODES]
        else:
            big = []
        if not big:
            break
        path, node = big[0]
    raise YamlLimitError(path, f"{source}: holds {memo[id(node)]} values once its aliases are expanded, over the "
                         f"limit of {MAX_EXPANDED_NODES} (MAX_EXPANDED_NODES); no config field needs that many: "
                         "check the value, and write it without nested aliases")


_Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)
_Loader.add_constructor("tag:yaml.org,2002:float", _construct_float)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml(text: str, source: str = "<config>") -> Any:
    """Parse YAML text strictly; syntax errors become ConfigError naming the source and line."""
    if len(text) > MAX_DOCUMENT_BYTES or len(text.encode("utf-8", "surrogatepass")) > MAX_DOCUMENT_BYTES:
        raise YamlLimitError("", f"{source} is over {MAX_DOCUMENT_BYTES} bytes (MAX_DOCUMENT_BYTES); "
                             "a job config is a few kilobytes: check that this is the right file")
    loader = _Loader(text)
    loader.name = source  # error marks name the file, not "<unicode string>"
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_duplicates(node, "", set())
        _check_expansion(node, source)
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
        if exc.path or isinstance(exc, YamlLimitError):  # a duplicate key, a size limit: real errors
            raise
        return text
