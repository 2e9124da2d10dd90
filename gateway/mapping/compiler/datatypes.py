"""Data types: what a row makes of its v2 value, and data-type tables compiled.

A row's value becomes a FHIR value in one of four ways: a primitive converted from the text
(dates keep their precision and offset, codes are looked up and checked), a data-type table
applied to the composite (XPN -> HumanName, XCN -> a Practitioner referred to), a constant,
or a template quoting other locations (`urn:oid:{HD.2}`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from gateway.fhir import model as fhir_model
from gateway.mapping import v2types
from gateway.mapping.compiler.context import Context, Group, TableLocation, reader
from gateway.mapping.convert import ConversionError, encode_base64, to_string
from gateway.mapping.produce import Producer, primitive, template
from gateway.mapping.runtime import NULL, Json, Run, Scope, described, leaf
from gateway.mapping.tables import FieldMap, MapRow, Where
from gateway.mapping.vocabulary import Vocab, recoder

# (parts at this level, separators below them, the run, the v2 location) -> value or None
DatatypeFn = Callable[[list[str], str, Run, str], Any]
# A data-type table by name, compiled on first use (None: unknown, reported at `where`).
DatatypeLookup = Callable[[str, Where], DatatypeFn | None]

_PLACEHOLDER = re.compile(r"\{([^{}]+)\}")


def check_datatype_table(ctx: Context, table: FieldMap) -> None:
    """A data-type table's own header: a known v2 data type, a known FHIR type."""
    where0 = Where(table.file, 1)
    if table.v2_type not in v2types.COMPONENTS:
        ctx.errors.append(where0.error(f"unknown HL7 v2 data type '{table.v2_type}'"))
    if not fhir_model.is_type(table.target_type):
        ctx.errors.append(where0.error(f"unknown FHIR type '{table.target_type}'"))


def datatype_function(table: FieldMap, groups: list[tuple[int, Group]]) -> DatatypeFn:
    """A data-type table's compiled groups as one function over a composite's parts."""
    primitive = table.target_type in fhir_model.PRIMITIVE_TYPES

    def apply(parts: list[str], seps: str, run: Run, location: str) -> Any:
        scope = Scope(parts, seps, run)
        out: Json = {}
        inst: dict[str, Json] = {}
        count = len(parts)
        for index, group in groups:
            # An empty component costs one comparison, not a call (most are empty).
            if index < 0 or (index < count and parts[index]):
                group(scope, inst, out, location)
        if primitive:
            return out.get("$value")
        return out or None

    return described(apply, "datatype", table.name, primitive, groups)


