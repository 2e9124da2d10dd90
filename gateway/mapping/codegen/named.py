"""The generated module's shared objects (constants, vocabularies, readers, producers,
converters, recoders): each written once at the module's top, under a name.

A base class of the emitter (`emit.Emitter`): what it writes inside functions refers to
these by name, so the same object is never written twice; the statements that look a
code up in a vocabulary and convert a value through these objects are written here too.
"""

from __future__ import annotations

from typing import Self

from gateway.mapping.codegen.source import NotGenerated, indent_lines, literal, spec_of
from gateway.mapping.vocabulary import Vocab

# FHIR types whose converter is a pure function of the text, giving text
# (`convert.to_code`, `to_id`, `to_uri`): answers kept by the text (`emit.Emitter._convert`).
KEPT_BY_TEXT = frozenset({"code", "id", "uri", "url", "canonical", "oid", "uuid"})
# FHIR types whose converter returns the text as it is (`convert.to_string`).
AS_IS = frozenset({"string", "markdown"})
# Answers kept by the text for a type in KEPT_BY_TEXT: at most _KEPT each.
_KEPT = 4096
_KEPT_LENGTH = 256  # a longer text is converted each time, not kept (memory stays bounded)
_READERS = frozenset({"read_component", "read_other", "read_own", "read_repetition"})


class Named:
    """The module's top being written, and the names of what it holds."""

    def __init__(self, default_offset: str) -> None:
        self.top: list[str] = [f"CONVERT = Converters({default_offset!r})", ""]
        self._names: dict[int, str] = {}
        self._keep: list[object] = []  # ids stay unique while the module is written
        self._count = 0
        self._readers: dict[tuple[object, ...], str] = {}  # by what they read
        self._vocabs_by_name: dict[str, Vocab] = {}  # for recoders, by name
        self._recoders: dict[tuple[str, str, str], str] = {}  # recoders, converters, by key

    def _name(self, prefix: str) -> str:
        self._count += 1
        return f"{prefix}{self._count}"

    def _known(self, obj: object) -> str | None:
        return self._names.get(id(obj))

    def _remember(self, obj: object, name: str) -> str:
        self._names[id(obj)] = name
        self._keep.append(obj)
        return name

    def _constant(self, value: object) -> str:
        name = self._name("K")
        self.top.append(f"{name} = {literal(value)}")
        return name

    def _vocab(self, vocab: Vocab | None) -> str:
        if vocab is None:
            return "None"
        known = self._known(vocab)
        if known:
            return known
        name = self._name("V")
        self.top.append(f"{name} = Vocab.from_parts({literal(vocab.name)}, "
                        f"{literal(vocab.exact)}, {literal(vocab.prefixes)}, "
                        f"{literal(vocab.reverse)})")
        return self._remember(vocab, name)

    def _reader(self, getter: object) -> str:
        known = self._known(getter)
        if known:
            return known
        spec = spec_of(getter)
        if spec[0] not in _READERS:
            raise NotGenerated(f"unknown reader {spec[0]}")
        # Readers of one location are one (the same tests then read as the same text).
        name = self._readers.get(spec)
        if name is None:
            name = self._readers[spec] = self._name("G")
            self.top.append(f"{name} = {spec[0]}({', '.join(literal(a) for a in spec[1:])})")
        return self._remember(getter, name)

    @staticmethod
    def _converter(name: str) -> str:
        return "encode_base64" if name == "encode_base64" else f"CONVERT.for_type({name!r})"

    def _converter_object(self, convert: str) -> str:
        key = ("convert", convert, "")
        known = self._recoders.get(key)
        if known:
            return known
        name = self._name("F")
        self.top.append(f"{name} = {self._converter(convert)}")
        if convert in KEPT_BY_TEXT:
            self.top.append(f"{name}_KEPT = {{}}")
        self._recoders[key] = name
        return name

    def _recoder(self, vocab_name: str, element_type: str) -> str:
        vocab = self._vocabs_by_name.get(vocab_name)
        if vocab is None:
            raise NotGenerated(f"vocabulary {vocab_name} not found")
        key = ("recoder", vocab_name, element_type)
        known = self._recoders.get(key)
        if known:
            return known
        name = self._name("RC")
        self.top.append(f"{name} = recoder({self._vocab(vocab)}, {element_type!r})")
        self._recoders[key] = name
        return name

    def _lookup(self, vocab: Vocab | None) -> list[str]:
        """Statements: `v` through the vocabulary (`Vocab.lookup`), its exact codes read
        in place; the call only for one with wildcards, when no exact code matches."""
        if vocab is None:
            return []
        name = self._vocab(vocab)
        key = ("exact", name, "")
        exact = self._recoders.get(key)
        if exact is None:
            exact = self._recoders[key] = self._name("VE")
            self.top.append(f"{exact} = {name}.exact")
        # (A test and an index are no call: `get` is one. The exact codes never change.)
        found = [f"if v in {exact}:", f"    v = {exact}[v][0]"]
        if not vocab.prefixes:
            return found
        # A wildcard answer already kept (`Vocab.matched`, a dict cleared in place, so
        # indexed once: another thread may clear it) is read in place too; a code that
        # matched nothing is kept as None; one not kept asks lookup.
        return [*found, "else:", "    try:", f"        h = {name}.matched[v]",
                "    except KeyError:", f"        h = {name}.lookup(v)",
                "    if h is not None:", "        v = h[0]"]

    def _convert(self, convert: str, location: str) -> list[str]:
        """Statements: `v` converted to its FHIR type (text is kept as it is: no call)."""
        if convert in AS_IS:
            return []
        call = ["try:", f"    v = {self._converter_object(convert)}(v)",
                "except ConversionError as exc:",
                f"    raise TranslationError({location}, exc.reason, v) from None"]
        if convert not in KEPT_BY_TEXT:
            return call
        # A pure conversion of text to text: its answers are kept by the text (a sender
        # sends the same few codes and systems in every message); refusals are not kept.
        # Found by indexing (a `try` costs nothing until it raises, a `get` is a call):
        # a text not kept raises once, then is kept (unless too long to keep).
        kept = f"{self._converter_object(convert)}_KEPT"
        return ["try:", f"    v = {kept}[v]", "except KeyError:", "    cv = v",
                *indent_lines(call, 1), f"    if len(cv) <= {_KEPT_LENGTH}:",
                f"        if len({kept}) >= {_KEPT}:",
                f"            {kept}.clear()  # bounded: the values of recent messages",
                f"        {kept}[cv] = v"]

    def with_vocabularies(self, vocabs: dict[str, Vocab]) -> Self:
        self._vocabs_by_name = vocabs
        self._recoders = {}
        return self
