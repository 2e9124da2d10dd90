"""Forwarding errors: one root in `gateway.forward.errors`, every error under it;
each still importable from the module it was born in, with the base it had there."""

from __future__ import annotations

import importlib

import pytest

from gateway.forward.errors import BackendUnavailable, ForwardError


@pytest.mark.parametrize(("module", "name", "base"), [
    ("gateway.forward.backend", "BackendUnavailable", Exception),
    ("gateway.forward.backend", "BackendTimeout", BackendUnavailable),
    ("gateway.forward.resilience", "BreakerOpen", Exception),
    ("gateway.forward.resilience", "RateLimited", Exception),
    ("gateway.forward.outbound_auth", "TokenUnavailable", Exception),
])
def test_every_forward_error_derives_from_the_root_and_keeps_its_old_path_and_base(
        module: str, name: str, base: type[Exception]) -> None:
    error = getattr(importlib.import_module("gateway.forward.errors"), name)
    assert getattr(importlib.import_module(module), name) is error
    assert issubclass(error, ForwardError) and issubclass(error, base)
