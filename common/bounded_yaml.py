"""YAML read with bounds: every YAML the project reads (configs, `key=value` overrides) goes through here.

yaml.safe_load builds what it is given. An anchor bomb (aliases of aliases, each line nine times the
one before) is a few hundred bytes that the config code then copies into gigabytes; a deeply nested
`[[[[...` ends in RecursionError. Here a file is at most MAX_BYTES, nested at most MAX_DEPTH deep, and
its document at most MAX_NODES nodes counting each alias as the nodes it repeats (a recursive alias
is refused too): checked after composing, before anything is built. A config is a few hundred nodes.
Each refusal, like invalid YAML, is one UserError line naming the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from common.cli import UserError

MAX_BYTES = 1 << 20
MAX_DEPTH = 64
MAX_NODES = 100_000


class YamlTooLarge(yaml.YAMLError):
    pass


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def expanded_size(root: yaml.Node) -> int:
    """The nodes of `root` with every alias expanded (without expanding it): a walk of the node graph
    that sizes each node once. YamlTooLarge past MAX_NODES or on a recursive alias."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()  # on the path from the root: meeting one again is a cycle
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            open_nodes.discard(key)
            sizes[key] = 1 + sum(sizes[id(child)] for child in _children(node))
            if sizes[key] > MAX_NODES:
                raise YamlTooLarge(f"its aliases expand to more than {MAX_NODES} values (an anchor bomb?)")
        elif key not in sizes:
            if key in open_nodes:
                raise YamlTooLarge("an alias refers to a node that contains it (a recursive alias)")
            open_nodes.add(key)
            stack.append((node, True))
            stack.extend((child, False) for child in _children(node))
    return sizes[id(root)]


class BoundedLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses nesting past MAX_DEPTH and documents past MAX_NODES."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self.depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise YamlTooLarge(f"nested more than {MAX_DEPTH} levels deep")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def compose_document(self) -> Any:
        node = super().compose_document()
        if node is not None:
            expanded_size(node)
        return node


def parse_yaml(text: str, where: str) -> Any:
    """The value of a YAML text, bounded; invalid or too large: one UserError line naming `where`."""
    try:
        return yaml.load(text, Loader=BoundedLoader)  # noqa: S506 (a SafeLoader)
    except YamlTooLarge as err:
        raise UserError(f"{where}: refused: {err}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"{where}: invalid YAML{at}") from None


def read_yaml(path: Path | str, what: str = "YAML") -> Any:
    """A YAML file's value, bounded (see the module); one UserError line naming the file otherwise.
    `what` names the kind of file in those lines ("config")."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {what} file not found")
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise UserError(f"{path}: refused: {size} bytes, more than the {MAX_BYTES} a {what} file may have")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text file (a {what} file is UTF-8 YAML)") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read it ({err.strerror or err})") from None
    return parse_yaml(text, str(path))
