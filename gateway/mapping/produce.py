"""What a row makes of its text at run time, beyond plain text: a primitive converted and
checked (dates in the sender's zone, codes through a vocabulary and the element's codes),
or a template quoting other locations (`urn:oid:{HD.2}`).

The compiler builds these for the interpreter and the generated source calls the same
ones (`mapping.codegen`), so both paths convert and check alike.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from gateway.mapping.convert import ConversionError, date_time
from gateway.mapping.errors import TranslationError
from gateway.mapping.runtime import NULL, Scope, described, leaf
from gateway.mapping.vocabulary import Vocab

# (the scope, the raw value, separators below it, the v2 location) -> value or None
Producer = Callable[[Scope, str, str, str], Any]


def primitive(convert: Callable[[str], Any], convert_name: str, codes: frozenset[str],
              kind: str, vocab: Vocab | None) -> Producer:
    """A FHIR primitive from the text: a date/time read in the sender's zone, a code
    looked up and checked against the element's codes, anything else converted."""
    zoned = kind in ("dateTime", "instant")

    def produce(scope: Scope, raw: str, seps: str, location: str) -> Any:
        text = leaf(raw, seps) if seps else raw
        if not text or text == NULL:
            return None
        text = scope.run.text(text)
        if text.isspace():
            return None  # padding only: not a value (a code or date cannot be blank)
        if zoned:
            try:
                return date_time(text, scope.run.offset, kind)
            except ConversionError as exc:
                raise TranslationError(location, exc.reason, text) from None
        if vocab is not None:
            hit = vocab.lookup(text)
            if hit is not None:
                text = hit[0]
        if codes and text not in codes:
            # A code the element's required binding does not allow cannot be sent as
            # is; it is left out and counted, never silently invented or dropped.
            scope.run.unmapped[location] += 1
            return None
        return converted(convert, text, location)
    return described(produce, "primitive", convert_name, codes, kind, vocab)


def template(getters: Sequence[Callable[[Scope], str]], pieces: Sequence[str],
             vocab: Vocab | None, convert: Callable[[str], Any], convert_name: str
             ) -> Producer:
    """A value quoting other locations; only as good as every value it quotes."""
    def produce(scope: Scope, raw: str, seps: str, location: str) -> Any:
        values = [g(scope) for g in getters]
        if not all(values):
            return None  # a template is only as good as every value it quotes
        text = "".join(p if i % 2 == 0 else values[i // 2] for i, p in enumerate(pieces))
        if vocab is not None:
            # A quoted code goes through the row's vocabulary as a read one does
            # (`{OBX-3.3}` with CodingSystem: `LN` is http://loinc.org).
            hit = vocab.lookup(text)
            if hit is not None:
                text = hit[0]
        return converted(convert, text, location)
    return described(produce, "template", tuple(getters), tuple(pieces), vocab, convert_name)


def converted(convert: Callable[[str], Any], text: str, location: str) -> Any:
    """The converted value, or a TranslationError naming where (and, for the CLI, what)."""
    try:
        return convert(text)
    except ConversionError as exc:
        raise TranslationError(location, exc.reason, text) from None
