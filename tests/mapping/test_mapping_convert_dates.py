"""v2 DTM and DT to FHIR dateTime and date: the common full shapes (read without the
pattern) and every other shape answer as the HL7 v2.5.1 §2.A.22 (DTM) rules say."""

from __future__ import annotations

import pytest

from gateway.mapping.convert import ConversionError, date_time, to_date


@pytest.mark.parametrize(("text", "expected"), [
    ("20261126080000+0100", "2026-11-26T08:00:00+01:00"),
    ("20261126235960-1459", "2026-11-26T23:59:60-14:59"),
    ("20240229000000+0000", "2024-02-29T00:00:00+00:00"),
    ("20000229120000-0000", "2000-02-29T12:00:00-00:00"),
    ("20261126080000", "2026-11-26T08:00:00+05:30"),  # no offset: the site's
    ("202611260800", "2026-11-26T08:00:00+05:30"),
    ("20261126080000.1234+0100", "2026-11-26T08:00:00.1234+01:00"),
    ("2026112608+0100", "2026-11-26T08:00:00+01:00"),
    ("20261126", "2026-11-26"),
    ("202611", "2026-11"),
    (" 20261126080000+0100 ", "2026-11-26T08:00:00+01:00"),
])
def test_dtm_becomes_a_fhir_date_time(text: str, expected: str) -> None:
    assert date_time(text, "+05:30", "dateTime") == expected
    assert date_time(text, "+05:30", "dateTime") == expected  # the kept answer is the same


@pytest.mark.parametrize(("text", "reason"), [
    ("20230229000000+0100", "is not a valid date"),  # not a leap year
    ("19000229000000", "is not a valid date"),  # a century that is not a leap year
    ("20261326000000", "is not a valid date"),
    ("20261100000000", "is not a valid date"),
    ("20261131000000", "is not a valid date"),
    ("20261126240000", "is not a valid time"),
    ("20261126236000", "is not a valid time"),
    ("20261126235961", "is not a valid time"),
    ("20261126080000+1500", "has an invalid time-zone offset"),
    ("20261126080000+0160", "has an invalid time-zone offset"),
    ("20261126080000+010a", "is not a valid date/time"),
    ("2026112608000", "is not a valid date/time"),
    ("٢٠٢٦١١٢٦٠٨٠٠٠٠x", "is not a valid date/time"),
])
def test_dtm_that_is_no_date_time_is_refused_every_time(text: str, reason: str) -> None:
    for _ in range(2):  # a refusal is not kept as an answer
        with pytest.raises(ConversionError) as caught:
            date_time(text, "+05:30", "dateTime")
        assert caught.value.reason == reason


def test_an_instant_needs_a_time() -> None:
    assert date_time("20261126080000", "+01:00", "instant") == "2026-11-26T08:00:00+01:00"
    with pytest.raises(ConversionError, match="not precise enough"):
        date_time("20261126", "+01:00", "instant")


@pytest.mark.parametrize(("text", "expected"), [
    ("19800102", "1980-01-02"),
    ("20240229", "2024-02-29"),
    ("198001", "1980-01"),
    ("1980", "1980"),
    ("19800102083000+0100", "1980-01-02"),  # a DTM: the time is dropped
])
def test_dt_becomes_a_fhir_date(text: str, expected: str) -> None:
    assert to_date(text) == expected


@pytest.mark.parametrize("text", ["19800132", "20230229", "19801301", "19800100", "1980010 "])
def test_dt_that_is_no_date_is_refused(text: str) -> None:
    with pytest.raises(ConversionError, match="is not a valid date"):
        to_date(text)
