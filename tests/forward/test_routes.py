"""Routing: [[backends]] and [[routes]] as written in the config, and what they decide."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway.config import ConfigError, load_settings
from gateway.forward.routes import LOCAL, Route, Router, Targets

ISSUE_EXAMPLE = """
[[backends]]
name = "ehr"
kind = "fhir"                      # fhir | mllp | local
base_url = "https://ehr.example/fhir/r4"
auth = { kind = "smart-backend", client_id = "isthmus", private_key_file = "keys/ehr.pem", \
token_url = "https://ehr.example/oauth/token", \
scopes = "system/Patient.rs system/Appointment.cruds" }
rate_limit = "5000/hour"

[[backends]]
name = "lab"
kind = "mllp"
host = "127.0.0.1"
port = 2600

[[routes]]
match = { message = "ADT^*", sender = "EPIC" }
to = ["ehr", "local"]

[[routes]]
match = { message = "ORU^R01" }
to = ["lab"]

[[routes]]
match = { resource = "Appointment", interaction = "create" }
to = ["ehr"]
"""


def _router(settings: Any) -> Router:
    routes = tuple(Route(to=r.to, **r.match.model_dump()) for r in settings.routes)
    return Router(routes, {b.name: b.kind for b in settings.backends})


def test_the_issue_example_loads_and_routes(tmp_path: Path) -> None:
    config = tmp_path / "isthmus.toml"
    config.write_text(ISSUE_EXAMPLE)
    settings = load_settings(config, environ={})
    ehr = settings.backends[0]
    assert (ehr.kind, ehr.rate_limit, ehr.auth.kind) == ("fhir", "5000/hour", "smart-backend")
    router = _router(settings)
    assert router.for_message("ADT^A01", "EPIC", "HOSP") == Targets(
        local=True, remote=("ehr",), needs_bundle=True)
    assert router.for_message("ADT^A08", "CERNER", "HOSP") == Targets(local=True)
    assert router.for_message("ORU^R01", "LAB", "X") == Targets(local=False, remote=("lab",))
    assert router.for_request("Appointment", "create") == "ehr"
    assert router.for_request("Appointment", "read") == LOCAL
    assert router.for_request("Patient", "create") == LOCAL
    assert router.remote_types


@pytest.mark.parametrize(("pattern", "message_type", "fits"), [
    ("ADT^*", "ADT^A01", True),
    ("ADT^*", "ORU^R01", False),
    ("ORU^R0?", "ORU^R01", True),
    ("ORU^R0?", "ORU^R30", False),
    ("*", "SIU^S12", True),
    ("adt^*", "ADT^A01", False),  # case-sensitive, as HL7 codes are
])
def test_message_patterns(pattern: str, message_type: str, fits: bool) -> None:
    router = Router((Route(to=("ehr",), message=pattern),), {"ehr": "fhir"})
    assert (router.for_message(message_type, "APP", "FAC").remote == ("ehr",)) is fits


@pytest.mark.parametrize(("route", "interaction", "fits"), [
    ("", "read", True),
    ("*", "delete", True),
    ("write", "create", True),
    ("write", "update", True),
    ("write", "delete", True),
    ("write", "read", False),
    ("write", "search", False),
    ("search", "search", True),
    ("search", "read", False),
])
def test_request_interactions(route: str, interaction: str, fits: bool) -> None:
    router = Router((Route(to=("ehr",), resource="Appointment", interaction=route),),
                    {"ehr": "fhir"})
    assert (router.for_request("Appointment", interaction) == "ehr") is fits


def test_first_matching_route_wins_and_sender_facility_patterns() -> None:
    router = Router((
        Route(to=("a",), message="ADT^*", sender="EPIC*", facility="NORTH"),
        Route(to=("b", "local"), message="ADT^*"),
    ), {"a": "mllp", "b": "fhir"})
    assert router.for_message("ADT^A01", "EPICPROD", "NORTH").remote == ("a",)
    assert router.for_message("ADT^A01", "EPICPROD", "SOUTH") == Targets(
        local=True, remote=("b",), needs_bundle=True)


def test_untranslated_message_keeps_only_mllp_targets() -> None:
    router = Router((Route(to=("ehr", "lab"), message="*"),), {"ehr": "fhir", "lab": "mllp"})
    targets = router.for_message("ZZZ^Z01", "A", "F")
    assert targets.needs_bundle
    assert router.untranslated(targets) == Targets(local=False, remote=("lab",))


BAD_CONFIGS = [
    ({"routes": [{"match": {"message": "ADT^*"}, "to": ["nowhere"]}]},
     "backend 'nowhere' is not defined"),
    ({"routes": [{"match": {"message": "ADT^*", "resource": "Patient"}, "to": ["local"]}]},
     "not both or neither"),
    ({"routes": [{"match": {}, "to": ["local"]}]}, "not both or neither"),
    ({"routes": [{"match": {"message": "ADT^*"}, "to": []}]}, "routes.0.to"),
    ({"backends": [{"name": "ehr", "kind": "fhir", "base_url": "http://ehr.example/fhir"}]},
     "allow_insecure_http"),
    ({"backends": [{"name": "ehr", "kind": "fhir", "base_url": "ftp://ehr.example/"}]},
     "http(s) URL"),
    ({"backends": [{"name": "ehr", "kind": "fhir", "base_url": "https://ehr.example/",
                    "verify_tls": False}]}, "verify_tls = false"),
    ({"backends": [{"name": "lab", "kind": "mllp", "host": "lab.example"}]},
     "needs host and port"),
    ({"backends": [{"name": "a", "kind": "mllp", "host": "h", "port": 1},
                   {"name": "a", "kind": "mllp", "host": "h", "port": 2}]}, "unique"),
    ({"backends": [{"name": "ehr", "kind": "fhir", "base_url": "https://e/",
                    "rate_limit": "5000 per hour"}]}, "rate_limit"),
    ({"backends": [{"name": "ehr", "kind": "fhir", "base_url": "https://e/",
                    "auth": {"kind": "smart-backend", "client_id": "x"}}]},
     "smart-backend needs"),
    ({"backends": [{"name": "ehr", "kind": "fhir", "base_url": "https://e/",
                    "auth": {"kind": "client-credentials", "client_id": "x",
                             "token_url": "https://e/token"}}]},
     "client-credentials needs"),
    ({"backends": [{"name": "lab", "kind": "mllp", "host": "h", "port": 1}],
      "routes": [{"match": {"resource": "Patient"}, "to": ["lab"]}]},
     "cannot go to the mllp backend"),
]


@pytest.mark.parametrize(("overrides", "reason"), BAD_CONFIGS)
def test_bad_forwarding_config_names_the_problem(overrides: dict[str, Any],
                                                 reason: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_settings(None, environ={}, overrides=overrides)
    assert reason in str(error.value)


def test_plain_http_allowed_for_loopback_or_with_the_explicit_setting() -> None:
    settings = load_settings(None, environ={}, overrides={"backends": [
        {"name": "a", "kind": "fhir", "base_url": "http://127.0.0.1:9/fhir"},
        {"name": "b", "kind": "fhir", "base_url": "http://ehr.example/fhir",
         "allow_insecure_http": True},
    ]})
    assert [b.insecure for b in settings.backends] == [False, True]
