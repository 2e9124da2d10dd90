"""Every message of the shared reference corpus translates to valid FHIR R4, or is refused
clearly: as an unsupported type, or by the parser with a reason."""

from __future__ import annotations

import orjson
import pytest

from conftest import REFERENCE
from gateway.fhir.bundle import dumps, to_bundle
from gateway.fhir.validate import validate_resource
from gateway.hl7.batch import split_messages
from gateway.hl7.errors import Hl7Error
from gateway.hl7.message import parse_message
from gateway.mapping.errors import TranslationError, UnsupportedMessage
from support.mapping import translator

# The message types the issue requires; a corpus message of one of these must translate.
REQUIRED = frozenset({
    "ADT^A01", "ADT^A02", "ADT^A03", "ADT^A04", "ADT^A05", "ADT^A06", "ADT^A07", "ADT^A08",
    "ADT^A11", "ADT^A12", "ADT^A13", "ADT^A28", "ADT^A31", "ADT^A40", "ORU^R01", "ORM^O01",
    "OML^O21", "SIU^S12", "SIU^S13", "SIU^S14", "SIU^S15", "SIU^S17", "SIU^S26", "VXU^V04",
    "RDE^O11", "RDS^O13", "MDM^T02", "MDM^T11",
    # issue 14: every type of the FHIR-Converter corpus
    "ADT^A09", "ADT^A10", "ADT^A14", "ADT^A15", "ADT^A16", "ADT^A25", "ADT^A26", "ADT^A27",
    "ADT^A29", "ADT^A41", "ADT^A45", "ADT^A47", "ADT^A60", "SIU^S16", "MDM^T01", "MDM^T05",
    "MDM^T06", "MDM^T09", "MDM^T10", "RDE^O25", "OUL^R22", "OUL^R23", "OUL^R24", "BAR^P01",
    "BAR^P02", "BAR^P12", "DFT^P03", "DFT^P11", "OMG^O19", "REF^I12", "REF^I14",
})

# Corpus files the parser refuses, and why (they are refused with that reason, clearly).
REFUSED_BY_PARSER = {
    # MSH-2 holds a tab or repeats a character: no delimiters can be read from it.
    "LinuxForHealth-hl7v2-fhir-converter/Hl7ORUMessageTest_L305_ORU_R01.hl7":
        "encoding characters must be distinct punctuation characters",
    "LinuxForHealth-hl7v2-fhir-converter/sample_unix.hl7":
        "encoding characters must be distinct punctuation characters",
}

# Corpus messages whose data cannot be FHIR, refused with the location and reason (an ACK
# would say the same: AE naming the field). Accepting them would mean inventing values.
REFUSED_BY_TRANSLATION = {
    # The Guide's own samples carry a placeholder where the base64 document would be.
    "HL7-v2-to-fhir/samples/Message.hl7_MDM_T02.txt": "OBX[4]-5.5: value is not valid base64",
    "HL7-v2-to-fhir/test_conversions/MDM_T02.hl7": "OBX[4]-5.5: value is not valid base64",
    # Milliseconds without the '.' (17 digits): no HL7 DTM reading gives a time from it.
    "LinuxForHealth-hl7v2-fhir-converter/Hl7ImmunizationFHIRConversionTest_L661_VXU_V04_"
    "VXU_V04.hl7": "OBX[26]-5: value is not a valid date/time",
    # A nine-digit birth date: not YYYY, YYYYMM or YYYYMMDD.
    "python-hl7/sample_hl7.hl7": "PID-7: value is not a valid date",
}


def _corpus() -> list[tuple[str, int, bytes]]:
    found = []
    for path in sorted(REFERENCE.rglob("*")):
        if path.suffix not in (".hl7", ".txt") or not path.is_file():
            continue
        name = path.relative_to(REFERENCE).as_posix()
        for number, raw in enumerate(split_messages(path.read_bytes()), 1):
            found.append((name, number, raw))
    return found


CORPUS = _corpus() if REFERENCE.is_dir() else []
# Like the codec's differential test: a checkout without the shared corpus skips, and says so.
needs_corpus = pytest.mark.skipif(not CORPUS, reason=f"reference corpus not at {REFERENCE}")


@needs_corpus
def test_the_corpus_is_there() -> None:
    assert len(CORPUS) >= 60, f"expected the whole shared corpus at {REFERENCE}"


def test_every_required_type_is_mapped() -> None:
    assert REQUIRED <= set(translator().message_types)


@pytest.mark.parametrize(("name", "number", "raw"), CORPUS,
                         ids=[f"{n}#{i}" for n, i, _ in CORPUS])
def test_each_corpus_message_translates_validly_or_is_refused_clearly(
        name: str, number: int, raw: bytes) -> None:
    try:
        message = parse_message(raw)
        message_type = message.header.message_type
    except Hl7Error as exc:
        assert REFUSED_BY_PARSER.get(name) == exc.reason, exc.reason
        return
    assert name not in REFUSED_BY_PARSER
    try:
        translation = translator().translate(message)
    except UnsupportedMessage as exc:
        assert message_type not in REQUIRED, f"{message_type} must translate"
        assert message_type in str(exc)
        return
    except TranslationError as exc:
        assert REFUSED_BY_TRANSLATION.get(name) == exc.safe_text, exc.safe_text
        return
    assert name not in REFUSED_BY_TRANSLATION, "now translates: take it off the list"
    bundle = orjson.loads(dumps(to_bundle(translation)))
    validate_resource(bundle)
    assert bundle["type"] == "transaction"
    types = [e["resource"]["resourceType"] for e in bundle["entry"]]
    assert types[-1] == "Provenance"
    assert len(types) >= 2, "a supported message yields at least one resource"
