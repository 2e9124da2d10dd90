"""A Translation's wire form (`gateway/canonical/wire.py`): every message of the corpus
comes back equal, built as the engine builds it; Decimals keep their digits, times their
offset, text its characters, whatever the nesting; contents JSON does not carry and
models not made by the engine come back equal too; bytes cut short, changed or of another
form are refused with `WireFormError`, whose text holds no value of the message."""

from __future__ import annotations

import pickle
import zlib
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from gateway.canonical import BusinessKey, Provenance, Resource, Translation, wire
from gateway.canonical.models import trusted_resource
from gateway.fhir.bundle import to_bundle
from gateway.hl7.message import parse_message
from support.mapping import translator

MESSAGES = Path(__file__).resolve().parent.parent / "messages"
RECEIVED = datetime(2026, 12, 7, 2, 30, 15, 123456, tzinfo=timezone(timedelta(hours=5, minutes=30)))


def _corpus() -> list[Path]:
    return sorted(MESSAGES.rglob("*.hl7"))


@pytest.fixture(scope="module")
def made() -> list[Translation]:
    engine = translator()
    translations = []
    for path in _corpus():
        raw = path.read_bytes().replace(b"\r\n", b"\r").replace(b"\n", b"\r")
        try:
            translations.append(engine.translate(parse_message(raw), RECEIVED))
        except Exception:  # noqa: BLE001 - a message the corpus keeps for its refusal
            continue
    return translations


def test_every_translation_of_the_corpus_comes_back_equal_as_the_engine_builds_it(
        made: list[Translation]) -> None:
    assert len(made) > 40
    decimals = 0
    for translation in made:
        encoded = wire.encode(translation)
        back = wire.decode(encoded)
        assert back == translation
        assert to_bundle(back) == to_bundle(translation)
        # Built as the engine builds them (the exact types), so written again it takes
        # the document form (not the whole-pickle one).
        assert encoded[:1] == wire._DOCUMENT
        assert wire.encode(back)[:1] == wire._DOCUMENT
        assert {id(r.provenance) for r in back.resources} == {id(back.provenance)}
        assert back.provenance.received_at.utcoffset() == timedelta(hours=5, minutes=30)
        for before, after in zip(translation.resources, back.resources, strict=True):
            assert type(after) is Resource and type(after.key) is type(before.key)
            assert _typed(after.content) == _typed(before.content)
            decimals += str(_typed(before.content)).count("Decimal")
    assert decimals > 0  # the corpus has FHIR decimals: they came back as Decimals


def test_the_wire_form_is_smaller_than_the_pickled_models(made: list[Translation]) -> None:
    for translation in made:
        pickled = pickle.dumps(translation, protocol=pickle.HIGHEST_PROTOCOL)
        assert len(wire.encode(translation)) < len(pickled)


def _typed(value: Any) -> Any:
    """The value with each leaf's type beside it, Decimals by their digits: what equality
    alone does not tell apart (Decimal("1.10") == Decimal("1.1") == 1.1, 1 == True)."""
    if isinstance(value, dict):
        return {k: _typed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_typed(v) for v in value]
    return (type(value).__name__, str(value))


def _provenance(received_at: datetime = RECEIVED) -> Provenance:
    return Provenance("SYNTHÄPP", "FAC", "W-1", "ORU^R01", received_at,
                      datetime(2026, 12, 7, 1, 0, tzinfo=UTC))


def _made(contents: list[dict[str, Any]], provenance: Provenance | None = None
          ) -> Translation:
    source = provenance or _provenance()
    resources = [trusted_resource("Observation", f"id-{n}", n % 2 == 0,
                                  BusinessKey("urn:sys", f"k-{n}") if n % 3 else None,
                                  content, source)
                 for n, content in enumerate(contents)]
    return Translation(source, resources, {"PID-10": 2, "ZPI": 1}, 3)


NESTED = {"code": {"coding": [{"system": "http://loinc.org", "code": "2345-7",
                               "display": "Glucose ümlaut 山田 🏥 \"quoted\" \\ \t"}]},
          "component": [{"valueQuantity": {"value": Decimal("95")}},
                        {"valueBoolean": False, "valueInteger": 0, "note": [[], {}]}],
          "empty": "", "nothing": None, "big": 2**62}


