"""FHIR codec errors: one root in `gateway.fhir.errors`, every error under it;
each still importable from the module it was born in, with the base it had there."""

from __future__ import annotations

import importlib

import pytest

from gateway.fhir.errors import BodyError, FhirCodecError, FhirError, SearchError


@pytest.mark.parametrize(("module", "name", "base"), [
    ("gateway.fhir.outcome", "FhirError", Exception),
    ("gateway.fhir.guard", "BodyError", FhirError),
    ("gateway.fhir.guard", "BodyTooLarge", BodyError),
    ("gateway.fhir.guard", "BodyTooComplex", BodyError),
    ("gateway.fhir.guard", "BodyInvalid", BodyError),
    ("gateway.fhir.validate", "InvalidResource", ValueError),
    ("gateway.fhir.model", "UnknownElement", ValueError),
    ("gateway.fhir.search", "SearchError", ValueError),
    ("gateway.fhir.search", "SearchTableError", ValueError),
    ("gateway.fhir.search", "UnsupportedFormat", SearchError),
])
def test_every_fhir_error_derives_from_the_root_and_keeps_its_old_path_and_base(
        module: str, name: str, base: type[Exception]) -> None:
    error = getattr(importlib.import_module("gateway.fhir.errors"), name)
    assert getattr(importlib.import_module(module), name) is error
    assert issubclass(error, FhirCodecError) and issubclass(error, base)
