"""Edge errors: one root in `gateway.edge.errors`, every error under it;
each still importable from the module it was born in, with the base it had there."""

from __future__ import annotations

import importlib

import pytest

from gateway.edge.errors import EdgeError


@pytest.mark.parametrize(("module", "name", "base"), [
    ("gateway.edge.auth", "AuthError", Exception),
    ("gateway.edge.auth_server", "OAuthError", Exception),
    ("gateway.edge.auth_server", "AuthSetupError", ValueError),
    ("gateway.edge.fhir_errors", "Passthrough", Exception),
    ("gateway.edge.fhir_errors", "BackendFailed", Exception),
])
def test_every_edge_error_derives_from_the_root_and_keeps_its_old_path_and_base(
        module: str, name: str, base: type[Exception]) -> None:
    error = getattr(importlib.import_module("gateway.edge.errors"), name)
    assert getattr(importlib.import_module(module), name) is error
    assert issubclass(error, EdgeError) and issubclass(error, base)
