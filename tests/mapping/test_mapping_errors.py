"""Mapping errors: one root in `gateway.mapping.errors`, every error under it;
each still importable from the module it was born in, with the base it had there."""

from __future__ import annotations

import importlib

import pytest

from gateway.mapping.errors import MappingError


@pytest.mark.parametrize(("module", "name", "base"), [
    ("gateway.mapping.errors", "TableError", ValueError),
    ("gateway.mapping.errors", "TableErrors", ValueError),
    ("gateway.mapping.errors", "TranslationError", ValueError),
    ("gateway.mapping.errors", "UnsupportedMessage", ValueError),
    ("gateway.mapping.errors", "UnsupportedResource", ValueError),
    ("gateway.mapping.conditions", "ConditionError", ValueError),
    ("gateway.mapping.convert", "ConversionError", ValueError),
])
def test_every_mapping_error_derives_from_the_root_and_keeps_its_old_path_and_base(
        module: str, name: str, base: type[Exception]) -> None:
    error = getattr(importlib.import_module("gateway.mapping.errors"), name)
    assert getattr(importlib.import_module(module), name) is error
    assert issubclass(error, MappingError) and issubclass(error, base)
