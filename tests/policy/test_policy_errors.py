"""Policy errors: one root in `gateway.policy.errors`, every error under it;
each still importable from the module it was born in, with the base it had there."""

from __future__ import annotations

import importlib

import pytest

from gateway.policy.errors import PolicyError


@pytest.mark.parametrize(("module", "name", "base"), [
    ("gateway.policy.jose", "TokenError", Exception),
    ("gateway.policy.scopes", "ScopeError", ValueError),
    ("gateway.policy.scopes", "ScopeDenied", Exception),
    ("gateway.policy.profiles", "ProfileError", ValueError),
    ("gateway.policy.profiles", "ProfileDenied", LookupError),
])
def test_every_policy_error_derives_from_the_root_and_keeps_its_old_path_and_base(
        module: str, name: str, base: type[Exception]) -> None:
    error = getattr(importlib.import_module("gateway.policy.errors"), name)
    assert getattr(importlib.import_module(module), name) is error
    assert issubclass(error, PolicyError) and issubclass(error, base)
