"""Checking a webhook's signature and reading its event, without sockets: the signature
forms senders use, the timestamp window, JSON pointers and templates, and the shape
tables' checks naming file and line."""

from __future__ import annotations

import base64
import hashlib
import hmac
from pathlib import Path

import pytest

from gateway.config import InboundWebhookConfig
from gateway.ingest.webhook_events import (
    MalformedEvent,
    direct_rule,
    load_shape,
    reader,
    resolve,
)
from gateway.ingest.webhooks import SignatureRefused, Signing
from gateway.mapping.errors import TableError
from gateway.mapping.tables import SHIPPED

SECRET = b"synthetic-secret"
BODY = b'{"id":"e1"}'
DIGEST = hmac.new(SECRET, BODY, hashlib.sha256).digest()


def signing(scheme: str = "hmac-sha256") -> Signing:
    return Signing(SECRET, scheme, "X-Signature", "X-Timestamp", 300.0)  # type: ignore[arg-type]


@pytest.mark.parametrize("header", [
    DIGEST.hex(), "sha256=" + DIGEST.hex(), base64.b64encode(DIGEST).decode(),
    "sha256=" + "0" * 64 + ", sha256=" + DIGEST.hex(),  # a secret being rotated
])
def test_signature_forms_senders_use_verify(header: str) -> None:
    signing().verify({"X-Signature": header}, BODY)


@pytest.mark.parametrize("header", ["", "sha256=", "0" * 64, DIGEST.hex()[:-2],
                                    "sha1=" + DIGEST.hex(), "not base64 at all!!!!!!!!"])
def test_wrong_or_missing_signatures_are_refused(header: str) -> None:
    with pytest.raises(SignatureRefused):
        signing().verify({"X-Signature": header} if header else {}, BODY)


def test_timestamped_signature_and_window() -> None:
    stamp = "1900000000"
    signed = hmac.new(SECRET, stamp.encode() + b"." + BODY, hashlib.sha256).hexdigest()
    headers = {"X-Signature": signed, "X-Timestamp": stamp}
    signing("hmac-sha256-timestamp").verify(headers, BODY, now=lambda: 1900000100.0)
    with pytest.raises(SignatureRefused, match="tolerance"):
        signing("hmac-sha256-timestamp").verify(headers, BODY, now=lambda: 1900000301.0)
    with pytest.raises(SignatureRefused, match="readable"):
        signing("hmac-sha256-timestamp").verify({"X-Signature": signed}, BODY)
    with pytest.raises(SignatureRefused, match="does not match"):  # body alone signed
        signing("hmac-sha256-timestamp").verify(
            {"X-Signature": DIGEST.hex(), "X-Timestamp": stamp}, BODY,
            now=lambda: 1900000000.0)


def test_json_pointer_escapes_and_indexes() -> None:
    document = {"a/b": {"m~n": [10, {"x": "y"}]}}
    assert resolve(document, "/a~1b/m~0n/1/x") == "y"
    assert resolve(document, "/a~1b/m~0n/5") is None
    assert resolve(document, "/missing/x") is None


def test_direct_settings_read_every_event() -> None:
    read = reader([direct_rule("/meta/event", "/target")], "https://ehr.example/fhir")
    found = read.read({"meta": {"event": 42}, "target": {"reference": "Encounter/e-1"}})
    assert found is not None
    assert (found.event_id, found.path, found.kind) == ("42", "Encounter/e-1",
                                                        "resource.changed")
    with pytest.raises(MalformedEvent, match="/meta/event"):
        read.read({"target": "Encounter/e-1"})
    with pytest.raises(MalformedEvent, match="not on this backend"):
        read.read({"meta": {"event": 1}, "target": "https://ehr.example/fhirx/Encounter/1"})


def test_shipped_shapes_load_and_read_their_examples() -> None:
    sched = reader(load_shape("scheduling", SHIPPED), "https://p.example/fhir")
    found = sched.read({"event_id": "whk_1", "event_type": "appointment.cancelled",
                        "data": {"appointment": {"id": "A-7"}}})
    assert found is not None and (found.kind, found.path) == ("appointment.updated",
                                                               "Appointment/A-7")
    ehr = reader(load_shape("ehr-changed", SHIPPED), "https://ehr.example/fhir")
    assert ehr.read({"id": "p", "type": "ping"}) is None
    with pytest.raises(MalformedEvent, match="no rule"):
        ehr.read({"id": "p", "type": "other"})


@pytest.mark.parametrize(("row", "reason"), [
    ("type=x,/id,/r,,resource.updated,", "when is /pointer=value"),
    ("/type=x,id,/r,,resource.updated,", "event_id is a JSON pointer"),
    ("/type=x,/id,Patient/1,,resource.updated,", "resource is a JSON pointer"),
    ("/type=x,/id,/r,Patientish,resource.updated,", "not a FHIR R4 resource type"),
    ("/type=x,/id,/r,,Bad Kind,", "event is a kind"),
])
def test_a_bad_shape_row_is_named_by_file_and_line(tmp_path: Path, row: str,
                                                   reason: str) -> None:
    (tmp_path / "webhooks").mkdir()
    (tmp_path / "webhooks" / "site.csv").write_text(
        "when,event_id,resource,resource_type,event,note\n# a comment\n" + row + "\n")
    with pytest.raises(TableError) as caught:
        load_shape("site", SHIPPED, tmp_path)
    assert caught.value.line == 3 and reason in caught.value.reason
    assert caught.value.file.endswith("webhooks/site.csv")


@pytest.mark.parametrize(("settings", "reason"), [
    ({"secret_env": "X", "event_id": "/id"}, "event_id and resource are needed"),
    ({"secret_env": "X", "event_id": "id", "resource": "/r"}, "JSON pointer"),
    ({"secret_env": "X", "event_id": "/id", "resource": "Patient/1"}, "URL template"),
    ({"secret_env": "not a name", "shape": "scheduling"}, "environment variable"),
    ({"secret_env": "X", "shape": "x", "signature": "md5"}, "signature"),
])
def test_webhook_settings_are_checked(settings: dict[str, str], reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        InboundWebhookConfig(**settings)  # type: ignore[arg-type]
