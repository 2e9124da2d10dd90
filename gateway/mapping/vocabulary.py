"""Vocabulary tables compiled: v2 codes to FHIR codes (exact codes, then prefix wildcards
such as `HL7*`, then `*`), and back again for FHIR R4 -> HL7 v2."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from gateway.mapping.errors import TableError

if TYPE_CHECKING:
    from gateway.mapping.tables import Vocabulary

Json = dict[str, Any]
_MATCHED_KEPT = 4096  # wildcard answers kept per vocabulary
_UNSEEN = ("", "", "")  # compared by identity: no answer kept yet


class Vocab:
    """A compiled vocabulary: exact codes, then prefix wildcards (HL7*), then '*'."""

    def __init__(self, table: Vocabulary) -> None:
        self.name = table.name
        self.exact: dict[str, tuple[str, str, str]] = {}
        self.prefixes: list[tuple[str, tuple[str, str, str]]] = []
        self.reverse: dict[tuple[str, str], str] = {}
        for row in table.rows:
            target = (row.fhir_code, row.fhir_display, row.fhir_system)
            if row.code.endswith("*"):
                self.prefixes.append((row.code[:-1], target))
            else:
                self.exact[row.code] = target
                self.reverse.setdefault((row.fhir_system, row.fhir_code), row.code)
                self.reverse.setdefault(("", row.fhir_code), row.code)
        # Longest prefix first, so 'HL7*' wins over '*'.
        self.prefixes.sort(key=lambda p: -len(p[0]))
        self.matched: dict[str, tuple[str, str, str] | None] = {}

    @classmethod
    def from_parts(cls, name: str, exact: dict[str, tuple[str, str, str]],
                   prefixes: list[tuple[str, tuple[str, str, str]]],
                   reverse: dict[tuple[str, str], str]) -> Vocab:
        """A vocabulary compiled before (the generated source of `mapping.codegen`)."""
        vocab = cls.__new__(cls)
        vocab.name, vocab.exact, vocab.prefixes, vocab.reverse = name, exact, prefixes, reverse
        vocab.matched = {}
        return vocab

    def lookup(self, code: str) -> tuple[str, str, str] | None:
        hit = self.exact.get(code)
        if hit is not None or not self.prefixes:
            return hit
        # A sender names the same few namespaces (SYNTHHOSP, HL70203 ...) in every
        # message: the wildcard answer is kept rather than rebuilt each time.
        kept = self.matched.get(code, _UNSEEN)  # one read: another thread may clear it
        if kept is not _UNSEEN:
            return kept
        hit = self._by_prefix(code)
        if len(self.matched) >= _MATCHED_KEPT:
            self.matched.clear()  # unbounded input must not grow the table without end
        self.matched[code] = hit
        return hit

    def _by_prefix(self, code: str) -> tuple[str, str, str] | None:
        for prefix, (fhir_code, display, system) in self.prefixes:
            if code.startswith(prefix):
                rest = code[len(prefix):]
                return (fhir_code.replace("{*}", rest).replace("{code}", code),
                        display, system.replace("{*}", rest).replace("{code}", code))
        return None


def check_vocabulary(vocab: Vocabulary) -> list[TableError]:
    """Every problem of one vocabulary table (empty codes, a code listed twice, ...)."""
    errors: list[TableError] = []
    seen: dict[str, str] = {}
    for row in vocab.rows:
        if not row.code:
            errors.append(row.where.error("code is empty"))
        if not row.fhir_code:
            errors.append(row.where.error("fhir_code is empty"))
        if row.code in seen:
            same = seen[row.code] == row.fhir_code
            errors.append(row.where.error(
                f"code '{row.code}' is listed twice" + ("" if same else
                                                        " with different FHIR codes")))
        seen[row.code] = row.fhir_code
        if any(c.isspace() for c in row.fhir_system):
            errors.append(row.where.error("fhir_system is not a URI"))
    return errors


# -- v2 -> FHIR ----------------------------------------------------------------------------


def recoder(vocab: Vocab, element_type: str) -> Callable[[Any, str], Any] | None:
    """Translate the codings of a Coding/CodeableConcept through a vocabulary, keeping
    the sender's own coding after each translated one (an alternate coding, CWE.4, is
    translated too: `2^^^3` of visit priority is both `UR` and `EL`)."""
    def recode_coding(coding: Json) -> list[Json]:
        code = coding.get("code")
        if not code:
            return [coding]
        # `lookup`'s exact codes read in place: the call only for one with wildcards.
        hit = vocab.exact.get(code)
        if hit is None and vocab.prefixes:
            hit = vocab.lookup(code)
        if hit is None:
            return [coding]
        fhir_code, display, system = hit
        translated: Json = {"code": fhir_code}
        if system:
            translated = {"system": system, "code": fhir_code}
        if display:
            translated["display"] = display
        if translated.get("system") == coding.get("system") and fhir_code == code:
            return [{**coding, **translated}]
        return [translated, coding]

    if element_type == "CodeableConcept":
        def concept(value: Any, location: str) -> Any:
            codings = value.get("coding")
            if not codings:
                return value
            if len(codings) == 1:  # the usual concept: its one coding's, no comprehension
                value["coding"] = recode_coding(codings[0])
            else:
                value["coding"] = [out for coding in codings for out in recode_coding(coding)]
            return value
        return concept
    if element_type == "Coding":
        return lambda value, location: recode_coding(value)[0]
    if element_type == "code":
        def code(value: Any, location: str) -> Any:
            hit = vocab.lookup(value)
            return hit[0] if hit is not None else value
        return code
    return None


# -- FHIR -> v2 ----------------------------------------------------------------------------


def vocab_back(vocab: Vocab, system: str, code: str) -> str | None:
    """The v2 code for a FHIR code: exact rows, then prefix rows (`HL7*` <- `v2-{*}`)."""
    hit = vocab.reverse.get((system, code)) if system else None
    if hit is None:
        hit = vocab.reverse.get(("", code))
    if hit is not None:
        return hit
    for prefix, (fhir_code, _, _) in vocab.prefixes:
        if fhir_code == "{code}":
            continue  # '*' kept the code as sent: nothing to undo, and no v2 code to claim
        if "{*}" in fhir_code:
            before, _, after = fhir_code.partition("{*}")
            if code.startswith(before) and code.endswith(after) and \
                    len(code) > len(before) + len(after):
                return prefix + code[len(before):len(code) - len(after)]
    return None


def unrecode(vocab: Vocab, kind: str, value: Any) -> tuple[Any, bool]:
    """Undo the forward translation of a first coding: drop the coding the vocabulary
    added, or turn a FHIR-native code back into the v2 code."""
    if kind == "code":
        if isinstance(value, str):
            code = vocab_back(vocab, "", value)
            return (code, True) if code is not None else (value, False)
        return value, False
    if kind == "Coding" and isinstance(value, dict):
        code = vocab_back(vocab, str(value.get("system", "")), str(value.get("code", "")))
        if code is None:
            return value, False
        return {"code": code}, True
    if kind != "CodeableConcept" or not isinstance(value, dict):
        return value, False
    codings = value.get("coding")
    if not isinstance(codings, list) or not codings or not isinstance(codings[0], dict):
        return value, False
    kept = _without_translations(vocab, codings)
    if len(kept) < len(codings):
        return {**value, "coding": kept}, True
    first = codings[0]
    code = vocab_back(vocab, str(first.get("system", "")), str(first.get("code", "")))
    hit = vocab.lookup(code) if code is not None else None
    if code is None or hit is None:
        return value, False
    if code == first.get("code") and (hit[2] or None) == first.get("system"):
        return value, True  # the forward map merged the two codings into this one
    return {**value, "coding": [{"code": code}, *codings[1:]]}, True


def _without_translations(vocab: Vocab, codings: list[Any]) -> list[Any]:
    """The codings without those the forward map added: a coding directly followed by
    the sender's coding it translates."""
    kept: list[Any] = []
    for index, coding in enumerate(codings):
        following = codings[index + 1] if index + 1 < len(codings) else None
        if isinstance(coding, dict) and isinstance(following, dict):
            hit = vocab.lookup(str(following.get("code", "")))
            if hit is not None and hit[0] == coding.get("code") and (
                    hit[2] or None) == coding.get("system"):
                continue
        kept.append(coding)
    return kept
