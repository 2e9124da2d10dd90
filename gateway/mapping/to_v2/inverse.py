"""One segment or data-type table read backwards, run on a FHIR value: which rows write
where, and, when several rows could write one FHIR element, which one does.

The compiled rows (Writer) are made by the Inverter (inverter.py); this module runs them.
Where several rows could produce one FHIR element the candidates are ranked: a row whose v2
value is already written (nothing new), a template or vocabulary that recognises the value,
constants of the row's group that agree with the FHIR data, fewer invented values, the
template that places more values, an unconditional row, then table order.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from gateway.mapping.tables import FieldMap
from gateway.mapping.to_v2.fhir_paths import Bundle, Json, Step, flatten
from gateway.mapping.to_v2.tree import Node, Position, Tree, copy_tree, merge, put, read


class Inverses(Protocol):
    """Where a row that applies a data-type table finds that table read backwards."""

    def datatype(self, name: str) -> TableInverse: ...


# -- compiled rows -----------------------------------------------------------------------


@dataclass(slots=True)
class Constant:
    """A constant row's value at its path, for deciding which FHIR element is whose."""

    steps: list[Step]  # relative to the instance the group writes
    value: Any
    condition: Callable[[object], bool] | None


@dataclass(slots=True)
class Writer:
    """One reversible row: read FHIR at head/rep/tail, convert, write at `positions`."""

    order: int
    source: str  # the group (rows sharing a source)
    target: str
    field_no: int  # the segment field written (0 in data-type tables)
    max_reps: int  # in segment tables: how many repetitions the field allows
    head: list[Step]  # up to the repetition step (exclusive)
    rep: Step | None  # the first repeating step: its elements are the repetitions
    tail: list[Step]
    convert: Callable[[Any, InverseRun], tuple[Node | None, bool]]  # -> (v2 value, recognised)
    positions: list[Position]  # where the value goes (several for a template)
    pattern: re.Pattern[str] | None  # a template's inverse
    literal: bool  # the template has literal text that recognises values
    condition: Callable[[object], bool] | None
    implied: list[tuple[Position, str]]  # what a plain condition needs written
    constants: list[Constant] = field(default_factory=list)  # the group's, for ranking
    contested: bool = False


@dataclass(slots=True)
class Claim:
    """Groups competing for the elements of one unindexed repeating element."""

    groups: list[str]
    hard: dict[str, list[Constant]]
    soft: dict[str, list[Constant]]
    capacity: dict[str, int]
    # the element's keys a group's rows carry (None: the whole element, through a map)
    covers: dict[str, set[str] | None] = field(default_factory=dict)


class InverseRun:
    """One inversion of one table on one FHIR value: caches of who owns which element."""

    __slots__ = ("bundle", "inverter", "owner", "indexed")

    def __init__(self, bundle: Bundle, inverter: Inverses) -> None:
        self.bundle = bundle
        self.inverter = inverter
        self.owner: dict[int, dict[str, list[Any]]] = {}
        self.indexed: dict[int, dict[int, list[Any]]] = {}


