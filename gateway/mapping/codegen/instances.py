"""What the generator knows, while it writes one table function, about the repeating
instances the function makes and the keys written into them.

The interpreter keeps a function's repeating instances in a dict (`inst`) by key: a path
prefix and the source's tags (`coding[1]#1`, `name@PID-5#2`). Most keys of a function are
known when it is written, and only one key expression of the function can name each
instance: such an instance is held in a local variable instead (`ob0`), and the first
statement that reaches it (nothing before it can have made it) makes it without a test.
A key that another expression of the function may also name at run time (an indexed
`address[1]` written by a field's repetitions and by a constant row; two groups of the
same field) stays in `inst`.

It also records which keys each local instance, and the function's `out` when it is
empty at its start (a data-type function's; a segment function's unless a step runs it
into a resource made before), may hold so far: where none can, a first-write-wins test
is left out. Everything here follows the order the statements are written in, which is the
order they run in: a table function has no loop but a field's repetitions, whose
instances are made again at each repetition (`Instances.loop_lines`) and whose writes
into `out` may be there at the next one (`Instances.repeated`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

from gateway.mapping.codegen.source import NotGenerated, Tags, spec_of

# An instance's identity in a function: (-1, its key) for one of fixed tags; (the group's
# position, path prefix) for one of a field's repetitions (its key changes with each).
Identity = tuple[int, str]
# Where keys of one identity may fall at run time (`_identities`): identities of one
# family may name the same instance.
Family = tuple[str, str]


class Use(NamedTuple):
    """A statement reaching a local instance: its variable, whether nothing before can
    have made it (it is None), and whether any statement after may read it."""

    var: str
    fresh: bool
    keep: bool


class Instances:
    """The local instances of one table function being written (see the module)."""

    def __init__(self, groups: Sequence[object], out_known: bool) -> None:
        self.group = -1  # the position of the group being written
        self._left: Counter[Identity] = Counter()  # statements still to be written
        families: dict[Family, set[Identity]] = {}
        for position, group in enumerate(groups):
            for identity, family in _identities(position, group):
                self._left[identity] += 1
                families.setdefault(family, set()).add(identity)
        # An identity alone in its family is the only expression naming its instances.
        self._local = {ids.pop() for ids in families.values() if len(ids) == 1}
        self._vars: dict[Identity, str] = {}
        self._touched: set[str] = set()
        self._read: set[str] = set()  # vars a statement tests: set to None first
        # keys a node may hold so far (None: any); nodes not here: any.
        self._written: dict[str, set[str] | None] = {"out": set()} if out_known else {}

    # -- instances ----------------------------------------------------------------------

    def use(self, tags: Tags, prefix: str, indexed: bool) -> Use | None:
        """A statement reaching the instance `prefix` of these tags (None: kept in `inst`).
        Every call stands for one statement counted by `_identities`."""
        identity = self._identity(tags, prefix, indexed)
        if identity not in self._local:
            return None
        var = self._variable(identity)
        self._left[identity] -= 1
        if self._left[identity] < 0:
            # More statements than `_identities` counted: `keep` would be wrong.
            raise NotGenerated(f"instance {identity} reached by an uncounted statement")
        fresh = var not in self._touched
        self._touched.add(var)
        if not fresh:
            self._read.add(var)
        return Use(var, fresh, self._left[identity] > 0)

    def known(self, key: str) -> str | None:
        """The variable of the instance of fixed key `key` (a constant rows' literal makes
        it), marked as made; None: kept in `inst`."""
        identity = (-1, key)
        if identity not in self._local:
            return None
        var = self._variable(identity)
        self._touched.add(var)
        return var

    def _variable(self, identity: Identity) -> str:
        """The local variable holding the instances of `identity`, named at its first use."""
        var = self._vars.get(identity)
        if var is None:
            var = self._vars[identity] = f"ob{len(self._vars)}"
            self._written[var] = set()
        return var

    def function_lines(self) -> list[str]:
        """The function's local instances of fixed keys, set to None at its start."""
        return [f"{var} = None" for (group, _), var in self._vars.items()
                if group < 0 and var in self._read]

    def loop_lines(self, group: int) -> list[str]:
        """The local instances of a field's repetitions (`group`), None at each one."""
        return [f"{var} = None" for (position, _), var in self._vars.items()
                if position == group and var in self._read]

    def _identity(self, tags: Tags, prefix: str, indexed: bool) -> Identity:
        if tags.static is None:
            return (self.group, prefix)
        return (-1, prefix + tags.static[0 if indexed else 1])

    # -- keys written -------------------------------------------------------------------

    def may_hold(self, node: str, key: str) -> bool:
        """Whether an earlier statement may have written `key` into `node`."""
        keys = self._written.get(node)
        return keys is None or key in keys

    def wrote(self, node: str, key: str) -> None:
        keys = self._written.get(node)
        if keys is not None:
            keys.add(key)

    def repeated(self, rows: Iterable[object], out: str) -> None:
        """The rows of a field's repetitions are about to be written: each runs once per
        repetition, so what one writes into `out` may be there at the next one."""
        for key in _top_keys(rows):
            self.wrote(out, key)

    def filled(self, node: str) -> None:
        """`node` may now hold any key (a data-type function's value went into it)."""
        if node in self._written:
            self._written[node] = None

    def holding(self, node: str, keys: Iterable[str]) -> None:
        """`node` may hold `keys` (a constant rows' literal made it)."""
        for key in keys:
            self.wrote(node, key)


