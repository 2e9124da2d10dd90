"""Audit errors: one root in `gateway.audit.errors`, every error under it;
each still importable from the module it was born in, with the base it had there."""

from __future__ import annotations

import importlib

import pytest

from gateway.audit.errors import AuditError


@pytest.mark.parametrize(("module", "name", "base"), [
    ("gateway.audit.log", "AuditIntegrityError", Exception),
    ("gateway.audit.keys", "AuditKeyError", Exception),
    ("gateway.audit.query", "QueryError", ValueError),
    ("gateway.audit.export", "ExportFormatError", ValueError),
    ("gateway.audit.sealed", "RevealError", Exception),
])
def test_every_audit_error_derives_from_the_root_and_keeps_its_old_path_and_base(
        module: str, name: str, base: type[Exception]) -> None:
    error = getattr(importlib.import_module("gateway.audit.errors"), name)
    assert getattr(importlib.import_module(module), name) is error
    assert issubclass(error, AuditError) and issubclass(error, base)