class TableInverse:
    """One table read backwards."""

    def __init__(self, table: FieldMap, inverter: Inverses) -> None:
        self.table = table
        self.inverter = inverter
        self.kind = table.kind
        self.writers: list[Writer] = []
        self.claims: dict[str, Claim] = {}
        # list path -> index -> constants naming it (extension[1] is the one whose url ...)
        self.indexes: dict[str, dict[int, list[Constant]]] = {}
        self.pass1: list[Writer] = []
        self.pass2: list[list[Writer]] = []
        # target -> (its steps, the constants the table writes there), for `recognises`
        self.signature: dict[str, tuple[list[Step], set[Any]]] = {}

    def recognises(self, resource: Json) -> bool:
        """False when the resource holds, where this table writes constants, only values
        none of them is: another table (a room's, not a floor's) made it."""
        for steps, allowed in self.signature.values():
            found = flatten(resource, steps)
            if found and not any(value in allowed for value in found):
                return False
        return True

    # -- running --------------------------------------------------------------------------

    def apply(self, root: Any, bundle: Bundle) -> Tree:
        run = InverseRun(bundle, self.inverter)
        tree: Tree = {}
        for writer in self.pass1:
            for rep, value in self._values(writer, root, run):
                node, _ = writer.convert(value, run)
                if node is None:
                    continue
                self._write(writer, tree, rep, value, node)
        ranked: list[tuple[int, list[tuple[Writer, Node]]]] = []
        for slot in self.pass2:
            by_rep: dict[int, list[tuple[Writer, Any]]] = {}
            for writer in slot:
                for rep, value in self._values(writer, root, run):
                    by_rep.setdefault(rep, []).append((writer, value))
            for rep, candidates in by_rep.items():
                ranked.append((rep, self._rank(tree, rep, candidates, root, run)))
        return self._settle(tree, ranked) if ranked else tree

    def _settle(self, base: Tree, ranked: list[tuple[int, list[tuple[Writer, Node]]]]
                ) -> Tree:
        """Write the best candidate of each contested element, then check every condition
        on the whole result; a row whose condition fails gives way to the next candidate.
        (Conditions may depend on each other: CWE.1 needs CWE.3 valued and CWE.3 CWE.1.)
        Rows of two elements may write one place (OBX-5 from valueQuantity.value for NM and
        from valueQuantity for SN): when the later one holds more values ('>^80' keeps the
        comparator the number alone drops), the earlier one gives way."""
        choice = [0] * len(ranked)
        tree = base
        for _ in range(8):
            tree = copy_tree(base)
            chosen: list[tuple[int, Writer]] = []
            holder: dict[Position, int] = {}  # a single-place row's place -> its element
            richer: set[int] = set()
            for i, (rep, candidates) in enumerate(ranked):
                while choice[i] < len(candidates):
                    writer, node = candidates[choice[i]]
                    saved = copy_tree(tree)
                    if self._write(writer, tree, rep, None, node):
                        # What the condition needs and the row did not write (HD.3 = ISO).
                        for position, text in writer.implied:
                            at = self._at(writer, position, rep)
                            if not read(tree, at):
                                put(tree, at, text)
                        chosen.append((i, writer))
                        if writer.pattern is None and len(writer.positions) == 1:
                            holder.setdefault(self._at(writer, writer.positions[0], rep), i)
                        break
                    tree.clear()
                    tree.update(saved)
                    if writer.pattern is None and len(writer.positions) == 1:
                        at = self._at(writer, writer.positions[0], rep)
                        there = holder.get(at)
                        if there is not None and _leaves(node) > _leaves(_node_at(tree, at)):
                            richer.add(there)
                            break  # this one writes there once the other gives way
                    choice[i] += 1
            failed = [i for i, writer in chosen if writer.condition is not None and
                      not writer.condition((tree, ranked[i][0]))]
            if not failed and not richer:
                return tree
            for i in {*failed, *richer}:
                choice[i] += 1
        return tree

    def _values(self, writer: Writer, root: Any, run: InverseRun) -> list[tuple[int, Any]]:
        """(repetition, FHIR value) pairs for a row."""
        node = self._walk(root, writer.head, run)
        if node is None:
            return []
        if writer.rep is None:
            instances = [node]
        else:
            instances = self._elements(node, writer.rep, writer.source, run)
            if not instances:
                return []
            limit = writer.max_reps if self.kind == "segment" else 1
            instances = instances[:limit]
        out: list[tuple[int, Any]] = []
        for n, instance in enumerate(instances, start=1):
            value = self._walk(instance, writer.tail, run)
            if value is not None and value != "" and value != {}:
                out.append((n, value))
        return out

    def _walk(self, node: Any, steps: list[Step], run: InverseRun) -> Any:
        for step in steps:
            if not isinstance(node, dict):
                return None
            if step.repeats:
                found = self._elements(node, step, "", run)
                node = found[0] if found else None
            else:
                node = node.get(step.key)
            if node is None:
                return None
        return node

    def _elements(self, node: Json, step: Step, source: str, run: InverseRun) -> list[Any]:
        items = node.get(step.key)
        if items is None:
            return []
        if not isinstance(items, list):
            items = [items]
        if step.index:
            return self._assign_indexes(items, step.list_path, run).get(step.index, [])
        claim = self.claims.get(step.list_path)
        if claim is None or not source:
            return [i for i in items if i is not None]
        return self._assign_claims(items, claim, run).get(source, [])

    def _assign_indexes(self, items: list[Any], list_path: str, run: InverseRun
                        ) -> dict[int, list[Any]]:
        cached = run.indexed.get(id(items))
        if cached is not None:
            return cached
        indexes = self.indexes.get(list_path, {})
        named = [(n, c) for n, c in sorted(indexes.items()) if c]
        plain = [n for n, c in sorted(indexes.items()) if not c] or [1]
        out: dict[int, list[Any]] = {}
        left: list[Any] = []
        for item in items:
            if item is None:
                continue
            for n, constants in named:
                if all(_matches(item, c) == 1 for c in constants):
                    out.setdefault(n, []).append(item)
                    break
            else:
                left.append(item)
        for i, item in enumerate(left):
            out.setdefault(plain[min(i, len(plain) - 1)], []).append(item)
        run.indexed[id(items)] = out
        return out

    def _assign_claims(self, items: list[Any], claim: Claim, run: InverseRun
                       ) -> dict[str, list[Any]]:
        cached = run.owner.get(id(items))
        if cached is not None:
            return cached
        out: dict[str, list[Any]] = {}
        for item in items:
            if item is None:
                continue
            best: tuple[int, int, int] | None = None
            owner = ""
            for order, group in enumerate(claim.groups):
                if len(out.get(group, ())) >= claim.capacity[group]:
                    continue
                hard = [_matches(item, c) for c in claim.hard.get(group, ())]
                if -1 in hard:
                    continue
                soft = [_matches(item, c) for c in claim.soft.get(group, ())]
                covers = claim.covers.get(group)
                # A group that would drop part of the element ranks below one that keeps it.
                keeps = 1 if covers is None or not isinstance(item, dict) or all(
                    k in covers for k in item) else 0
                score = (keeps, sum(hard) + sum(soft), -order)
                if best is None or score > best:
                    best, owner = score, group
            if owner:
                out.setdefault(owner, []).append(item)
        run.owner[id(items)] = out
        return out

    def _write(self, writer: Writer, tree: Tree, rep: int, value: Any, node: Node) -> bool:
        if not writer.positions:
            return True  # a constant row: its condition's value was written instead
        if writer.pattern is None:
            if not writer.positions[0]:  # the whole value: a map's tree for every component
                return isinstance(node, dict) and merge(tree, node)
            return put(tree, self._at(writer, writer.positions[0], rep), node)
        match = writer.pattern.fullmatch(node if isinstance(node, str) else "")
        if match is None:
            return False
        ok = True
        for position, text in zip(writer.positions, match.groups(), strict=True):
            ok = put(tree, self._at(writer, position, rep), text) and ok
        return ok

    def _at(self, writer: Writer, position: Position, rep: int) -> Position:
        if not position:
            return position  # the whole value: merged at the root (see _write)
        if self.kind == "segment":
            return (position[0], rep, *position[1:])
        return position

    def _rank(self, tree: Tree, rep: int, candidates: list[tuple[Writer, Any]],
              root: Any, run: InverseRun) -> list[tuple[Writer, Node]]:
        """The candidate rows for one FHIR element, best first."""
        ranked: list[tuple[tuple[int, int, int, int], Writer, Node]] = []
        for writer, value in candidates:
            node, recognised = writer.convert(value, run)
            if node is None:
                continue
            score = 0
            if writer.pattern is not None:
                if not isinstance(node, str) or writer.pattern.fullmatch(node) is None:
                    continue
                score += 2 if writer.literal else 0
            elif recognised:
                score += 2
            if self._redundant(writer, tree, rep, node):
                score += 3
            score += self._constant_score(writer, tree, rep, root, run)
            score -= sum(1 for position, _ in writer.implied
                         if position not in writer.positions and
                         not read(tree, self._at(writer, position, rep)))
            # Of two templates that both fit, the one that places more values is the more
            # specific (+{XTN.5} {XTN.6} {XTN.7} before {XTN.6} {XTN.7}).
            ranked.append(((-score, -len(writer.positions), 1 if writer.condition else 0,
                            writer.order), writer, node))
        ranked.sort(key=lambda r: r[0])
        return [(writer, node) for _, writer, node in ranked]

    def _redundant(self, writer: Writer, tree: Tree, rep: int, node: Node) -> bool:
        if not isinstance(node, str) or not writer.positions:
            return False
        if writer.pattern is None:
            return read(tree, self._at(writer, writer.positions[0], rep)) == node
        match = writer.pattern.fullmatch(node)
        return match is not None and all(
            read(tree, self._at(writer, p, rep)) == text
            for p, text in zip(writer.positions, match.groups(), strict=True))

    def _constant_score(self, writer: Writer, tree: Tree, rep: int, root: Any,
                        run: InverseRun) -> int:
        if not writer.constants:
            return 0
        score = 0
        for constant in writer.constants:
            if constant.condition is not None and not constant.condition((tree, rep)):
                continue
            found = _matches(root, constant)
            score += found if constant.condition is None or found == 1 else -1
        return score


def _leaves(node: Node | None) -> int:
    """How many values a v2 node holds."""
    if node is None:
        return 0
    if isinstance(node, str):
        return 1 if node else 0
    return sum(_leaves(child) for child in node.values())


def _node_at(tree: Tree, position: Position) -> Node | None:
    node: Node | None = tree
    for step in position:
        if not isinstance(node, dict):
            return node if step == 1 else None
        node = node.get(step)
    return node


def _matches(node: Any, constant: Constant) -> int:
    """1: the FHIR data holds the constant; 0: it holds nothing there; -1: something else."""
    values = flatten(node, constant.steps)
    if not values:
        return 0
    return 1 if constant.value in values else -1
