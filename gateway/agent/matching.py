"""Caller verification: does a Patient match what the caller said?

The rules (how names, phones, dates and the other factors are normalised) are the table
`mappings/agent/matching.csv`, which a site overrides with a file of the same path under
`mapping.site_dir`. Everything here is pure: no I/O but reading the table once.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from gateway.mapping.errors import TableError, TableErrors
from gateway.mapping.tables import SHIPPED, records, table_files

MATCHING_TABLE = "agent/matching.csv"
COLUMNS = ("factor", "rule", "value", "note")
# The second factors a caller may give beside the date of birth.
SECOND_FACTORS = ("phone", "mrn", "ssn_last4", "zip")
_RULES = {
    "name": ("fold_accents", "casefold", "ignore", "compare"),
    "phone": ("country_code", "compare"),
    "date": ("format",),
    "zip": ("digits",),
    "ssn_last4": ("system",),
    "mrn": ("type",),
}

Json = dict[str, Any]


@dataclass(frozen=True, slots=True)
class MatchingRules:
    """The normalisation rules, as the table says them."""

    fold_accents: bool = True
    casefold: bool = True
    ignored: str = "- '."
    country_code: str = "1"
    date_formats: tuple[str, ...] = ("%Y-%m-%d",)
    zip_digits: int = 5
    ssn_systems: tuple[str, ...] = ("http://hl7.org/fhir/sid/us-ssn",)
    mrn_types: tuple[str, ...] = ("MR",)

    @classmethod
    def load(cls, shipped: Path = SHIPPED, site: Path | None = None) -> MatchingRules:
        """Read the table (the site's file replacing the shipped one); TableErrors naming
        file:line for a rule it does not know."""
        path = table_files(shipped, site).get(MATCHING_TABLE)
        if path is None:
            raise TableErrors([TableError(shipped / MATCHING_TABLE, 0, "is missing")])
        return cls.from_rows(records(path, COLUMNS))

    @classmethod
    def from_rows(cls, rows: Iterable[tuple[Any, Mapping[str, str]]]) -> MatchingRules:
        values: dict[str, Any] = {"fold_accents": False, "casefold": False, "ignored": "",
                                  "date_formats": [], "ssn_systems": [], "mrn_types": []}
        errors: list[TableError] = []
        for where, row in rows:
            factor, rule, value = row["factor"].strip(), row["rule"].strip(), row["value"]
            if rule not in _RULES.get(factor, ()):
                errors.append(TableError(where.file, where.line,
                                         f"unknown rule '{rule}' for factor '{factor}'"))
                continue
            if rule in ("fold_accents", "casefold"):
                values[rule] = True
            elif rule == "ignore":
                values["ignored"] += value
            elif rule == "country_code":
                values["country_code"] = value.strip().lstrip("+")
            elif rule == "format":
                values["date_formats"].append(value.strip())
            elif rule == "digits":
                values["zip_digits"] = int(value) if value.strip().isdigit() else 5
            elif rule == "system":
                values["ssn_systems"].append(value.strip())
            elif rule == "type":
                values["mrn_types"].append(value.strip())
        if errors:
            raise TableErrors(errors)
        return cls(values["fold_accents"], values["casefold"], values["ignored"],
                   values.get("country_code", "1"), tuple(values["date_formats"]),
                   values.get("zip_digits", 5), tuple(values["ssn_systems"]),
                   tuple(values["mrn_types"]))

    # -- normalisers -------------------------------------------------------------------

    def name(self, text: str) -> str:
        if self.fold_accents:
            text = "".join(c for c in unicodedata.normalize("NFKD", text)
                           if not unicodedata.combining(c))
        if self.casefold:
            text = text.casefold()
        return "".join(c for c in text if c not in self.ignored).strip()

    def phone(self, text: str) -> str | None:
        """E.164 (+ and digits), or None when it cannot be one."""
        digits = re.sub(r"\D", "", text)
        if text.strip().startswith("+"):
            number = digits
        elif len(digits) == 10 and self.country_code:
            number = self.country_code + digits
        elif len(digits) == 11 and digits.startswith(self.country_code):
            number = digits
        else:
            return None
        return "+" + number if 8 <= len(number) <= 15 else None

    def date(self, text: str) -> str | None:
        """YYYY-MM-DD, or None when no format of the table reads it."""
        cleaned = " ".join(text.replace(",", " ").split())
        for form in self.date_formats:
            try:
                return datetime.strptime(cleaned, form).date().isoformat()
            except ValueError:
                continue
        return None

    def zip(self, text: str) -> str:
        return re.sub(r"\D", "", text)[: self.zip_digits]


@dataclass(frozen=True, slots=True)
class Claim:
    """What the caller said, normalised; `second` is (factor, normalised value)."""

    last_name: str
    first_name: str | None
    birth_date: str
    second: tuple[str, str]
    extra: Mapping[str, str] = field(default_factory=dict)


def patient_matches(rules: MatchingRules, patient: Json, claim: Claim) -> bool:
    """All factors match. Every factor is checked whatever the others gave, so the work
    does not depend on which one is wrong."""
    checks = [patient.get("birthDate") == claim.birth_date,
              _name_matches(rules, patient, claim),
              _second_matches(rules, patient, *claim.second)]
    return all(checks)


def _name_matches(rules: MatchingRules, patient: Json, claim: Claim) -> bool:
    found = False
    for name in _list(patient.get("name")):
        family = name.get("family") if isinstance(name, dict) else None
        if not isinstance(family, str) or rules.name(family) != claim.last_name:
            continue
        given = [g for g in _list(name.get("given")) if isinstance(g, str)]
        if claim.first_name is None or (given and rules.name(given[0]) == claim.first_name):
            found = True
    return found


def _second_matches(rules: MatchingRules, patient: Json, factor: str, value: str) -> bool:
    if factor == "phone":
        return any(isinstance(t, dict) and t.get("system") in (None, "phone")
                   and isinstance(t.get("value"), str) and rules.phone(t["value"]) == value
                   for t in _list(patient.get("telecom")))
    if factor == "zip":
        return any(isinstance(a, dict) and isinstance(a.get("postalCode"), str)
                   and rules.zip(a["postalCode"]) == value
                   for a in _list(patient.get("address")))
    identifiers = [i for i in _list(patient.get("identifier")) if isinstance(i, dict)]
    if factor == "ssn_last4":
        return any(i.get("system") in rules.ssn_systems and isinstance(i.get("value"), str)
                   and re.sub(r"\D", "", i["value"])[-4:] == value for i in identifiers)
    if factor == "mrn":
        return any(_type_code(i) in rules.mrn_types and isinstance(i.get("value"), str)
                   and normalised_mrn(i["value"]) == value for i in identifiers)
    return False


def normalised_mrn(text: str) -> str:
    """An MRN as compared: without spaces, case folded."""
    return "".join(text.split()).casefold()


def _type_code(identifier: Json) -> str | None:
    kind = identifier.get("type")
    for coding in _list(kind.get("coding") if isinstance(kind, dict) else None):
        if isinstance(coding, dict) and isinstance(coding.get("code"), str):
            return str(coding["code"])
    return None


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []
