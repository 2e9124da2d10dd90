"""Differential tests: our HL7 v2 parse against hl7apy's, field by field, on every message of
the shared reference corpus (../shared/reference/messages, listed in SOURCES.tsv) and on our
own synthetic fixtures.

hl7apy is the oracle for structure: which segments, which fields, how many repetitions, and
the raw (still escaped) text of every component and subcomponent. Where hl7apy refuses a
message, the tables below say whether we refuse it too (and with which error) or accept it
on purpose, and why; a message that newly parses or newly fails on either side fails here.

How hl7apy's object model is read (it is built for validation, not for round trips):
- it drops blank (whitespace-only) fields, components and subcomponents that its datatype
  definitions name, so a blank value of ours is "absent" there;
- parts beyond what the version defines, or withdrawn ones, carry no position in hl7apy;
  they are matched to our non-blank parts in order;
- SI and NM leaves are stored as numbers (`0010` becomes 10), so they compare as numbers;
  date/time leaves compare as hl7apy writes them back (it keeps their format);
- hl7apy splits segments on CR only, so it is given the text with LF and CR LF made CR.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import pytest
from hl7apy.parser import get_message_info, parse_segment
from hl7apy.parser import parse_message as hl7apy_parse_message

from conftest import REFERENCE
from gateway.hl7.batch import split_messages
from gateway.hl7.delimiters import Delimiters
from gateway.hl7.errors import ErrorCode, Hl7ParseError
from gateway.hl7.location import parse_location
from gateway.hl7.message import Message, Segment, check_header, parse_message

CORPUS = REFERENCE
FIXTURES = Path(__file__).parents[1] / "messages"

# -- what is expected where hl7apy and we differ from the plain "both parse, both agree" ------


@dataclass(frozen=True)
class Refused:
    """hl7apy refuses the message and so do we: parse_message or check_header raises."""

    hl7apy_error: str
    step: str  # "parse_message" or "check_header": which of ours refuses
    code: ErrorCode
    location: str
    why: str


@dataclass(frozen=True)
class Accepted:
    """hl7apy refuses the message, we accept it on purpose; hl7apy is then asked differently."""

    hl7apy_error: str
    why: str
    # hl7apy is shown MSH-2 without its fifth (truncation) character.
    four_encoding_characters: bool = False
    # hl7apy reads each segment alone; one its version lacks, with the first later version
    # that defines it.
    segment_by_segment: bool = False


_DUPLICATE_ESCAPE = (
    "MSH-2 is ^~\\\\& (the Java test source's escaped backslash written out): five encoding "
    "characters with the escape character twice"
)
_VERSION_261 = "MSH-12 is 2.6.1, which is no HL7 version (parse succeeds, check_header refuses)"
_TRUNCATION_BEFORE_27 = (
    "MSH-2 ^~\\&# declares the v2.7 truncation character in a v2.5.1 or v2.3.1 message; "
    "hl7apy takes five encoding characters only from 2.7 on. These are the v2-to-FHIR IG's "
    "own benchmark messages, so we accept them"
)
_PRT_BEFORE_27 = "; they also carry PRT, which hl7apy knows only from v2.7"

HL7APY_REFUSES: dict[str, Refused | Accepted] = {
    "LinuxForHealth-hl7v2-fhir-converter/sample_unix.hl7#1": Refused(
        "InvalidEncodingChars", "parse_message", ErrorCode.DATA_TYPE_ERROR, "MSH-2",
        _DUPLICATE_ESCAPE),
    "LinuxForHealth-hl7v2-fhir-converter/Hl7ORUMessageTest_L305_ORU_R01.hl7#1": Refused(
        "InvalidEncodingChars", "parse_message", ErrorCode.DATA_TYPE_ERROR, "MSH-2",
        _DUPLICATE_ESCAPE),
    "medplum/hl7.test_ACK.hl7#1": Refused(
        "UnsupportedVersion", "check_header", ErrorCode.UNSUPPORTED_VERSION_ID, "MSH-12",
        _VERSION_261),
    "medplum/hl7.test_ACK_nonstandard_separators.hl7#1": Refused(
        "UnsupportedVersion", "check_header", ErrorCode.UNSUPPORTED_VERSION_ID, "MSH-12",
        _VERSION_261),
    "HL7-v2-to-fhir/test_conversions/OML_O21.hl7#1": Accepted(
        "InvalidEncodingChars", _TRUNCATION_BEFORE_27 + _PRT_BEFORE_27,
        four_encoding_characters=True, segment_by_segment=True),
    "HL7-v2-to-fhir/test_conversions/ORM_O01.hl7#1": Accepted(
        "InvalidEncodingChars", _TRUNCATION_BEFORE_27, four_encoding_characters=True),
    "HL7-v2-to-fhir/test_conversions/ORU_R01.hl7#1": Accepted(
        "InvalidEncodingChars", _TRUNCATION_BEFORE_27 + _PRT_BEFORE_27,
        four_encoding_characters=True, segment_by_segment=True),
    "LinuxForHealth-hl7v2-fhir-converter/FHIRConverterTest_L329_ORU_R01.hl7#1": Accepted(
        "InvalidName",
        "an SPM segment in a v2.3 message: hl7apy knows SPM only from v2.5 and refuses the "
        "whole message; we keep every segment", segment_by_segment=True),
}

# Parse succeeds, hl7apy agrees field by field; check_header refuses the empty MSH-10 (an
# MLLP-edge policy: no control id, no acknowledgement or de-duplication).
EMPTY_CONTROL_ID = frozenset({
    "LinuxForHealth-hl7v2-fhir-converter/HL7ConditionFHIRConversionTest_L247_ADT_A01_ADT_A01.hl7#1",
    "LinuxForHealth-hl7v2-fhir-converter/HL7OMLMessageTest_L112_OML_O21_OML_O21.hl7#1",
    "LinuxForHealth-hl7v2-fhir-converter/HL7OMLMessageTest_L190_OML_O21_OML_O21.hl7#1",
    "LinuxForHealth-hl7v2-fhir-converter/HL7MergeFHIRConversionTest_L34_ADT_A34.hl7#1",
    "LinuxForHealth-hl7v2-fhir-converter/Hl7MessageTest_L193_ADT_A01.hl7#1",
})

# -- the corpus --------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    data: bytes


def _corpus_rows() -> list[dict[str, str]]:
    if not (CORPUS / "SOURCES.tsv").is_file():
        return []
    with (CORPUS / "SOURCES.tsv").open(newline="", encoding="utf-8") as f:
        return [row for row in csv.DictReader(f, delimiter="\t") if row["kind"] == "hl7v2"]


def _cases(files: list[tuple[str, bytes]]) -> list[Case]:
    return [Case(f"{name}#{n}", unit)
            for name, data in files for n, unit in enumerate(split_messages(data), 1)]


CORPUS_ROWS = _corpus_rows()
CORPUS_CASES = _cases([(row["file"], (CORPUS / row["file"]).read_bytes()) for row in CORPUS_ROWS])
PARSEABLE_CASES = [case for case in CORPUS_CASES if not (
    isinstance(refusal := HL7APY_REFUSES.get(case.id), Refused)
    and refusal.step == "parse_message")]
FIXTURE_CASES = _cases([(p.name, p.read_bytes()) for p in sorted(FIXTURES.glob("codec_*.hl7"))])

needs_corpus = pytest.mark.skipif(not CORPUS_ROWS, reason=f"reference corpus not at {CORPUS}")


# -- reading hl7apy -----------------------------------------------------------------------

_POSITION = re.compile(r"_(\d+)$")


def _position(element: Any) -> int | None:
    match = _POSITION.search(element.name or "")
    return int(match.group(1)) if match else None


def _blank(text: str) -> bool:
    return not text.strip()


def _as_cr(text: str) -> str:
    return re.sub(r"\r\n|\n", "\r", text)


def _hl7apy_text(case: Case) -> str:
    return _as_cr(case.data.decode("utf-8", errors="replace"))


def _hl7apy_outcome(text: str) -> str:
    try:
        hl7apy_parse_message(text, find_groups=False)
    except Exception as exc:  # the oracle's own verdict is what is recorded, whatever it is
        return type(exc).__name__
    return "parsed"


def _leaf_equal(subcomponent: Any, ours: str) -> bool:
    datatype = subcomponent.value
    value = getattr(datatype, "value", datatype)
    if value is None:
        return ours == ""
    if isinstance(value, str):
        return value == ours
    if isinstance(value, int | Decimal):
        try:
            return Decimal(ours) == Decimal(value)
        except InvalidOperation:
            return False
    return bool(datatype.to_er7() == ours)


def _align(children: list[Any], items: list[str]) -> Iterator[tuple[int, Any, str]]:
    """Pair hl7apy's children with our parts (1-based position, child, our raw text)."""
    if all(_position(c) is None for c in children) and len(children) == len(items):
        # A primitive datatype or a Z-segment: hl7apy keeps every part, in order.
        yield from ((i, c, v) for i, (c, v) in enumerate(zip(children, items, strict=True), 1))
        return
    k = 0
    for i, value in enumerate(items, 1):
        child = children[k] if k < len(children) else None
        if child is not None and (_position(child) == i
                                  or (_position(child) is None and not _blank(value))):
            yield i, child, value
            k += 1
        elif not _blank(value):
            raise AssertionError(f"part {i} ({value!r}) is missing from hl7apy's parse")
    if k != len(children):
        raise AssertionError(f"hl7apy has parts we do not: {[c.to_er7() for c in children[k:]]}")


