"""The canonical records (`gateway/canonical/models.py`): their constructors refuse what is
not one, they compare by value, pickle back to their own types, and their text holds no
content (a record's content is PHI)."""

from __future__ import annotations

import pickle
from datetime import UTC, datetime
from typing import Any

import pytest

from gateway.canonical import BusinessKey, Provenance, Resource, Translation, trusted_resource

NOW = datetime(2026, 12, 7, tzinfo=UTC)
SOURCE = Provenance("APP", "FAC", "CTRL-1", "ADT^A01", NOW, NOW)


def _patient(**changes: Any) -> Resource:
    values: dict[str, Any] = {"resource_type": "Patient", "id": "p-1", "primary": True,
                              "key": BusinessKey("urn:sys", "MRN-1"),
                              "content": {"name": [{"family": "CANARYFAMILY"}]},
                              "provenance": SOURCE}
    values.update(changes)
    return Resource(**values)


@pytest.mark.parametrize("changes", [
    {"resource_type": None}, {"id": 7}, {"primary": "yes"}, {"key": ("urn:sys", "MRN-1")},
    {"content": [("name", "x")]}, {"provenance": ("APP", "FAC")},
], ids=["type", "id", "primary", "key-tuple", "content-list", "provenance-tuple"])
def test_a_resource_made_by_its_constructor_refuses_what_is_not_one(
        changes: dict[str, Any]) -> None:
    with pytest.raises(TypeError):
        _patient(**changes)


def test_a_translation_refuses_what_is_not_one() -> None:
    with pytest.raises(TypeError):
        Translation(("APP",), [])  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Translation(SOURCE, (_patient(),))  # type: ignore[arg-type]


def test_records_compare_by_value_and_the_engine_s_way_makes_an_equal_one() -> None:
    made = _patient()
    trusted = trusted_resource("Patient", "p-1", True, BusinessKey("urn:sys", "MRN-1"),
                               {"name": [{"family": "CANARYFAMILY"}]}, SOURCE)
    assert made == trusted
    assert made != _patient(id="p-2")
    assert made != _patient(content={})
    assert Translation(SOURCE, [made]) == Translation(SOURCE, [trusted], {}, 0)
    assert Translation(SOURCE, [made]) != Translation(SOURCE, [made], {"PID-10": 1})


def test_records_pickle_back_to_their_own_types() -> None:
    translation = Translation(SOURCE, [_patient(), _patient(id="p-2", key=None)], {"ZPI": 2}, 1)
    back = pickle.loads(pickle.dumps(translation, protocol=pickle.HIGHEST_PROTOCOL))
    assert back == translation
    assert type(back) is Translation and type(back.resources[0]) is Resource
    assert type(back.provenance) is Provenance and type(back.resources[0].key) is BusinessKey
    assert back.unmapped_count == 2 and back.z_segments == 1


def test_the_text_of_a_record_holds_no_content() -> None:
    made = _patient()
    for text in (repr(made), str(made), repr(Translation(SOURCE, [made]))):
        assert "CANARY" not in text and "MRN-1" not in text
    assert "Patient/p-1" in repr(made)