# The fixed source tag of each kind of group (`compiler.segments`); a component's and
# another segment's field's are on their description.
_TAGS = {"constants": "@#1", "whole": "@*#1"}


def _identities(position: int, group: object) -> list[tuple[Identity, Family]]:
    """The instance statements of a group's rows (an identity each, with its family), as
    `Instances.use` is called for them; more than are written is safe, fewer is not."""
    spec = spec_of(group)
    kind = spec[0]
    if kind == "repetitions":
        where = spec[4]
        found = []
        for prefix, indexed in _row_instances(spec[-1]):
            family = (prefix, "#" if indexed else where)
            found.append(((position, prefix), family))
        return found
    tag = _TAGS.get(kind) or spec[4 if kind == "components" else 6]
    found = []
    for prefix, indexed in _row_instances(spec[-1]):
        key = prefix + ("#1" if indexed else tag)
        # `@X#1`: a source tag; X names the source (a component `.1`, another segment's
        # field `OBR-4`), the same X as a field's repetitions `@X#n` when it is that field.
        family = (prefix, "#" if indexed else tag[1:tag.rindex("#")])
        found.append(((-1, key), family))
    return found


def _row_instances(rows: Iterable[Any]) -> list[tuple[str, bool]]:
    found: list[tuple[str, bool]] = []
    for row in rows:
        spec = spec_of(row)
        kind = spec[0]
        if kind == "only_existing":
            found.append((spec[2], spec[3]))
            found += _row_instances([spec[1]])
        elif kind in ("row", "row_text"):
            setter = spec_of(spec[-1])
            if setter[0] == "walk":
                _, walk, _, last_prefix, last_repeats, last_indexed = setter
                found += [(prefix, indexed) for _, prefix, repeats, indexed in walk
                          if repeats]
                if last_repeats:
                    found.append((last_prefix, last_indexed))
    return found


def _top_keys(rows: Iterable[object]) -> set[str]:
    """The keys of the written object that rows may write (their paths' first steps)."""
    found: set[str] = set()
    for row in rows:
        spec = spec_of(row)
        if spec[0] == "only_existing":
            found |= _top_keys([spec[1]])
        elif spec[0] in ("row", "row_text"):
            setter = spec_of(spec[-1])
            if setter[0] == "walk":
                walk, last_key = setter[1], setter[2]
                found.add(walk[0][0] if walk else last_key)
            elif setter[0] == "single":
                found.add(setter[1])
            else:
                found.add("$value")
    return found
