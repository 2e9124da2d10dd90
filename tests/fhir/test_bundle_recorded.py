"""The Provenance's recorded time is written as `isoformat(timespec="milliseconds")` writes
it, whatever the zone, though a UTC time comes from the latest second written out."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from hypothesis import given
from hypothesis import strategies as st

from gateway.fhir.bundle import _recorded

_zones = st.one_of(st.just(UTC), st.none(), st.builds(
    lambda minutes: timezone(timedelta(minutes=minutes)), st.integers(-23 * 60, 23 * 60)))


@given(st.datetimes(min_value=datetime(1900, 1, 1), max_value=datetime(2200, 1, 1)), _zones)
def test_recorded_is_isoformat_to_the_millisecond(at: datetime, zone: timezone | None) -> None:
    at = at.replace(tzinfo=zone)
    assert _recorded(at) == at.isoformat(timespec="milliseconds")


def test_times_of_one_second_and_the_next_keep_their_own_text() -> None:
    second = datetime(2026, 12, 6, 20, 59, 59, 999_999, tzinfo=UTC)
    for at in (second, second.replace(microsecond=0), second + timedelta(microseconds=1),
               second + timedelta(days=1), second):
        assert _recorded(at) == at.isoformat(timespec="milliseconds")