class Producers:
    """Compiles what each row produces; a data-type table a row names is asked for through
    `datatype` (compiled on first use by the segment compiler, which owns the tables)."""

    def __init__(self, ctx: Context, datatype: DatatypeLookup) -> None:
        self.ctx = ctx
        self.datatype = datatype

    def producer(self, row: MapRow, table: FieldMap, source: TableLocation | None,
                 element: fhir_model.Element | None) -> Producer | None:
        """What the row makes of its value (None: a problem was recorded)."""
        where = row.where
        if element is None:
            return None
        vocab = None
        if row.vocabulary:
            vocab = self.ctx.vocabs.get(row.vocabulary)
            if vocab is None:
                self.ctx.errors.append(where.error(f"unknown vocabulary '{row.vocabulary}'"))
                return None
        if row.value:
            return self._constant(row, table, element, vocab)
        if source is None:
            self.ctx.errors.append(where.error("a row needs a source or a value"))
            return None
        if row.map:
            return self._mapped(row, element, vocab)
        if not element.is_primitive:
            self.ctx.errors.append(where.error(
                f"{row.target} is a {element.type}: name the data-type map to apply"))
            return None
        return self._primitive(row, element, vocab)

    def _constant(self, row: MapRow, table: FieldMap, element: fhir_model.Element,
                  vocab: Vocab | None) -> Producer | None:
        where = row.where
        if not element.is_primitive:
            self.ctx.errors.append(where.error(f"a value can only be assigned to a primitive; "
                                           f"{row.target} is {element.type}"))
            return None
        convert = self.ctx.converters.for_type(element.type)
        placeholders = _PLACEHOLDER.findall(row.value)
        if not placeholders:
            try:
                constant = convert(row.value)
            except ConversionError as exc:
                self.ctx.errors.append(where.error(f"value '{row.value}' {exc.reason}"))
                return None
            if element.codes and constant not in element.codes:
                self.ctx.errors.append(where.error(
                    f"type mismatch: '{constant}' is not one of the codes of {row.target} "
                    f"({', '.join(element.codes)})"))
                return None
            return described(lambda scope, raw, seps, location: constant, "constant", constant)
        getters: list[Callable[[Scope], str]] = []
        for text in placeholders:
            found = self.ctx.location(text, table, where)
            if found is None:
                return None
            getters.append(reader(found, table))
        pieces = _PLACEHOLDER.split(row.value)  # literal, name, literal, name, ..., literal
        return template(getters, pieces, vocab, convert, element.type)

    def _primitive(self, row: MapRow, element: fhir_model.Element, vocab: Vocab | None
                   ) -> Producer | None:
        try:
            # `string` declared for a base64Binary target: the v2 value is text (a TX
            # line, ED sent as ASCII), so it is encoded rather than checked as base64.
            encode = element.type == "base64Binary" and row.type == "string"
            convert = encode_base64 if encode else self.ctx.converters.for_type(element.type)
        except KeyError as exc:
            self.ctx.errors.append(row.where.error(str(exc.args[0])))
            return None
        codes = frozenset(element.codes)
        target = row.target
        if vocab is not None:
            # A wildcard row (`*` -> unknown) gives its code as surely as an exact one does;
            # only a code built from the message ({*}, {code}) is checked per message.
            given = [*vocab.exact.values(), *(t for _, t in vocab.prefixes)]
            bad = [c for c, _, _ in given if codes and c not in codes and "{" not in c]
            if bad:
                self.ctx.errors.append(row.where.error(
                    f"type mismatch: vocabulary {vocab.name} gives {bad[0]!r}, which is not "
                    f"a code of {target} ({', '.join(sorted(codes))})"))
                return None

        if convert is to_string and vocab is None and not codes:
            def produce_text(scope: Scope, raw: str, seps: str, location: str) -> Any:
                # Most rows are plain text: nothing to convert, look up or check.
                text = leaf(raw, seps) if seps else raw
                if not text or text == NULL:
                    return None
                return scope.run.text(text)
            produce_text.plain_text = True  # type: ignore[attr-defined]
            return described(produce_text, "text")
        return primitive(convert, "encode_base64" if encode else element.type, codes,
                         element.type, vocab)

    def _mapped(self, row: MapRow, element: fhir_model.Element, vocab: Vocab | None
                ) -> Producer | None:
        fn = self.datatype(row.map, row.where)
        table = self.ctx.tables.datatypes.get(row.map)
        if fn is None or table is None:
            return None
        produced = table.target_type
        makes_resource = fhir_model.is_resource_type(produced)
        if makes_resource:
            if element.type != "Reference" or (element.reference_targets and
                                               produced not in element.reference_targets):
                self.ctx.errors.append(row.where.error(
                    f"type mismatch: map {row.map} makes a {produced}; {row.target} "
                    f"cannot refer to it"))
                return None
        elif produced != element.type and not (
                element.is_primitive and produced in fhir_model.PRIMITIVE_TYPES):
            self.ctx.errors.append(row.where.error(
                f"type mismatch: map {row.map} makes {produced}; {row.target} is "
                f"{element.type}"))
            return None
        recode = recoder(vocab, element.type) if vocab is not None else None
        if vocab is not None and recode is None:
            self.ctx.errors.append(row.where.error(
                f"a vocabulary applies to a code, Coding or CodeableConcept, not "
                f"{element.type}"))
            return None
        resource_type = produced

        def produce(scope: Scope, raw: str, seps: str, location: str) -> Any:
            if not raw or raw == NULL:
                return None
            if seps:
                parts = raw.split(seps[0])
                below = seps[1:]
            else:
                parts, below = [raw], ""
            value = fn(parts, below, scope.run, location)
            if value is None:
                return None
            if recode is not None:
                value = recode(value, location)
            if makes_resource:
                return scope.run.reference_to(resource_type, value)
            return value
        recoded = (vocab.name, element.type) if vocab is not None else None
        return described(produce, "mapped", fn, recoded,
                         resource_type if makes_resource else None)

