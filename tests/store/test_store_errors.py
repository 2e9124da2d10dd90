"""Store errors: one root in `gateway.store.errors`, every error under it;
each still importable from the module it was born in, with the base it had there."""

from __future__ import annotations

import importlib

import pytest

from gateway.store.errors import StoreError, StoreUnavailable


@pytest.mark.parametrize(("module", "name", "base"), [
    ("gateway.store.errors", "StoreUnavailable", Exception),
    ("gateway.store.fhir", "WriteConflict", Exception),
    ("gateway.store.audit", "ChainConflict", StoreUnavailable),
])
def test_every_store_error_derives_from_the_root_and_keeps_its_old_path_and_base(
        module: str, name: str, base: type[Exception]) -> None:
    error = getattr(importlib.import_module("gateway.store.errors"), name)
    assert getattr(importlib.import_module(module), name) is error
    assert issubclass(error, StoreError) and issubclass(error, base)
