"""v2 locations: one parser for the codec's terser paths, the tables' sources and the
places translation errors name (ERR-2)."""

from __future__ import annotations

import pytest

from gateway.hl7.location import (
    ComponentLocation,
    Location,
    error_location,
    parse_component,
    parse_location,
)


@pytest.mark.parametrize(("text", "location"), [
    ("MSH-9", Location("MSH", 1, 9)),
    ("PID-0", Location("PID", 1, 0)),
    ("PID-3(2).4", Location("PID", 1, 3, component=4, repetition=2)),
    ("PID-3(1)", Location("PID", 1, 3, repetition=1)),
    ("PID-3.4.2", Location("PID", 1, 3, 4, subcomponent=2)),
    ("OBX[3]-5", Location("OBX", 3, 5)),
    ("ZPI", Location("ZPI")),
])
def test_a_location_is_parsed_into_its_positions(text: str, location: Location) -> None:
    assert parse_location(text) == location


@pytest.mark.parametrize("text", ["MSH-9", "PID-3(2).4", "PID-3.4.2", "OBX[3]-5", "PID"])
def test_a_location_prints_as_it_was_written(text: str) -> None:
    assert str(parse_location(text)) == text


@pytest.mark.parametrize(("text", "location"), [
    ("PID-7", Location("PID", 1, 7)),
    ("PID-11.1", Location("PID", 1, 11, 1)),
    ("PID-3.4.1", Location("PID", 1, 3, 4, subcomponent=1)),
    # A data type inside a subcomponent (OBR-32.1 read as XCN, XCN.9 as HD): ERR-2 names
    # nothing deeper than the subcomponent.
    ("OBR-32.1.9.1", Location("OBR", 1, 32, 1, subcomponent=9)),
])
def test_an_error_location_is_the_deepest_position_err_can_name(
        text: str, location: Location) -> None:
    assert error_location(text) == location


@pytest.mark.parametrize("text", ["", "resourceType", "Bundle.entry[0]", "birthDate", "PID",
                                  "PID-3x", "PID-3.1x"])
def test_an_error_location_is_none_for_what_is_not_a_v2_position(text: str) -> None:
    assert error_location(text) is None


def test_a_data_type_component_is_its_own_kind_of_location() -> None:
    assert parse_component("CX.4") == ComponentLocation("CX", 4)
    assert parse_component("XAD.1.1") == ComponentLocation("XAD", 1, 1)
    assert str(parse_component("XAD.1.1")) == "XAD.1.1"
    assert parse_component("PID-3") is None
