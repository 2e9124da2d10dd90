"""The remote FHIR backend against the fake EHR: breaker, retries only where safe,
Retry-After, rate limit, bulkhead, timeouts, TLS and mTLS, trace propagation with
PHI-free spans, and the outbox's delivery verdicts."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import orjson
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from opentelemetry import trace
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from gateway.edge.tls import server_context
from gateway.forward.backend import (
    BackendTimeout,
    BackendUnavailable,
    Delivered,
    Delivery,
    Permanent,
    Retry,
)
from gateway.forward.fhir_backend import (
    FhirBackend,
    FhirBackendSpec,
    client_ssl_context,
    is_idempotent,
    url_template,
)
from gateway.forward.outbound_auth import AuthSpec
from gateway.telemetry import Telemetry, configure
from support.builders import patient
from support.fake_ehr import FAILURE_DIAGNOSTICS, FakeEhr

CANARY = "CANARY-7731"
PATIENT = patient("MRN-0001", system="urn:synthetic:mrn", family="Synthetic", given=["Test"])


@dataclass
class Recorded:
    telemetry: Telemetry
    spans: InMemorySpanExporter
    metrics: InMemoryMetricReader

    def attempts(self) -> list[ReadableSpan]:
        return [s for s in self.spans.get_finished_spans() if s.name == "forward.attempt"]

    def points(self, name: str) -> list[tuple[dict[str, Any], float]]:
        found: list[tuple[dict[str, Any], float]] = []
        data = self.metrics.get_metrics_data()
        for resource in data.resource_metrics if data is not None else ():
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name == name:
                        for point in metric.data.data_points:
                            value = getattr(point, "value", None)
                            if value is None:
                                value = getattr(point, "count", 0)
                            found.append((dict(point.attributes or {}), float(value)))
        return found

    def total(self, name: str) -> float:
        return sum(value for _, value in self.points(name))


@pytest.fixture
def recorded() -> Iterator[Recorded]:
    spans, metrics = InMemorySpanExporter(), InMemoryMetricReader()
    telemetry = configure("none", span_exporter=spans, metric_reader=metrics)
    yield Recorded(telemetry, spans, metrics)
    telemetry.shutdown()


@pytest.fixture
async def ehr() -> AsyncIterator[FakeEhr]:
    fake = FakeEhr()
    await fake.start()
    yield fake
    await fake.stop()


FAST = {"backoff_base": 0.01, "backoff_max": 0.05, "connect_timeout": 1.0,
        "read_timeout": 2.0, "breaker_reset": 0.2}


@asynccontextmanager
async def backend_for(url: str, telemetry: Telemetry | None = None,
                      **overrides: Any) -> AsyncIterator[FhirBackend]:
    spec = FhirBackendSpec(name="ehr", base_url=url, **{**FAST, **overrides})
    backend = await FhirBackend.open(spec, telemetry or configure("none"))
    try:
        yield backend
    finally:
        await backend.close()


def bundle(*entries: dict[str, Any]) -> bytes:
    return orjson.dumps({"resourceType": "Bundle", "type": "transaction",
                         "entry": list(entries)})


def conditional_patient(mrn: str, family: str = "Synthetic") -> dict[str, Any]:
    return {"fullUrl": "urn:uuid:0f0e0d0c-0000-4000-8000-000000000001",
            "resource": patient(mrn, system="urn:synthetic:mrn", family=family),
            "request": {"method": "PUT", "url": f"Patient?identifier=urn:synthetic:mrn|{mrn}"}}


def delivery(payload: bytes, outbox_id: int = 17, traceparent: str = "") -> Delivery:
    return Delivery(outbox_id=outbox_id, inbox_id=5, backend="ehr", attempt=1,
                    payload=payload, control_id="CTRL-1", traceparent=traceparent)


# -- pure parts ---------------------------------------------------------------------------


@pytest.mark.parametrize(("path", "template"), [
    ("", ""),
    ("metadata", "metadata"),
    ("Patient", "Patient"),
    ("Patient/123", "Patient/{id}"),
    ("Patient/Abc-9.x", "Patient/{id}"),
    (f"Patient/{CANARY}", "Patient/{id}"),
    ("Patient/123/_history/4", "Patient/{id}/_history/{vid}"),
    ("Patient/123/_history", "Patient/{id}/_history"),
    ("Patient/_search", "Patient/_search"),
    ("Patient/123/$everything", "Patient/{id}/$everything"),
    ("Patient/123/Observation", "Patient/{id}/Observation"),
    ("Observation/$lastn", "Observation/$lastn"),
    (f"Patient?identifier={CANARY}", "Patient"),
    ("123", "{id}"),
])
def test_url_template_replaces_ids(path: str, template: str) -> None:
    assert url_template(path) == template


@pytest.mark.parametrize(("method", "path", "headers", "expected"), [
    ("GET", "Patient/1", {}, True),
    ("PUT", "Patient/1", {}, True),
    ("DELETE", "Patient/1", {}, True),
    ("POST", "Patient", {}, False),
    ("POST", "Patient", {"If-None-Exist": "identifier=a|b"}, True),
    ("POST", "Patient", {"if-none-exist": "identifier=a|b"}, True),
    ("POST", "Patient/_search", {}, True),
    ("POST", "", {}, False),
    ("PATCH", "Patient/1", {}, False),
])
def test_which_requests_are_idempotent(method: str, path: str, headers: dict[str, str],
                                       expected: bool) -> None:
    assert is_idempotent(method, path, headers) is expected


# -- the breaker --------------------------------------------------------------------------


async def test_breaker_opens_after_n_failures_and_refuses_without_the_network(
        ehr: FakeEhr, recorded: Recorded) -> None:
    ehr.fail_all(500)
    async with backend_for(ehr.url, recorded.telemetry, breaker_failures=3,
                           breaker_reset=30.0, max_retries=0) as backend:
        for _ in range(3):
            assert (await backend.request("GET", "Patient/p1")).status == 500
        assert backend.breaker_state == "open"
        started = time.monotonic()
        for _ in range(20):
            with pytest.raises(BackendUnavailable) as refused:
                await backend.request("GET", "Patient/p1")
        elapsed = time.monotonic() - started
        assert refused.value.reason == "circuit breaker open"
        assert 29.0 < refused.value.retry_after <= 30.0
        assert 29.0 < backend.available_in() <= 30.0
        states = recorded.points("isthmus.forward.breaker_state")
    assert elapsed < 0.1
    assert len(ehr.requests) == 3
    assert states == [({"forward.backend": "ehr"}, 2.0)]


async def test_breaker_recovers_through_a_single_half_open_probe(ehr: FakeEhr) -> None:
    ehr.fail_all(503)
    async with backend_for(ehr.url, breaker_failures=2, breaker_reset=0.2,
                           max_retries=0) as backend:
        for _ in range(2):
            await backend.request("GET", "Patient/p1")
        assert backend.breaker_state == "open"
        ehr.fail_all(None)
        # The reset timeout is the behaviour under test; the breaker reads the wall clock.
        await asyncio.sleep(0.22)
        assert backend.breaker_state == "half-open"
        ehr.delay = 0.05  # the probe is still out while the others arrive
        results = await asyncio.gather(*(backend.request("GET", "Patient/p1")
                                         for _ in range(5)), return_exceptions=True)
        statuses = [r.status for r in results if not isinstance(r, BaseException)]
        refused = [r for r in results if isinstance(r, BackendUnavailable)]
        assert statuses == [404] and len(refused) == 4  # the probe, and 4 turned away
        assert len(ehr.requests) == 3
        assert backend.breaker_state == "closed"
        assert (await backend.request("GET", "Patient/p1")).status == 404


async def test_a_failed_probe_opens_the_breaker_again(ehr: FakeEhr) -> None:
    ehr.fail_all(502)
    async with backend_for(ehr.url, breaker_failures=1, breaker_reset=0.1,
                           max_retries=0) as backend:
        await backend.request("GET", "Patient/p1")
        # The reset timeout is the behaviour under test; the breaker reads the wall clock.
        await asyncio.sleep(0.12)
        assert (await backend.request("GET", "Patient/p1")).status == 502
        assert backend.breaker_state == "open"
        with pytest.raises(BackendUnavailable):
            await backend.request("GET", "Patient/p1")
    assert len(ehr.requests) == 2


async def test_client_errors_do_not_open_the_breaker(ehr: FakeEhr) -> None:
    async with backend_for(ehr.url, breaker_failures=2) as backend:
        for _ in range(5):
            assert (await backend.request("GET", "Patient/none")).status == 404
        assert backend.breaker_state == "closed"


# -- retries ------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [408, 429, 502, 503, 504])
async def test_attempts_are_at_most_one_plus_max_retries(ehr: FakeEhr, status: int,
                                                         recorded: Recorded) -> None:
    ehr.fail_all(status)
    async with backend_for(ehr.url, recorded.telemetry, max_retries=2,
                           breaker_failures=100) as backend:
        response = await backend.request("GET", "Patient/p1")
    assert response.status == status
    assert orjson.loads(response.body)["resourceType"] == "OperationOutcome"
    assert len(ehr.requests) == 3
    assert [s.attributes["forward.attempt"] for s in recorded.attempts()] == [1, 2, 3]
    assert recorded.total("isthmus.forward.retries") == 2


async def test_a_transient_failure_is_retried_to_success(ehr: FakeEhr) -> None:
    ehr.seed({**PATIENT, "id": "p1"})
    ehr.fail_next(2, 503)
    async with backend_for(ehr.url, max_retries=2) as backend:
        response = await backend.request("GET", "Patient/p1")
    assert response.status == 200
    assert orjson.loads(response.body)["id"] == "p1"
    assert len(ehr.requests) == 3


async def test_retry_after_is_honoured(ehr: FakeEhr) -> None:
    ehr.fail_next(1, 503, retry_after=1)
    async with backend_for(ehr.url, max_retries=2) as backend:
        started = time.monotonic()
        response = await backend.request("GET", "metadata")
        elapsed = time.monotonic() - started
    assert response.status == 200
    assert elapsed >= 1.0
    assert len(ehr.requests) == 2


async def test_a_retry_after_beyond_the_maximum_is_passed_on_at_once(ehr: FakeEhr) -> None:
    ehr.fail_next(1, 429, retry_after=120)
    async with backend_for(ehr.url, max_retries=2, max_retry_after=5.0) as backend:
        started = time.monotonic()
        response = await backend.request("GET", "metadata")
        elapsed = time.monotonic() - started
    assert response.status == 429
    assert response.headers["Retry-After"] == "120"
    assert elapsed < 0.5
    assert len(ehr.requests) == 1


async def test_a_plain_create_is_not_retried_but_a_conditional_one_is(ehr: FakeEhr) -> None:
    body = orjson.dumps(PATIENT)
    headers = {"Content-Type": "application/fhir+json"}
    async with backend_for(ehr.url, max_retries=2) as backend:
        ehr.fail_next(1, 503)
        plain = await backend.request("POST", "Patient", body=body, headers=headers)
        assert plain.status == 503
        assert len(ehr.requests_to("POST", "Patient")) == 1
        ehr.fail_next(1, 503)
        conditional = await backend.request(
            "POST", "Patient", body=body,
            headers={**headers, "If-None-Exist": "identifier=urn:synthetic:mrn|MRN-0001"})
    assert conditional.status == 201
    assert len(ehr.requests_to("POST", "Patient")) == 3
    assert len(ehr.resources("Patient")) == 1


async def test_a_search_by_post_is_retried(ehr: FakeEhr) -> None:
    ehr.fail_next(1, 502)
    async with backend_for(ehr.url) as backend:
        response = await backend.request(
            "POST", "Patient/_search", body=b"identifier=urn%3Asynthetic%3Amrn%7CMRN-1",
            headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert response.status == 200
    assert orjson.loads(response.body)["type"] == "searchset"


async def test_a_read_timeout_is_retried_then_a_backend_timeout(ehr: FakeEhr) -> None:
    ehr.delay = 0.3
    async with backend_for(ehr.url, read_timeout=0.1, max_retries=1) as backend:
        with pytest.raises(BackendTimeout) as timed_out:
            await backend.request("GET", "Patient/p1")
        assert len(ehr.requests) == 2
        assert timed_out.value.reason == "no answer within 0.1 s"
        with pytest.raises(BackendTimeout):
            await backend.request("POST", "Patient", body=orjson.dumps(PATIENT))
        assert len(ehr.requests) == 3  # a create that may have arrived is not resent


async def test_a_backend_that_goes_down_and_comes_back(ehr: FakeEhr,
                                                       recorded: Recorded) -> None:
    async with backend_for(ehr.url, recorded.telemetry, max_retries=1) as backend:
        assert (await backend.request("GET", "metadata")).status == 200
        url = ehr.url
        await ehr.stop()
        with pytest.raises(BackendUnavailable) as down:
            await backend.request("GET", "metadata")
        assert down.value.reason == "connection refused"
        assert down.value.retry_after > 0
        # Refused before sending: even a plain create may go again.
        with pytest.raises(BackendUnavailable):
            await backend.request("POST", "Patient", body=orjson.dumps(PATIENT))
        assert [s.attributes["forward.verdict"] for s in recorded.attempts()[-4:]] == [
            "retry", "unavailable", "retry", "unavailable"]
        await ehr.start()
        assert ehr.url == url
        assert (await backend.request("GET", "metadata")).status == 200


# -- rate limit and bulkhead --------------------------------------------------------------


async def test_a_burst_is_spaced_to_the_rate_limit(ehr: FakeEhr, recorded: Recorded) -> None:
    async with backend_for(ehr.url, recorded.telemetry, rate_limit="20/second") as backend:
        started = time.monotonic()
        responses = await asyncio.gather(*(backend.request("GET", "metadata")
                                           for _ in range(6)))
        elapsed = time.monotonic() - started
    assert [r.status for r in responses] == [200] * 6
    assert elapsed >= 0.18  # a burst of 2, then 4 more at 20/s
    assert recorded.total("isthmus.forward.rate_limit_waits") == 4


async def test_a_rate_limit_wait_too_long_is_unavailable(ehr: FakeEhr) -> None:
    async with backend_for(ehr.url, rate_limit="1/minute") as backend:
        await backend.request("GET", "metadata")
        started = time.monotonic()
        with pytest.raises(BackendUnavailable) as limited:
            await backend.request("GET", "metadata")
    assert time.monotonic() - started < 0.1
    assert limited.value.reason == "rate limit"
    assert 55 < limited.value.retry_after <= 60
    assert len(ehr.requests) == 1


async def test_the_bulkhead_caps_calls_in_flight(ehr: FakeEhr) -> None:
    ehr.delay = 0.1
    async with backend_for(ehr.url, max_concurrency=2) as backend:
        started = time.monotonic()
        await asyncio.gather(*(backend.request("GET", "metadata") for _ in range(6)))
    assert time.monotonic() - started >= 0.29


# -- TLS ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _key_file(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return path


def _certificate(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name,
                 issuer_key: ec.EllipticCurvePrivateKey, *, ca: bool = False,
                 usage: x509.ObjectIdentifier | None = None) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(hours=1))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                              critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                   issuer_key.public_key()), critical=False))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if usage == ExtendedKeyUsageOID.SERVER_AUTH:
        builder = builder.add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    where = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Synthetic Test CA")])
    ca = _certificate("Synthetic Test CA", ca_key, ca_name, ca_key, ca=True)
    files = {}
    for role, usage in (("server", ExtendedKeyUsageOID.SERVER_AUTH),
                        ("client", ExtendedKeyUsageOID.CLIENT_AUTH)):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _certificate(f"{role}.synthetic.test", key, ca_name, ca_key, usage=usage)
        (where / f"{role}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        files[role] = (where / f"{role}.pem", _key_file(key, where / f"{role}.key"))
    (where / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    return Pki(where / "ca.pem", *files["server"], *files["client"])


@asynccontextmanager
async def tls_ehr(pki: Pki) -> AsyncIterator[FakeEhr]:
    context = server_context(pki.server_cert, pki.server_key, client_ca_file=pki.ca,
                             require_client_cert=True)
    async with FakeEhr(ssl_context=context) as fake:
        yield fake


def test_the_client_context_is_tls_1_2_or_newer_and_verifies(pki: Pki) -> None:
    spec = FhirBackendSpec(name="ehr", base_url="https://ehr.example/fhir/r4", ca_file=pki.ca,
                           client_cert_file=pki.client_cert, client_key_file=pki.client_key)
    context = client_ssl_context(spec)
    assert context is not None
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert client_ssl_context(FhirBackendSpec(name="x", base_url="http://127.0.0.1/")) is None
    lax = client_ssl_context(FhirBackendSpec(name="x", base_url="https://e.example/",
                                             verify_tls=False, allow_insecure_http=True))
    assert lax is not None and lax.verify_mode == ssl.CERT_NONE


async def test_mtls_with_the_test_ca_works(pki: Pki) -> None:
    async with tls_ehr(pki) as ehr:
        assert ehr.url.startswith("https://127.0.0.1:")
        async with backend_for(ehr.url, ca_file=pki.ca, client_cert_file=pki.client_cert,
                               client_key_file=pki.client_key) as backend:
            response = await backend.request("GET", "metadata")
    assert response.status == 200
    assert orjson.loads(response.body)["resourceType"] == "CapabilityStatement"


async def test_mtls_without_the_client_certificate_fails(pki: Pki) -> None:
    async with tls_ehr(pki) as ehr, backend_for(ehr.url, ca_file=pki.ca,
                                                max_retries=0) as backend:
        with pytest.raises(BackendUnavailable):
            await backend.request("GET", "metadata")
    assert not ehr.requests


async def test_a_server_certificate_from_an_unknown_ca_is_refused(pki: Pki) -> None:
    async with tls_ehr(pki) as ehr, backend_for(ehr.url, client_cert_file=pki.client_cert,
                                                client_key_file=pki.client_key) as backend:
        with pytest.raises(BackendUnavailable) as refused:
            await backend.request("GET", "metadata")
    assert refused.value.reason == "TLS handshake failed"
    assert not ehr.requests


@pytest.mark.parametrize(("overrides", "message"), [
    ({"base_url": "http://ehr.example/fhir"}, "allow_insecure_http"),
    ({"base_url": "https://ehr.example/fhir", "verify_tls": False}, "allow_insecure_http"),
    ({"base_url": "ftp://ehr.example/fhir"}, r"http\(s\) URL"),
])
async def test_insecure_transport_needs_an_explicit_setting(overrides: dict[str, Any],
                                                            message: str) -> None:
    with pytest.raises(ValueError, match=message):
        await FhirBackend.open(FhirBackendSpec(name="ehr", **overrides), configure("none"))


async def test_plain_http_elsewhere_is_allowed_when_asked() -> None:
    spec = FhirBackendSpec(name="ehr", base_url="http://ehr.example/fhir",
                           allow_insecure_http=True)
    backend = await FhirBackend.open(spec, configure("none"))
    await backend.close()


# -- traces -------------------------------------------------------------------------------


async def test_the_attempt_span_is_the_callers_child_and_its_traceparent_is_sent(
        ehr: FakeEhr, recorded: Recorded) -> None:
    tracer = recorded.telemetry.tracer
    async with backend_for(ehr.url, recorded.telemetry) as backend:
        with tracer.start_as_current_span("fhir.request") as caller:
            await backend.request("GET", "Patient/p1")
    (attempt,) = recorded.attempts()
    caller_context = caller.get_span_context()
    assert attempt.parent is not None
    assert attempt.parent.span_id == caller_context.span_id
    assert attempt.context.trace_id == caller_context.trace_id
    assert attempt.kind == trace.SpanKind.CLIENT
    sent = ehr.requests[0].traceparent
    assert sent is not None and sent.startswith(
        f"00-{caller_context.trace_id:032x}-{attempt.context.span_id:016x}-")
    attributes = dict(attempt.attributes or {})
    assert attributes == {
        "forward.backend": "ehr", "forward.kind": "fhir", "forward.attempt": 1,
        "forward.breaker_state": "closed", "http.request.method": "GET",
        "url.template": "Patient/{id}", "server.address": "127.0.0.1",
        "server.port": ehr.port, "http.response.status_code": 404,
        "forward.verdict": "answered"}


async def test_a_given_traceparent_is_the_parent(ehr: FakeEhr, recorded: Recorded) -> None:
    incoming = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    async with backend_for(ehr.url, recorded.telemetry) as backend:
        await backend.request("GET", "metadata", traceparent=incoming)
    (attempt,) = recorded.attempts()
    assert f"{attempt.context.trace_id:032x}" == "0af7651916cd43dd8448eb211c80319c"
    assert attempt.parent is not None and f"{attempt.parent.span_id:016x}" == "b7ad6b7169203331"
    sent = ehr.requests[0].traceparent
    assert sent is not None and sent.split("-")[1] == "0af7651916cd43dd8448eb211c80319c"
    assert sent.split("-")[2] == f"{attempt.context.span_id:016x}"


async def test_unrecorded_the_callers_traceparent_goes_on_unchanged(ehr: FakeEhr) -> None:
    incoming = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    async with backend_for(ehr.url) as backend:
        await backend.request("GET", "metadata", traceparent=incoming)
    assert ehr.requests[0].traceparent == incoming


async def test_no_query_value_or_id_reaches_a_span_or_a_metric(ehr: FakeEhr,
                                                               recorded: Recorded) -> None:
    ehr.fail_next(1, 503)
    async with backend_for(ehr.url, recorded.telemetry) as backend:
        await backend.request("GET", "Patient",
                              query=[("identifier", f"urn:synthetic:mrn|{CANARY}")])
        await backend.request("GET", f"Patient?identifier={CANARY}&_count=5")
        await backend.request("GET", f"Patient/{CANARY}")
        await backend.request("POST", "Patient/_search", body=f"identifier={CANARY}".encode(),
                              headers={"Content-Type": "application/x-www-form-urlencoded"})
        await backend.deliver(delivery(bundle(conditional_patient(CANARY))))
    # The fake did receive the value: the canary is real.
    assert ("identifier", f"urn:synthetic:mrn|{CANARY}") in ehr.requests[0].query
    spans = recorded.spans.get_finished_spans()
    assert len(recorded.attempts()) == 6
    for span in spans:
        texts = [span.name, *map(str, (span.attributes or {}).values()),
                 str(span.status.description or "")]
        texts += [str(v) for event in span.events for v in (event.attributes or {}).values()]
        assert not [t for t in texts if CANARY in t], span.name
    assert {s.attributes["url.template"] for s in recorded.attempts()} == {
        "Patient", "Patient/{id}", "Patient/_search", ""}
    data = recorded.metrics.get_metrics_data()
    assert data is not None and CANARY not in data.to_json()


async def test_metrics_per_backend(ehr: FakeEhr, recorded: Recorded) -> None:
    ehr.fail_next(1, 503)
    async with backend_for(ehr.url, recorded.telemetry) as backend:
        await backend.request("GET", "metadata")
        requests = recorded.points("isthmus.forward.requests")
        durations = recorded.points("isthmus.forward.duration")
        refreshes = recorded.points("isthmus.forward.token_refreshes")
    assert sorted((p["http.response.status_code"], v) for p, v in requests) == [
        (200, 1.0), (503, 1.0)]
    assert durations == [({"forward.backend": "ehr"}, 2.0)]  # the histogram's count
    assert refreshes == [({"forward.backend": "ehr"}, 0.0)]


# -- deliveries (the outbox) --------------------------------------------------------------


async def test_a_delivered_transaction(recorded: Recorded) -> None:
    async with FakeEhr(process_transactions=True) as ehr, backend_for(
            ehr.url, recorded.telemetry) as backend:
        payload = bundle(conditional_patient("MRN-77"))
        traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        verdict = await backend.deliver(delivery(payload, 42, traceparent))
        again = await backend.deliver(delivery(payload, 42, traceparent))
    assert verdict == Delivered("HTTP 200") and again == verdict
    (patient,) = ehr.resources("Patient")  # resending changed nothing
    assert patient["meta"]["versionId"] == "1"
    assert [t.request_id for t in ehr.transactions] == ["isthmus-outbox-42"] * 2
    sent = ehr.requests[0]
    assert (sent.method, sent.path) == ("POST", "")
    assert sent.headers["Content-Type"] == "application/fhir+json"
    assert sent.traceparent is not None
    assert sent.traceparent.split("-")[1] == "4bf92f3577b34da6a3ce929d0e0e4736"
    attempt = recorded.attempts()[0]
    assert attempt.attributes is not None
    assert attempt.attributes["outbox.id"] == 42
    assert attempt.attributes["forward.verdict"] == "delivered"


@pytest.mark.parametrize(("status", "retry_after", "expected"), [
    (503, 7, Retry("HTTP 503", after=7.0, status="HTTP 503")),
    (500, None, Retry("HTTP 500", after=None, status="HTTP 500")),
    (429, None, Retry("HTTP 429", after=None, status="HTTP 429")),
    (408, 2, Retry("HTTP 408", after=2.0, status="HTTP 408")),
    (400, None, Permanent("HTTP 400: invalid", status="HTTP 400")),
    (422, None, Permanent("HTTP 422: processing", status="HTTP 422")),
    (412, None, Permanent("HTTP 412: conflict", status="HTTP 412")),
])
async def test_delivery_verdicts(ehr: FakeEhr, status: int, retry_after: int | None,
                                 expected: Retry | Permanent) -> None:
    ehr.fail_next(1, status, retry_after=retry_after)
    async with backend_for(ehr.url, max_retries=5) as backend:
        verdict = await backend.deliver(delivery(bundle(conditional_patient("MRN-1"))))
    assert verdict == expected
    assert FAILURE_DIAGNOSTICS not in repr(verdict) and "CANARY" not in repr(verdict)
    assert len(ehr.requests) == 1  # one attempt: the outbox decides about the next


async def test_delivery_to_a_backend_that_is_down_is_retry() -> None:
    ehr = FakeEhr()
    await ehr.start()
    url = ehr.url
    await ehr.stop()
    async with backend_for(url) as backend:
        verdict = await backend.deliver(delivery(bundle(conditional_patient("MRN-1"))))
    assert isinstance(verdict, Retry) and verdict.reason == "connection refused"


async def test_delivery_with_the_breaker_open_is_retry_without_the_network(
        ehr: FakeEhr) -> None:
    ehr.fail_all(503)
    async with backend_for(ehr.url, breaker_failures=2, breaker_reset=30.0) as backend:
        for _ in range(2):
            assert isinstance(await backend.deliver(delivery(b"{}")), Retry)
        verdict = await backend.deliver(delivery(b"{}"))
    assert isinstance(verdict, Retry) and verdict.reason == "circuit breaker open"
    assert verdict.after is not None and 29 < verdict.after <= 30
    assert len(ehr.requests) == 2


async def test_a_bundle_failing_again_is_its_own_problem_not_the_backends(
        ehr: FakeEhr) -> None:
    """A poison Bundle: its first 500 counts against the backend, its later ones are its
    own (fault "message"): the breaker never opens for it, and a half-open probe it
    fails leaves the breaker half-open for the next call rather than open."""
    ehr.fail_all(500)
    async with backend_for(ehr.url, breaker_failures=2, breaker_reset=0.2) as backend:
        assert await backend.deliver(delivery(b"{}")) == Retry(
            "HTTP 500", status="HTTP 500", fault="backend")
        for attempt in range(2, 12):
            verdict = await backend.deliver(replace(delivery(b"{}"), attempt=attempt))
            assert verdict == Retry("HTTP 500", status="HTTP 500", fault="message")
        assert backend.breaker_state == "closed"
        # Fresh Bundles failing too: that is the backend, and the breaker opens.
        assert (await backend.deliver(delivery(b"{}", 18))).fault == "backend"
        assert backend.breaker_state == "open"
        refused = await backend.deliver(delivery(b"{}", 19))
        assert (refused.reason, refused.fault) == ("circuit breaker open", "unsent")
        await asyncio.sleep(backend.available_in() + 0.02)
        assert backend.breaker_state == "half-open"
        verdict = await backend.deliver(replace(delivery(b"{}"), attempt=5))
        assert verdict.fault == "message" and backend.breaker_state == "half-open"
        ehr.fail_all(None)
        assert await backend.deliver(delivery(bundle(), 20)) == Delivered("HTTP 200")
        assert backend.breaker_state == "closed"
    assert len(ehr.requests) == 14


async def test_a_refused_connection_counts_against_the_backend_whatever_the_row() -> None:
    ehr = FakeEhr()
    await ehr.start()
    url = ehr.url
    await ehr.stop()
    async with backend_for(url, breaker_failures=2, breaker_reset=30.0) as backend:
        for attempt in (5, 6):
            verdict = await backend.deliver(replace(delivery(b"{}"), attempt=attempt))
            assert isinstance(verdict, Retry) and verdict.fault == "backend"
        assert backend.breaker_state == "open"


async def test_deliveries_wait_for_the_rate_limit_without_bound(ehr: FakeEhr) -> None:
    async with backend_for(ehr.url, rate_limit="20/second") as backend:
        started = time.monotonic()
        verdicts = await asyncio.gather(*(
            backend.deliver(delivery(bundle(conditional_patient(f"MRN-{n}")), n))
            for n in range(5)))
    assert all(isinstance(v, Delivered) for v in verdicts)
    assert time.monotonic() - started >= 0.14  # 2 at once, 3 more at 20/s


async def test_delivery_refreshes_a_revoked_token_once() -> None:
    async with FakeEhr(require_token=True) as ehr:
        ehr.register_client("isthmus", secret="synthetic-secret")
        auth = AuthSpec(kind="client-credentials", client_id="isthmus",
                        client_secret="synthetic-secret", token_url=ehr.token_url)
        async with backend_for(ehr.url, auth=auth) as backend:
            assert isinstance(await backend.deliver(delivery(bundle())), Delivered)
            ehr.revoke_tokens()
            assert isinstance(await backend.deliver(delivery(bundle())), Delivered)
    assert ehr.token_requests == 2 and ehr.unauthorized == 1


# -- the fake itself (the facade's tests lean on it) ----------------------------------------


async def test_the_fake_searches_pages_and_resolves_transaction_references() -> None:
    async with FakeEhr(process_transactions=True) as ehr, backend_for(ehr.url) as backend:
        for n in range(3):
            ehr.seed({**PATIENT, "id": f"p{n}",
                      "identifier": [{"system": "urn:synthetic:mrn", "value": f"M{n}"}]})
        first = orjson.loads((await backend.request(
            "GET", "Patient", query=[("_count", "2")])).body)
        assert first["total"] == 3 and len(first["entry"]) == 2
        (next_link,) = [link["url"] for link in first["link"] if link["relation"] == "next"]
        rest = orjson.loads((await backend.request(
            "GET", next_link[len(ehr.url) + 1:])).body)
        assert [e["resource"]["id"] for e in rest["entry"]] == ["p2"]
        found = orjson.loads((await backend.request(
            "GET", "Patient", query=[("identifier", "urn:synthetic:mrn|M1")])).body)
        assert [e["resource"]["id"] for e in found["entry"]] == ["p1"]
        appointment = {"fullUrl": "urn:uuid:0f0e0d0c-0000-4000-8000-0000000000a1",
                       "resource": {"resourceType": "Appointment", "status": "booked",
                                    "participant": [{"actor": {
                                        "reference": "urn:uuid:0f0e0d0c-0000-4000-8000-"
                                                     "000000000001"}}]},
                       "request": {"method": "POST", "url": "Appointment"}}
        verdict = await backend.deliver(delivery(bundle(conditional_patient("M9"),
                                                        appointment)))
        assert isinstance(verdict, Delivered)
        (booked,) = ehr.resources("Appointment")
        patient_ref = booked["participant"][0]["actor"]["reference"]
        assert patient_ref.startswith("Patient/")
        assert ehr.resource("Patient", patient_ref.split("/")[1]) is not None
        by_patient = orjson.loads((await backend.request(
            "GET", "Patient", query=[("_id", patient_ref.split("/")[1])])).body)
        assert by_patient["total"] == 1
        update = await backend.request("PUT", "Patient/p0",
                                       body=orjson.dumps({**PATIENT, "id": "p0",
                                                          "active": True}))
        assert update.status == 200 and update.headers["ETag"] == 'W/"2"'
        assert (await backend.request("DELETE", "Patient/p0")).status == 204
        assert (await backend.request("GET", "Patient/p0")).status == 410
        old = await backend.request("GET", "Patient/p0/_history/1")
        assert orjson.loads(old.body)["meta"]["versionId"] == "1"
