"""HL7 v2 segments as trees while they are written: field -> repetition -> component ->
subcomponent, numbered from 1, serialised with the message's separators at the end."""

from __future__ import annotations

from collections.abc import Callable

Tree = dict[int, "Tree | str"]
Node = Tree | str
# (positions from the table's root, e.g. (5, rep, 1, 1) in a segment, (4, 2) in a CX)
Position = tuple[int, ...]


def put(tree: Tree, position: Position, value: Node) -> bool:
    """Write at a position; False when a different value is already there.

    A value that extends the one present (a DTM with more precision) replaces it.
    """
    node = tree
    for step in position[:-1]:
        child = node.get(step)
        if child is None:
            child = node[step] = {}
        elif isinstance(child, str):
            child = node[step] = {1: child}
        node = child
    last = position[-1]
    present = node.get(last)
    if present is None or present == {}:
        node[last] = value
        return True
    if isinstance(present, str) and isinstance(value, str):
        if present == value:
            return True
        if value.startswith(present):
            node[last] = value
            return True
        return False
    if isinstance(present, str):
        present = node[last] = {1: present}
    if isinstance(value, str):
        value = {1: value}
    assert isinstance(present, dict)
    return merge(present, value)


def merge(into: Tree, other: Tree) -> bool:
    """Write every value of `other` into `into`; False when one differs from what is there."""
    ok = True
    for key, item in other.items():
        ok = put(into, (key,), item) and ok
    return ok


def read(tree: Tree, position: Position) -> str:
    """The text at a position (the first part when the position holds a composite)."""
    node: Node | None = tree
    for step in position:
        if isinstance(node, str):
            return node if step == 1 else ""
        if node is None:
            return ""
        node = node.get(step)
    while isinstance(node, dict):
        node = node.get(1)
    return node or ""


def copy_tree(tree: Tree) -> Tree:
    return {k: (copy_tree(v) if isinstance(v, dict) else v) for k, v in tree.items()}


def serialise(node: Node, separators: str, escape: Callable[[str], str]) -> str:
    """A node as wire text, one separator per level (escaping every value)."""
    if isinstance(node, str):
        return escape(node)
    if not node:
        return ""
    if not separators:
        first = node.get(1)
        return serialise(first, "", escape) if first is not None else ""
    top = max(node)
    parts = [serialise(node[i], separators[1:], escape) if i in node else ""
             for i in range(1, top + 1)]
    return separators[0].join(parts).rstrip(separators[0])