@pytest.mark.parametrize("contents", [
    [{"valueQuantity": {"value": Decimal("1.10"), "unit": "mg/dL"}}],
    [{"a": "JSON"}, {"value": Decimal("0.000")}, {"b": ["JSON", 1, True]},
     {"value": Decimal("-1E+3")}, {}],
    [NESTED, {"plain": "text"}],
    [{"effectiveDateTime": datetime(2026, 12, 7, 8, tzinfo=timezone(timedelta(hours=-4)))}],
    [{"huge": 2**70}],  # past orjson's integers: pickled
], ids=["decimal", "mixed", "nested", "datetime", "huge-int"])
def test_contents_come_back_with_their_types_and_digits(contents: list[dict[str, Any]]
                                                        ) -> None:
    translation = _made(contents)
    back = wire.decode(wire.encode(translation))
    assert back == translation
    assert [_typed(r.content) for r in back.resources] == [_typed(c) for c in contents]
    assert back.unmapped == {"PID-10": 2, "ZPI": 1} and back.unmapped_count == 3
    assert back.z_segments == 3
    assert back.provenance.received_at.tzinfo == RECEIVED.tzinfo
    assert back.provenance.received_at.microsecond == 123456
    assert [r.key for r in back.resources] == [r.key for r in translation.resources]
    assert {id(r.provenance) for r in back.resources} == {id(back.provenance)}


def test_a_decimal_keeps_its_trailing_zeros() -> None:
    back = wire.decode(wire.encode(_made([{"value": Decimal("1.10")}])))
    value = back.resources[0].content["value"]
    assert type(value) is Decimal and str(value) == "1.10"


class _Tagged(Resource):
    """A Resource of a caller's own, which may hold more than the engine's."""

    __slots__ = ("tag",)


def test_records_made_by_their_constructors_or_subclassed_come_back_equal() -> None:
    now = datetime(2026, 12, 7, tzinfo=UTC)
    source = Provenance(source_application="APP", source_facility="FAC", control_id="1",
                        message_type="ADT^A01", received_at=now, last_updated=now)
    resource = Resource(resource_type="Patient", id="p-1", primary=True,
                        key=BusinessKey(value="MRN-1"), content={"active": True},
                        provenance=source)
    translation = Translation(provenance=source, resources=[resource])
    encoded = wire.encode(translation)
    assert encoded[:1] == wire._DOCUMENT  # the exact types: as the engine's
    back = wire.decode(encoded)
    assert back == translation
    assert back.resources[0].key == BusinessKey("", "MRN-1")
    # A subclass's own slots would be lost as a document row: pickled whole instead.
    tagged = _Tagged("Patient", "p-2", True, content={}, provenance=source)
    tagged.tag = "kept"
    odd = Translation(source, [tagged])
    encoded = wire.encode(odd)
    assert encoded[:1] == wire._PICKLED
    back = wire.decode(encoded)
    assert type(back.resources[0]) is _Tagged and back.resources[0].tag == "kept"
    # A time in a named zone would lose its name as text: pickled whole as well.
    named = timezone(timedelta(hours=1), "CET")
    zoned = _made([{"a": "b"}], _provenance(datetime(2026, 12, 7, tzinfo=named)))
    back = wire.decode(wire.encode(zoned))
    assert back == zoned and back.provenance.received_at.tzname() == "CET"


def test_bytes_cut_short_changed_or_of_another_form_are_refused() -> None:
    translation = _made([NESTED, {"value": Decimal("1.10")}])
    encoded = wire.encode(translation)
    body = zlib.decompress(encoded[1:])
    wrong = [
        b"", encoded[:1], encoded[:len(encoded) // 2], encoded[:-1],
        encoded[:30] + bytes([encoded[30] ^ 0x01]) + encoded[31:],
        b"X" + encoded[1:],  # a form this code does not write
        pickle.dumps(translation),  # the form before
        b"J" + zlib.compress(body[:4] + b"{not json" + body[13:]),
        b"J" + zlib.compress(b"\x00\x00\x00\x02[]"),  # JSON, not a translation's
        b"P" + zlib.compress(pickle.dumps({"not": "a translation"})),
    ]
    for data in wrong:
        with pytest.raises(wire.WireFormError, match="not a translation's wire form") as e:
            wire.decode(data)
        assert "Glucose" not in str(e.value) and "1.10" not in str(e.value)