def _compare_segment(message: Message, segment: Segment, theirs: Any) -> list[str]:
    """Every difference between our segment and hl7apy's, as readable lines."""
    d = message.delimiters
    prefix = f"{segment.id}[{segment.occurrence}]"
    children = list(theirs.children)
    diffs: list[str] = []
    first = 1
    if segment.id == "MSH":
        for n in (1, 2):
            ours, their = message.get_raw(f"MSH-{n}"), children.pop(0).to_er7()
            if n == 2 and message.delimiters.truncation:
                # hl7apy may have been shown MSH-2 without the truncation character.
                their += message.delimiters.truncation * (len(their) == 4)
            if ours != their:
                diffs.append(f"MSH-{n}: ours {ours!r}, hl7apy {their!r}")
        first = 3
    k = 0
    for n in range(first, segment.field_count + 1):
        field = message.get_raw(f"{prefix}-{n}")
        if _blank(field):
            continue
        reps = field.split(d.repetition)
        group = children[k : k + len(reps)]
        k += len(reps)
        if len(group) != len(reps) or len({c.name for c in group}) != 1 or (
                _position(group[0]) not in (n, None)):
            diffs.append(f"{prefix}-{n}: ours {reps!r}, hl7apy {[c.to_er7() for c in group]!r}")
            return diffs
        for r, (their_rep, rep) in enumerate(zip(group, reps, strict=True), 1):
            diffs.extend(_compare_repetition(message, f"{prefix}-{n}({r})", their_rep, rep))
    if k != len(children):
        diffs.append(f"{prefix}: hl7apy has more fields {[c.to_er7() for c in children[k:]]}")
    return diffs


def _compare_repetition(message: Message, path: str, theirs: Any, rep: str) -> list[str]:
    d = message.delimiters
    diffs: list[str] = []
    try:
        for c, their_comp, comp in _align(list(theirs.children), rep.split(d.component)):
            for s, their_sub, sub in _align(list(their_comp.children), comp.split(d.subcomponent)):
                leaf = f"{path}.{c}.{s}"
                # The terser path reads the same text the split gives.
                assert message.get_raw(leaf) == sub, leaf
                if not _leaf_equal(their_sub, sub):
                    diffs.append(f"{leaf}: ours {sub!r}, hl7apy {their_sub.to_er7()!r}")
    except AssertionError as exc:
        diffs.append(f"{path}: {exc}")
    return diffs


# -- oracles for the messages hl7apy refuses but we accept -----------------------------


HL7APY_VERSIONS = ("2.1", "2.2", "2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6", "2.7", "2.8",
                   "2.8.1", "2.8.2")


def _without_truncation_character(text: str) -> str:
    msh, rest = text.split("\r", 1)
    fields = msh.split(msh[3])
    fields[1] = fields[1][:4]
    return msh[3].join(fields) + "\r" + rest


def _segment_by_segment(text: str) -> list[Any]:
    encoding_chars, _, version = get_message_info(text)
    later = HL7APY_VERSIONS[HL7APY_VERSIONS.index(version):]
    return [_parse_segment_in_first_version(line, later, encoding_chars)
            for line in text.split("\r") if line]


def _parse_segment_in_first_version(line: str, versions: tuple[str, ...],
                                    encoding_chars: dict[str, str]) -> Any:
    for version in versions:
        try:
            return parse_segment(line, version, encoding_chars)
        except Exception as exc:  # hl7apy's InvalidName: the segment is not in this version
            last = exc
    raise last


def _hl7apy_segments(case: Case, text: str) -> list[Any]:
    expected = HL7APY_REFUSES.get(case.id)
    if isinstance(expected, Accepted):
        if expected.four_encoding_characters:
            text = _without_truncation_character(text)
        if expected.segment_by_segment:
            return _segment_by_segment(text)
    return list(hl7apy_parse_message(text, find_groups=False).children)


def _differences(case: Case, message: Message) -> list[str]:
    text = _as_cr(message.to_text())
    theirs = _hl7apy_segments(case, text)
    ours = list(message.segments())
    if [s.id for s in ours] != [s.name for s in theirs]:
        return [f"segments: ours {[s.id for s in ours]}, hl7apy {[s.name for s in theirs]}"]
    diffs: list[str] = []
    for segment, their_segment in zip(ours, theirs, strict=True):
        diffs.extend(_compare_segment(message, segment, their_segment))
    return diffs


# -- the tests ------------------------------------------------------------------------------


@needs_corpus
def test_the_corpus_is_all_there() -> None:
    """The reference corpus has the files and messages SOURCES.tsv lists, and our tables name
    only messages that exist (a renamed file must not silently drop out of the tables)."""
    ids = {case.id for case in CORPUS_CASES}
    for row in CORPUS_ROWS:
        units = split_messages((CORPUS / row["file"]).read_bytes())
        assert len(units) == int(row["messages"]), row["file"]
    assert set(HL7APY_REFUSES) <= ids
    assert EMPTY_CONTROL_ID <= ids
    assert len(CORPUS_ROWS) >= 59


@needs_corpus
@pytest.mark.parametrize("case", CORPUS_CASES, ids=lambda c: c.id)
def test_corpus_message_parses_as_hl7apy_does(case: Case) -> None:
    text = _hl7apy_text(case)
    expected = HL7APY_REFUSES.get(case.id)
    assert _hl7apy_outcome(text) == (expected.hl7apy_error if expected else "parsed")

    if isinstance(expected, Refused):
        with pytest.raises(Hl7ParseError) as refused:
            message = parse_message(case.data)
            assert expected.step == "check_header", "parse_message should have refused"
            check_header(message.header)
        assert refused.value.code == expected.code
        assert str(refused.value.location) == expected.location
        return

    message = parse_message(case.data)
    if case.id in EMPTY_CONTROL_ID:
        with pytest.raises(Hl7ParseError) as refused:
            check_header(message.header)
        assert refused.value.code == ErrorCode.REQUIRED_FIELD_MISSING
        assert str(refused.value.location) == "MSH-10"
    else:
        check_header(message.header)
    assert _differences(case, message) == []


@pytest.mark.parametrize("case", FIXTURE_CASES, ids=lambda c: c.id)
def test_fixture_message_parses_as_hl7apy_does(case: Case) -> None:
    message = parse_message(case.data)
    check_header(message.header)
    assert _hl7apy_outcome(_as_cr(message.to_text())) == "parsed"
    assert _differences(case, message) == []


@needs_corpus
@pytest.mark.parametrize("case", PARSEABLE_CASES, ids=lambda c: c.id)
def test_corpus_message_serialises_to_the_same_bytes(case: Case) -> None:
    message = parse_message(case.data)
    assert message.encode() == case.data
    message.header  # noqa: B018 - reading the header changes nothing
    for segment in message.segments():  # neither does reading every field
        [segment.field(n) for n in range(segment.field_count + 1)]
    assert message.encode() == case.data


_TERMINATORS = re.compile(rb"\r\n|\r|\n")
NEW_VALUE = "Changed | ^ & ~ \\ value\nnext line é"


def _targets(message: Message) -> list[str]:
    """A header field, a field of the last segment and a deep PID path when there is one."""
    last = list(message.segments())[-1]
    paths = ["MSH-10", f"{last.id}[{last.occurrence}]-{max(last.field_count, 1)}"]
    if message.segment("PID") is not None:
        paths.append("PID-5(2).2.3")
    return paths


@needs_corpus
@pytest.mark.parametrize("case", PARSEABLE_CASES, ids=lambda c: c.id)
def test_changing_one_field_of_a_corpus_message_changes_only_that_field(case: Case) -> None:
    for path in _targets(parse_message(case.data)):
        message = parse_message(case.data)
        message.set(path, NEW_VALUE)
        changed = message.encode()

        before, after = parse_message(case.data), parse_message(changed)
        assert after.get(path) == NEW_VALUE
        assert _TERMINATORS.findall(changed) == _TERMINATORS.findall(case.data)
        old_segments, new_segments = list(before.segments()), list(after.segments())
        assert [s.id for s in new_segments] == [s.id for s in old_segments]
        target = parse_location(path)
        for old, new in zip(old_segments, new_segments, strict=True):
            for n in range(max(old.field_count, new.field_count) + 1):
                if (new.id, new.occurrence, n) == (target.segment, target.sequence,
                                                   target.field):
                    continue
                assert new.field(n) == old.field(n), (path, new.id, n)


@pytest.mark.parametrize("wrong", [
    # component and subcomponent separators swapped
    Delimiters(component="&", subcomponent="^"),
    # repetition read as plain text
    Delimiters(repetition="\x01"),
], ids=["components-swapped", "no-repetitions"])
def test_the_comparison_notices_a_wrong_parse(wrong: Delimiters) -> None:
    """The oracle is not vacuous: a message split with the wrong delimiters disagrees."""
    case = next(c for c in FIXTURE_CASES if c.id.startswith("codec_v2.5.1_adt_a01_escapes"))
    right = parse_message(case.data)
    assert _differences(case, right) == []
    assert _differences(case, Message(right.to_text(), wrong, right.charset)) != []
