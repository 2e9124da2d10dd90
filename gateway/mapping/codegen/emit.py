"""Compiled tables written out as one Python module: the same steps as the compiler's
closures, with each table's groups, rows and FHIR path setters inlined into one function.

The compiler writes on every closure what it does (`runtime.described`); this module
turns those descriptions into source, construct by construct, whatever the table (no
message type or table is special here). A closure without a description, or a value
that cannot be written as a literal, raises NotGenerated: the caller then keeps the
closures (the interpreter), which translate alike, only slower.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from gateway.mapping.codegen.dispatch import chain, chain_length
from gateway.mapping.codegen.exits import known_parts, late_nones, with_exits
from gateway.mapping.codegen.instances import Instances
from gateway.mapping.codegen.loops import loop_body, single_repetition
from gateway.mapping.codegen.memos import known_memos
from gateway.mapping.codegen.named import AS_IS, Named
from gateway.mapping.codegen.paths import (
    guarded,
    hoisted_keys,
    literal_writes,
    setter_statements,
    writes_constant,
)
from gateway.mapping.codegen.source import (
    HEADER,
    UNESCAPED,
    NotGenerated,
    Place,
    Tags,
    counted,
    descended,
    field_of,
    indent,
    indent_lines,
    is_valued,
    leaf_valued,
    literal,
    memo,
    null_inline,
    own_value,
    part_of,
    prelude,
    separators,
    spec_of,
    split_below,
    split_first,
    subcomponent,
    text_of,
)
from gateway.mapping.codegen.walk import Walks
from gateway.mapping.tables import MergeRow
from gateway.mapping.vocabulary import Vocab


class Emitter(Named):
    """Writes one module for a compiled table set (its shared objects: `Named`)."""

    def __init__(self, default_offset: str) -> None:
        super().__init__(default_offset)
        self.functions: list[str] = []
        # per table function being written: values read once, by variable name (with the
        # expression read, for those that are read in place when only one row reads them)
        self._lazy: list[dict[str, str]] = []
        self._seps: list[str] = []  # per table function being written: its separators
        self._insts: list[Instances] = []  # per table function being written: its instances
        # Segment functions that some step runs into a resource made before (`into_current`:
        # its `out` may hold what earlier segments wrote); the others start from {}.
        self._into_current: set[int] = set()
        self._walks = Walks(self)

    # -- the module ---------------------------------------------------------------------

    def module(self, events: dict[str, Callable[..., None]],
               merges: dict[str, MergeRow]) -> str:
        self._into_current = {id(step.apply) for fn in events.values()
                              if spec_of(fn)[0] == "message"
                              for steps in spec_of(fn)[1].values() for step in steps
                              if step.into_current}
        names = {message_type: self._message(fn) for message_type, fn in events.items()}
        lines = [HEADER, *self.top, "", *map(null_inline, self.functions), ""]
        lines.append("EVENTS = {" + ", ".join(f"{k!r}: {v}" for k, v in names.items()) + "}")
        lines.append("MERGES = [" + ", ".join(literal((
            r.message_type, r.resource, r.identifiers, r.where.file, r.where.line))
            for r in merges.values()) + "]")
        return "\n".join(lines) + "\n"

    # -- reading values ---------------------------------------------------------------------

    def _read(self, getter: object, place: Place | None) -> str:
        """A reader as an expression. In a table function (`place`): a component of the
        data type being mapped read in place, the field whose repetition is being mapped
        read from it, and any other location read once per call (a segment's fields and
        the segments before it do not change while it is mapped)."""
        spec = spec_of(getter)
        if place is None:
            return f"{self._reader(getter)}(scope)"
        kind = spec[0]
        if kind == "read_component":
            # `runtime.read_component` in place: the function's own parts and separators.
            # Read once per call (the parts do not change while they are mapped, and
            # conditions read the same one over and over).
            index, sub = spec[1], spec[2]
            raw = f"(parts[{index}] if {index} < count else '')"
            if sub:
                raw = f"part_below({raw}, {self._seps[-1]}, {sub})"
            name = f"m_c_{index}_{sub}"
            self._lazy[-1][name] = text_of(raw)
            return memo(name, text_of(raw))
        if kind == "read_own" and spec[1] == place.rep_field:
            _, _, c, s = spec
            return text_of(part_of("rep", c, s))
        if place.rep_field < 0:
            return f"{self._reader(getter)}({self._scope()})"
        name = "m_" + "_".join(str(a) for a in spec)
        name = re.sub(r"\W", "_", name)
        if kind == "read_own":
            # `runtime.read_own` without its closure and memo (the variable is the memo).
            _, f, c, s = spec
            read = own_value(f"(parts[{f}] if {f} < count else '')", c, s)
        elif kind == "read_repetition":
            # `runtime.read_repetition` written out: the field's nth repetition, as it is.
            _, f, c, s, nth = spec
            reps = f"(parts[{f}] if {f} < count else '').split(rs)"
            read = text_of(part_of(f"(rr[{nth - 1}] if {nth} <= len(rr := {reps}) else '')", c, s))
        elif kind == "read_other":
            # `runtime.read_other` written out: the nearest segment so far, or the first.
            _, segment_id, f, c, s = spec
            found = f"run.latest.get({segment_id!r}) or run.message.segment({segment_id!r})"
            # Its escape character: the other segment's (`esc` is this one's).
            read = (f"('' if (og := ({found})) is None else "
                    f"{own_value(field_of('og', f), c, s, 'og.escape')})")
        else:
            read = f"{self._reader(getter)}({self._scope()})"
        # Read by one row only, it is read in place (`prelude`), with no variable.
        self._lazy[-1][name] = read
        return memo(name, read)

    def _scope(self) -> str:
        """The table function's Scope, made by the first reader that needs one (most calls
        of most functions read nothing through one)."""
        return f"(scope if scope is not None else (scope := Scope(parts, {self._seps[-1]}, run)))"

    # -- conditions ------------------------------------------------------------------------

    def condition(self, predicate: object, place: Place | None) -> str:
        """A condition as an expression over `scope` (`place`: in a table function, see
        `_read`)."""
        spec = spec_of(predicate)
        kind = spec[0]
        if kind in ("or", "and"):
            return "(" + f" {kind} ".join(self.condition(p, place) for p in spec[1]) + ")"
        if kind == "not":
            return f"(not {self.condition(spec[1], place)})"
        value = self._read(spec[1], place)
        if kind == "valued":
            return is_valued(value)
        if kind == "equals":
            return f"({value} == {literal(spec[2])})"
        if kind == "in":
            return f"({value} in {self._constant(frozenset(spec[2]))})"
        if kind == "longer":
            return f"(len({value}) > {int(spec[2])})"
        if kind == "shorter":
            return f"(len({value}) < {int(spec[2])})"
        raise NotGenerated(f"unknown condition {kind}")

    # -- rows and groups ---------------------------------------------------------------------

    def _produce(self, produce: object, place: Place) -> tuple[list[str], bool]:
        """Statements setting `v` to what the row makes of its value (None: nothing), and
        whether that value is plain (text or a number, never a dict)."""
        spec = spec_of(produce)
        kind = spec[0]
        raw, seps, location = place.raw, place.seps, place.location
        if kind == "constant":
            return [f"v = {literal(spec[1])}"], True
        if kind == "template":
            return self._template(spec, place), True
        if kind != "mapped":
            raise NotGenerated(f"unknown producer {kind}")
        _, fn, recode, resource_type = spec
        datatype = self.datatype(fn)
        known = split_below(raw, seps)
        if known is not None:
            lines = [f"v = {datatype}({known[0]}, {known[1]}, run, {location}, esc)"]
        else:
            split, below = split_first(raw, seps)
            lines = [f"if {seps}:", f"    v = {datatype}({split}, {below}, run, {location}, esc)",
                     "else:",
                     f"    v = {datatype}([{raw}], '', run, {location}, esc)"]
        if recode is not None or resource_type is not None:
            lines.append("if v is not None:")
            if recode is not None:
                vocab_name, element_type = recode
                recoder_name = self._recoder(vocab_name, element_type)
                lines.append(f"    v = {recoder_name}(v, {location})")
            if resource_type is not None:
                lines.append(f"    v = run.reference_to({resource_type!r}, v)")
        if place.valued:  # checked where the group read it
            return lines, False
        return [f"if {raw} and {raw} != NULL:", *indent_lines(lines, 1),
                "else:", "    v = None"], False

    def _primitive(self, spec: tuple[Any, ...], place: Place, write: list[str]
                   ) -> list[str]:
        """`produce.primitive` written out for its element, the same steps in order, and
        `write` where it gives a value (it never gives None, so none is tested for)."""
        _, convert, codes, kind, vocab = spec
        location = place.location
        lines = [*leaf_valued(place.raw, place.seps, "v", place.valued),
                 f"    {UNESCAPED['v']}",
                 "    if not v.isspace():"]
        if kind in ("dateTime", "instant"):
            # `date_time`'s kept answers read in place (no call when kept).
            return lines + ["        try:",
                            f"            v = DATE_TIMES[(v, run.offset, {kind!r})]",
                            "        except KeyError:",
                            "            try:",
                            f"                v = date_time(v, run.offset, {kind!r})",
                            "            except ConversionError as exc:",
                            f"                raise TranslationError({location}, exc.reason, "
                            "v) from None", *indent_lines(write, 2)]
        body = self._lookup(vocab)
        then = self._convert(convert, location) + write
        if codes:
            # A code the element's required binding does not allow cannot be sent as is;
            # it is left out and counted.
            body += [f"if v not in {self._constant(frozenset(codes))}:",
                     *indent_lines(counted(location), 1),
                     "else:", *indent_lines(then, 1)]
        else:
            body += then
        return lines + indent_lines(body, 2)

    @staticmethod
    def _text(place: Place, write: list[str]) -> list[str]:
        """`produce.text` written out: the value's first part, unescaped, and `write`."""
        return [*leaf_valued(place.raw, place.seps, "v", place.valued),
                f"    {UNESCAPED['v']}", *indent_lines(write, 1)]

    def _template(self, spec: tuple[Any, ...], place: Place) -> list[str]:
        """`produce.template` written out: every quoted value read, then joined."""
        _, getters, pieces, vocab, convert = spec
        names = [f"q{n}" for n in range(len(getters))]
        lines = [f"{name} = {self._read(g, place)}" for name, g in zip(names, getters, strict=True)]
        joined = " + ".join(repr(p) if i % 2 == 0 else names[i // 2]
                            for i, p in enumerate(pieces) if i % 2 or p)
        body = [f"v = {joined}", *self._lookup(vocab), *self._convert(convert, place.location)]
        # A template is only as good as every value it quotes.
        return lines + [f"if {' and '.join(names)}:", *indent_lines(body, 1),
                        "else:", "    v = None"]

    def row(self, row: object, place: Place, out: str) -> list[str]:
        spec = spec_of(row)
        kind = spec[0]
        done = ["applied = True"] if place.applied else []
        if kind == "row_text":
            return [*leaf_valued(place.raw, place.seps, "t", place.valued),
                    f"    {UNESCAPED['t']}",
                    *indent_lines(setter_statements(spec[1], out, place.tags, True,
                                                    self._insts[-1]), 1), *done]
        if kind == "row":
            _, condition, produce, setter = spec
            made = spec_of(produce)
            if made[0] in ("text", "primitive"):
                # Text, or a primitive converted: written where it is made (never None).
                write = setter_statements(setter, out, place.tags, True, self._insts[-1])
                body = (self._text(place, write) if made[0] == "text" else
                        self._primitive(made, place, write)) + done
            else:
                produced, plain = self._produce(produce, place)
                write = setter_statements(setter, out, place.tags, plain, self._insts[-1])
                if made[0] == "constant":
                    body = [*produced, *write, *done]  # a constant is never None
                elif made[0] == "template" and made[4] in AS_IS:
                    # Joined and kept as text: None only where it is not joined.
                    body = [*produced[:-2], *indent_lines(write, 1), *done]
                else:
                    body = [*produced, "if v is not None:", *indent_lines(write, 1), *done]
            if condition is None:
                return body
            return [f"if {self.condition(condition, place)}:", *indent_lines(body, 1)]
        if kind == "only_existing":
            _, inner, prefix, indexed = spec
            use = self._insts[-1].use(place.tags, prefix, indexed)
            if use is None:
                return [f"if {place.tags.key(prefix, indexed)} in inst:",
                        *indent_lines(self.row(inner, place, out), 1)]
            if use.fresh:
                return []  # nothing before can have made the instance: it never applies
            return [f"if {use.var} is not None:", *indent_lines(self.row(inner, place, out), 1)]
        if kind == "applies_when":
            if not place.applied:
                return []  # writes nothing; only whether it holds counts, and not here
            return [f"if {self.condition(spec[1], place)}:", "    applied = True"]
        raise NotGenerated(f"unknown row {kind}")

    def _rows(self, rows: Iterable[object], place: Place, out: str) -> list[str]:
        chunks: list[list[str]] = []
        run: list[object] = []  # rows writing constants, one after another
        rows = [*rows, None]
        at = 0
        while at < len(rows):
            row = rows[at]
            at += 1
            if row is not None and writes_constant(row, place):
                run.append(row)
                continue
            if run:
                chunks.append(self._constants(run, place, out))
                run = []
            if row is None:
                continue
            length = chain_length(rows[:-1], at - 1, lambda r: not writes_constant(r, place))
            if length:
                chunks.append(self._chain(rows[at - 1:at - 1 + length], place, out))
                at += length - 1
            else:
                chunks.append(self.row(row, place, out))
        lines: list[str] = []
        test = ""
        for chunk in chunks:
            # Rows one after another under the same test share it (an OBX-5 row per value
            # type): a test reads the message, or whether an instance was made, which a
            # row can only make true, so what held for the first holds for the next.
            under = bool(chunk) and chunk[0].startswith("if ") and all(
                not line or line.startswith("    ") for line in chunk[1:])
            if under and chunk[0] == test:
                lines += chunk[1:]
                continue
            lines += chunk
            test = chunk[0] if under else ""
        return lines or ["pass"]

    def _chain(self, rows: list[object], place: Place, out: str) -> list[str]:
        """Rows testing one value first: `dispatch.chain`."""
        return chain(rows, lambda c: self.condition(c, place),
                     lambda row: self.row(row, place, out))

    def _constants(self, rows: list[object], place: Place, out: str) -> list[str]:
        """Rows that write constants: where none of the elements they write is there yet
        (the usual case), what they write as one literal; else row by row. The literal is
        what the rows' own setters make of an empty object (so the same keys in the same
        order), each repeating instance they make kept under its key (in a local
        variable, or in `inst`)."""
        tags = place.tags.static
        assert tags is not None
        insts = self._insts[-1]
        made: dict[str, Any] = {}
        inst: dict[str, Any] = {}
        for row in rows:
            _, _, produce, setter = spec_of(row)
            setter(made, inst, tags[0], tags[1], spec_of(produce)[1])
        if len(rows) < 2 and not inst:
            return [line for row in rows for line in self.row(row, place, out)]
        # Row by row only where an element may be there already (a data-type function's
        # `out` starts empty: then never).
        absent = [key for key in made if insts.may_hold(out, key)]
        slow = [line for row in rows for line in self.row(row, place, out)] if absent else []
        writes = literal_writes(made, inst, out, insts)
        if not absent:
            return writes
        test = " and ".join(f"{key!r} not in {out}" for key in absent)
        return [f"if {test}:", *indent_lines(writes, 1), "else:",
                *indent_lines(slow, 1)]

    def group(self, group: object, parts: str, seps: str, location: str, out: str,
              guarded: int = -1) -> list[str]:
        """A group of rows sharing a source, as statements (`guarded`: the index of a
        part already known to be there and not empty)."""
        spec = spec_of(group)
        kind = spec[0]
        if kind == "constants":
            return self._rows(spec[1], Place("''", "''", location, Tags(("#1", "@#1"))), out)
        if kind == "components":
            _, index, sub, suffix, src_tag, rows = spec
            lines = [f"raw = {parts}[{index}]" if guarded == index else
                     f"raw = {parts}[{index}] if {index} < len({parts}) else ''"]
            below = seps  # the separators below `raw`: the function's, or `sp`
            if sub and seps == "''":
                # No level below: the value is its own first part (`runtime.part_below`).
                lines += [] if sub == 1 else ["raw = ''"]
            elif sub and seps == "seps":
                below, lines = "''", lines + subcomponent(sub)
            elif sub:
                below = "sp"
                lines += [f"sp = {seps}", "if sp:", "    pc = raw.split(sp[0])",
                          f"    raw = pc[{sub - 1}] if {sub} <= len(pc) else ''",
                          "    sp = sp[1:]"]
                lines += ["else:", f"    raw = raw if {sub} == 1 else ''"]
            # The location is only needed for an error or a count (rarely): it is joined
            # where it is used (in a segment function both parts are constants, which
            # Python joins when it compiles the module).
            place = Place("raw", below, f"({location} + {suffix!r})", Tags(("#1", src_tag)),
                          rep_field=-1, valued=True)
            test = "raw != NULL" if guarded == index and not sub else "raw and raw != NULL"
            return lines + [f"if {test}:",
                            *indent_lines(self._rows(rows, place, out), 1)]
        if kind == "elsewhere":
            _, segment_id, f, c, s, where, other_tag, rows = spec
            place = Place("raw", separators(c, s), repr(where), Tags(("#1", other_tag)),
                          valued=True)
            return [f"sg = run.latest.get({segment_id!r}) or run.message.segment("
                    f"{segment_id!r})",
                    "if sg is not None:",
                    # Its values are unescaped as any may need (`esc` may be this
                    # segment's "", which holds none); so are this one's after it.
                    "    esc = run.d.escape  # (another segment's values)",
                    # `runtime.first_repetition` and `descend` written out.
                    f"    raw = {field_of('sg', f)}", "    if rs in raw:",
                    "        raw = raw.split(rs, 1)[0]", *indent_lines(descended(c, s), 1),
                    "    if raw and raw != NULL:",
                    *indent_lines(self._rows(rows, place, out), 2)]
        if kind == "repetitions":
            return self._repetitions(spec, parts, out, guarded == spec[1])
        if kind == "whole":
            place = Place("raw", "sp", location, Tags(("#1", "@*#1")))
            return [f"jn = run.d.component if {seps} else run.d.subcomponent",
                    f"raw = jn.join({parts})", f"sp = jn + {seps}",
                    *self._rows(spec[1], place, out)]
        raise NotGenerated(f"unknown group {kind}")

    def _repetitions(self, spec: tuple[Any, ...], parts: str, out: str, guarded: bool
                     ) -> list[str]:
        _, f, c, s, where, only, count_unmatched, rows = spec
        place = Place("raw", separators(c, s), repr(where), Tags(None), applied=count_unmatched,
                       rep_field=f, valued=True)
        # `runtime.descend` written out: the component (and subcomponent) of each one.
        below = ["raw = rep", *descended(c, s)]
        self._insts[-1].repeated(rows, out)
        rows_lines = (["applied = False", *self._rows(rows, place, out),
                       "if not applied:", *indent_lines(counted(repr(where)), 1)]
                      if count_unmatched else self._rows(rows, place, out))
        body = [*below,
                "if not raw or raw == NULL:", "    continue",
                # The repetition's own instances (`Instances`) are new at each one.
                *self._insts[-1].loop_lines(self._insts[-1].group),
                "scope.rep = rep",
                "rt = REPETITION_TAGS[i] if i < 100 else f'#{i + 1}'",
                f"st = {'@' + where!r} + rt", *rows_lines]
        body = hoisted_keys(body, f"st = {'@' + where!r} + rt")
        only_line = [f"    reps = reps[{only - 1}:{only}]"] if only is not None else []
        # The repetition being mapped is for readers of this field (its conditions).
        uses_scope = any(re.search(r"\bscope\b", line) for line in body
                         if line != "scope.rep = rep")
        if not uses_scope:
            body.remove("scope.rep = rep")
        body, var, numbered = loop_body(body)
        if var == "raw" and not (numbered or uses_scope or only_line):
            single = single_repetition(body)
            if single:
                return [f"fl = {parts}[{f}]" if guarded else
                        f"fl = {parts}[{f}] if {f} < len({parts}) else ''",
                        "if fl != NULL:" if guarded else "if fl and fl != NULL:",
                        *indent_lines(single, 1)]
        return [f"fl = {parts}[{f}]" if guarded else
                f"fl = {parts}[{f}] if {f} < len({parts}) else ''",
                "if fl != NULL:" if guarded else "if fl and fl != NULL:",
                "    reps = fl.split(rs) if rs in fl else (fl,)",
                *only_line,
                *([f"    scope = {self._scope()}", f"    scope.rep_field = {f}"]
                  if uses_scope else []),
                f"    for i, {var} in enumerate(reps):" if numbered else f"    for {var} in reps:",
                *indent_lines(body, 2),
                *(["    scope.rep_field = 0"] if uses_scope else [])]

    def _groups(self, groups: Sequence[tuple[int, object]], parts: str, seps: str,
                location: str, out: str, leave: str) -> list[str]:
        chunks: list[tuple[int, list[str]]] = []
        for position, (index, group) in enumerate(groups):
            if not spec_of(group)[-1]:
                continue  # no rows (only documentation rows): nothing to run
            self._insts[-1].group = position
            body = self.group(group, parts, seps, location, out, index)
            # An empty component costs one comparison, not a call (most are empty).
            chunks.append((index, body if index < 0 else guarded(body, index, parts)))
        return with_exits(chunks, leave)

    # -- tables --------------------------------------------------------------------------------

    def datatype(self, fn: object) -> str:
        known = self._known(fn)
        if known:
            return known
        spec = spec_of(fn)
        if spec[0] != "datatype":
            raise NotGenerated(f"unknown data-type function {spec[0]}")
        _, table_name, primitive, groups = spec
        name = self._remember(fn, self._name("D"))  # before the body: tables nest
        self._lazy.append({})
        self._seps.append("seps")
        self._insts.append(Instances([g for _, g in groups], out_known=True))
        leave = "return out.get('$value')" if primitive else "return out or None"
        lines = self._groups(groups, "parts", "seps", "location", "out", leave)
        body = known_parts(known_memos(prelude(
            ["out = {}", "inst = {}", *self._insts.pop().function_lines(), "count = len(parts)",
             *lines, leave], self._lazy.pop())), 1)  # (its parts are a split's: never empty)
        # The escape character is given by the caller (which has it at hand).
        body = late_nones(_given_escape(body))
        self._seps.pop()
        self.functions.append(f"def {name}(parts, seps, run, location, esc):  # {table_name}\n"
                              + indent(body, 1))
        return name

    def segment(self, fn: object) -> str:
        known = self._known(fn)
        if known:
            return known
        spec = spec_of(fn)
        if spec[0] != "segment":
            raise NotGenerated(f"unknown segment function {spec[0]}")
        _, table_name, segment_id, groups = spec
        name = self._remember(fn, self._name("S"))
        self._lazy.append({})
        self._seps.append("''")
        # `out` may hold what earlier segments wrote (a PD1 into the PID's Patient) when
        # a step runs this function into a resource made before; else it is a new {}.
        self._insts.append(Instances([g for _, g in groups],
                                     out_known=id(fn) not in self._into_current))
        lines = self._groups(groups, "parts", "''", repr(segment_id), "out", "return")
        body = known_parts(known_memos(prelude(
            ["inst = {}", *self._insts.pop().function_lines(), "count = len(parts)", *lines],
            self._lazy.pop())), 0)
        # The escape character is given by the walk ("" for a segment that holds none).
        body = late_nones(_given_escape(body))
        self._seps.pop()
        self.functions.append(f"def {name}(parts, run, out, esc):  # {table_name}\n"
                              + indent(body, 1))
        return name

    def identity(self, fn: object) -> str:
        known = self._known(fn)
        if known:
            return known
        spec = spec_of(fn)
        if spec[0] != "identity":
            raise NotGenerated(f"unknown identity function {spec[0]}")
        _, resource, rules = spec
        name = self._remember(fn, self._name("I"))

        def lines_of(place: Place) -> list[str]:
            body = ["comp = run.d.component"]
            for condition, readers in rules:
                values = ", ".join(f"{self._read(p, place)}.rstrip(comp)" for p in readers)
                rule = [f"values = [{values}]", "if any(values):",
                        f"    return {resource + '|key|'!r} + '|'.join(values)"]
                if condition is None:
                    body += rule
                else:
                    body += [f"if {self.condition(condition, place)}:", *indent_lines(rule, 1)]
            return [*body, "return ''"]

        self.functions.append(f"def {name}(parts, run, esc):\n"
                              + indent(self.reading_fields(lines_of), 1))
        return name

    def reading_fields(self, lines_of: Callable[[Place], list[str]]) -> list[str]:
        """The body of a function of a segment's fields (`parts`), the run and the
        segment's escape character (`esc`): what `lines_of` writes, each field it reads
        read as a segment function reads them (once each, in place), after the prelude
        of what it reads."""
        place = Place("''", "''", "''", Tags(None))
        self._lazy.append({})
        self._seps.append("''")
        body = known_memos(prelude(["count = len(parts)", *lines_of(place)],
                                   self._lazy.pop()))
        self._seps.pop()
        return _given_escape(body)

    def new_name(self, prefix: str) -> str:
        return self._name(prefix)

    def _message(self, fn: object) -> str:
        known = self._known(fn)
        if known:
            return known
        name = self._remember(fn, self._name("M"))
        self.functions.append(f"{name} = {self._walks.message(fn)}\n")
        return name

def _given_escape(body: list[str]) -> list[str]:
    """A function's body without the prelude's escape character: its caller gives it."""
    return [line for line in body if line != "esc = run.d.escape"]


def generate(events: dict[str, Callable[..., None]], merges: dict[str, MergeRow],
             vocabs: dict[str, Vocab], default_offset: str) -> str:
    """The module's source; NotGenerated if any construct has no description."""
    return Emitter(default_offset).with_vocabularies(vocabs).module(events, merges)
