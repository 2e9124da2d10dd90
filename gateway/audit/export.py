"""Exports for reviewers — NDJSON, a FHIR Bundle or CSV — and their offline verification.

An export carries what a reviewer needs to check it with the public key alone:

- every AuditEvent (or CSV row) with its sequence number, chain hash and sealed body;
- the chain data: the signed checkpoints around the exported records, and the body
  digests of the records in between that the filters left out (their contents stay out);
- a manifest signed at export time listing each exported record and its hash, so a
  record removed from, added to or rewritten in the file is named even where the chain
  through it would still hold.

The chain data travels as a FHIR Binary (last line, last entry) or as `checkpoint`,
`link` and `manifest` rows in CSV. Each file is written as a stream, one record a line,
so a cut-off file still shows where it ends.
"""

from __future__ import annotations

import base64
import bisect
import csv
import io
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from gateway.audit.auditevent import CHAIN_EXTENSION, render
from gateway.audit.chain import EXPORT_DOMAIN, check_signature, digest, open_checkpoint

# ExportFormatError: defined in errors.py; imported here too for the old import path.
from gateway.audit.errors import ExportFormatError as ExportFormatError
from gateway.audit.log import AuditLog
from gateway.audit.query import AuditQuery
from gateway.audit.record import timestamp
from gateway.audit.sealed import (
    Revealed,
    RevealError,
    canonical,
    parse_body,
    plaintext_matches,
    reveal,
    revealed_from,
)
from gateway.audit.verify import ChainVerifier, Problem, Report
from gateway.store.audit import StoredAuditRow

FORMATS = ("ndjson", "bundle", "csv")
CONTENT_TYPES = {"ndjson": "application/fhir+ndjson", "bundle": "application/fhir+json",
                 "csv": "text/csv; charset=utf-8"}
CHAIN_FORMAT = "isthmus-audit-chain/1"
CHAIN_CONTENT_TYPE = "application/vnd.isthmus.audit-chain+json"
CSV_COLUMNS = (
    "kind", "seq", "recorded", "action", "outcome", "client", "user", "tls_subject",
    "sending_application", "sending_facility", "peer", "server", "resource_type",
    "resource_id", "control_id", "patient", "patient_pseudonym", "query", "purpose",
    "profile", "trace_id", "detail", "hash", "digest", "body", "phi", "signature",
)
_PAGE = 1000
Write = Callable[[bytes], object]


@dataclass
class ExportResult:
    records: int = 0
    last_seq: int = 0
    more: bool = False
    undecryptable: int = 0


# -- writing --------------------------------------------------------------------------------


def csv_row(seq: int, body: dict[str, Any], body_bytes: bytes, chain_hash: bytes,
            revealed: Revealed | None) -> list[str]:
    """The CSV columns of one record; text cells cannot start a spreadsheet formula."""
    phi = revealed
    values = {
        "kind": "record", "seq": str(seq), "recorded": body.get("time", ""),
        "action": body.get("action", ""), "outcome": body.get("outcome", ""),
        "client": body.get("client", ""), "user": body.get("user", ""),
        "tls_subject": body.get("tls_subject", ""), "sending_application": body.get("app", ""),
        "sending_facility": body.get("facility", ""), "peer": body.get("peer", ""),
        "server": body.get("server", ""), "resource_type": body.get("type", ""),
        "resource_id": (phi.resource_id or "") if phi else "",
        "control_id": body.get("control_id", ""),
        "patient": (phi.patient or "") if phi else "",
        "patient_pseudonym": body.get("patient_index", ""),
        "query": (phi.query or "") if phi and phi.query else body.get("query", ""),
        "purpose": body.get("purpose", ""), "profile": body.get("profile", ""),
        "trace_id": body.get("trace", ""), "detail": body.get("detail", ""),
        "hash": chain_hash.hex(), "body": base64.b64encode(body_bytes).decode(),
        "phi": base64.b64encode(phi.plaintext).decode() if phi else "",
    }
    return [_cell(str(values.get(c, ""))) for c in CSV_COLUMNS]


def _cell(value: str) -> str:
    # OWASP CSV injection: a cell a spreadsheet would evaluate is shown as text.
    return "'" + value if value[:1] in ("=", "+", "-", "@", "\t", "\r") else value


def _csv_line(values: Iterable[str]) -> bytes:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(values)
    return buffer.getvalue().encode()


def _chain_binary(chain: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Binary", "id": "audit-chain", "contentType": CHAIN_CONTENT_TYPE,
            "data": base64.b64encode(canonical(chain)).decode()}


class _Writer:
    """One export format, written a record at a time."""

    def __init__(self, fmt: str, write: Write, log_id: str, bundle_type: str,
                 links: list[dict[str, str]], base_url: str) -> None:
        self._fmt = fmt
        self._write = write
        self._log_id = log_id
        self._bundle_type = bundle_type
        self._links = links
        self._base_url = base_url

    def begin(self) -> None:
        if self._fmt == "csv":
            self._write(_csv_line(CSV_COLUMNS))
        elif self._fmt == "bundle":
            head: dict[str, Any] = {"resourceType": "Bundle", "type": self._bundle_type,
                                    "timestamp": _now()}
            if self._links:
                head["link"] = self._links
            text = orjson.dumps(head)
            self._write(text[:-1] + b',"entry":[\n')

    def record(self, seq: int, body: dict[str, Any], body_bytes: bytes, chain_hash: bytes,
               revealed: Revealed | None) -> None:
        if self._fmt == "csv":
            self._write(_csv_line(csv_row(seq, body, body_bytes, chain_hash, revealed)))
            return
        event = render(seq, body, body_bytes, chain_hash, revealed)
        if self._fmt == "ndjson":
            self._write(orjson.dumps(event) + b"\n")
        else:
            self._write(orjson.dumps(self._entry(str(seq), event, "match")) + b",\n")

    def _entry(self, key: str, resource: dict[str, Any], mode: str) -> dict[str, Any]:
        if self._base_url and resource["resourceType"] == "AuditEvent":
            full_url = f"{self._base_url}/AuditEvent/{key}"
        else:
            full_url = f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, f'{self._log_id}/{key}')}"
        entry: dict[str, Any] = {"fullUrl": full_url, "resource": resource}
        if self._bundle_type == "searchset":
            entry["search"] = {"mode": mode}
        return entry

    def end(self, chain: dict[str, Any]) -> None:
        if self._fmt == "csv":
            for cp in chain["checkpoints"]:
                self._write(_csv_line(_special("checkpoint", body=cp["body"],
                                               signature=cp["signature"])))
            for seq, hex_digest in chain["links"]:
                self._write(_csv_line(_special("link", seq=str(seq), digest=hex_digest)))
            manifest = chain["manifest"]
            self._write(_csv_line(_special("manifest", body=manifest["body"],
                                           signature=manifest["signature"])))
        elif self._fmt == "ndjson":
            self._write(orjson.dumps(_chain_binary(chain)) + b"\n")
        else:
            entry = self._entry("audit-chain", _chain_binary(chain), "include")
            self._write(orjson.dumps(entry) + b"\n]}\n")


def _special(kind: str, **values: str) -> list[str]:
    return [kind if c == "kind" else values.get(c, "") for c in CSV_COLUMNS]


def _now() -> str:
    return timestamp(datetime.now(UTC))


async def export(
    audit: AuditLog,
    query: AuditQuery,
    fmt: str,
    write: Write,
    *,
    covered_through: int,
    decrypt: bool,
    exporter: str,
    after: int = 0,
    limit: int | None = None,
    bundle_type: str = "collection",
    links: Callable[[ExportResult], list[dict[str, str]]] | None = None,
    base_url: str = "",
) -> ExportResult:
    """Write the records `query` matches (up to `covered_through`, which a signed
    checkpoint must cover) and the chain data that proves them.

    With `limit`, one page after `after`: `links` gets the result (whether more follow)
    to build the Bundle's paging links before anything is written.
    """
    result = ExportResult()
    pending: list[StoredAuditRow] = []
    if limit is not None:
        pending = await audit.search(query, after, limit + 1, covered_through)
        result.more = len(pending) > limit
        pending = pending[:limit]
        if pending:
            result.last_seq = pending[-1].seq
    writer = _Writer(fmt, write, audit.log_id, bundle_type,
                     links(result) if links is not None else [], base_url)
    writer.begin()
    exported: dict[int, bytes] = {}
    ring = audit.keys.ring
    cursor = after
    while True:
        rows = pending if limit is not None else await audit.search(
            query, cursor, _PAGE, covered_through)
        for row in rows:
            body = parse_body(row.body)
            revealed = None
            if decrypt:
                try:
                    revealed = reveal(body, ring)
                except RevealError:
                    result.undecryptable += 1
            writer.record(row.seq, body, row.body, row.hash, revealed)
            exported[row.seq] = row.hash
            cursor = row.seq
        if limit is not None or len(rows) < _PAGE:
            break
    result.records = len(exported)
    result.last_seq = max(result.last_seq, cursor if exported else 0)
    chain = await _chain_data(audit, exported, query, fmt, decrypt, exporter)
    writer.end(chain)
    return result


async def _chain_data(audit: AuditLog, exported: Mapping[int, bytes], query: AuditQuery,
                      fmt: str, decrypt: bool, exporter: str) -> dict[str, Any]:
    """Checkpoints bounding each exported record, the digests between, and the manifest."""
    purged = audit.purged
    used: dict[bytes, tuple[bytes, bytes]] = {}
    if purged:
        latest = await audit.latest_checkpoint()
        if latest is not None:  # carries the purge anchor the first segment starts from
            used[latest[1].body] = (latest[1].body, latest[1].signature)
    segments: set[tuple[int, int]] = set()
    if exported:
        first, last = min(exported), max(exported)
        before = await audit.checkpoint_rows(0, first - 1, newest_first=True, limit=1)
        after = await audit.checkpoint_rows(last, None, limit=1)
        low_bound = before[0].count if before else 0
        high_bound = after[0].count if after else last
        counts = await audit.checkpoint_counts(low_bound, high_bound)
        for seq in exported:
            i = bisect.bisect_left(counts, seq)
            low = counts[i - 1] if i > 0 and counts[i - 1] > purged else purged
            if i < len(counts):
                segments.add((low, counts[i]))
    link_list: list[list[Any]] = []
    for low, high in sorted(segments):
        for count in (low, high):
            for stored in await audit.checkpoint_rows(count, count) if count > purged else []:
                checkpoint, _ = open_checkpoint(stored.body, stored.signature,
                                                audit.keys.trusted)
                if checkpoint is not None and checkpoint.log == audit.log_id:
                    used[stored.body] = (stored.body, stored.signature)
                    break
        async for row in audit.scan(low + 1, high):
            if row.seq not in exported:
                link_list.append([row.seq, digest(row.body).hex()])
    manifest = canonical({
        "v": 1, "log": audit.log_id, "time": _now(), "exporter": exporter, "format": fmt,
        "decrypted": decrypt, "query": query.text(with_patient=decrypt),
        "key": audit.keys.signing.id,
        "records": [[seq, exported[seq].hex()] for seq in sorted(exported)],
    })
    signature = audit.keys.signing.sign(EXPORT_DOMAIN + manifest)
    return {
        "format": CHAIN_FORMAT, "log": audit.log_id,
        "checkpoints": [{"body": _b64(b), "signature": _b64(s)} for b, s in used.values()],
        "links": sorted(link_list),
        "manifest": {"body": _b64(manifest), "signature": _b64(signature)},
    }


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# -- reading and verifying ------------------------------------------------------------------


@dataclass
class _Exported:
    seq: int
    chain_hash: bytes
    body: bytes
    plaintext: bytes | None
    shown: Any  # the AuditEvent as a dict, or the CSV row as a list


@dataclass
class _Parsed:
    records: list[_Exported] = field(default_factory=list)
    chain: dict[str, Any] | None = None
    problems: list[tuple[int, str]] = field(default_factory=list)


def verify_export(data: bytes, trusted: Mapping[str, Ed25519PublicKey]) -> Report:
    """Verify an export with public keys alone: manifest, rendering, chain, checkpoints."""
    parsed = _parse(data)
    chain = parsed.chain
    if chain is None:
        last = max((r.seq for r in parsed.records), default=0)
        report = Report()
        where = f"after record {last}" if last else "before any record"
        report.problems.append(Problem(last + 1, f"the export ends {where}: its chain data "
                                                  "is missing (truncated)"))
        return report
    checkpoints = [(_unb64(c["body"]), _unb64(c["signature"]))
                   for c in chain.get("checkpoints", [])]
    verifier = ChainVerifier(str(chain.get("log")), checkpoints, trusted, segments=True)
    for position, reason in parsed.problems:
        verifier.problem(position, reason)
    listed = _check_manifest(chain, trusted, verifier)
    items: dict[int, tuple[bytes, bytes | None]] = {}
    previous = 0
    for record in parsed.records:
        seq = record.seq
        if seq <= previous:
            verifier.problem(seq, "it appears out of order or twice in the file")
        previous = max(previous, seq)
        if listed is not None:
            if seq not in listed:
                verifier.problem(seq, "it is not in the signed manifest (inserted)")
            elif listed[seq] != record.chain_hash:
                verifier.problem(seq, "its hash differs from the signed manifest (rewritten)")
        _check_shown(record, verifier)
        items.setdefault(seq, (digest(record.body), record.chain_hash))
    if listed is not None:
        present = {r.seq for r in parsed.records}
        for seq in sorted(set(listed) - present):
            verifier.problem(seq, "it is listed in the signed manifest but missing from the "
                                  "file (deleted)")
    for seq, hex_digest in chain.get("links", []):
        if int(seq) in items:
            verifier.problem(int(seq), "it is both exported and linked")
            continue
        items[int(seq)] = (bytes.fromhex(hex_digest), None)
    for seq in sorted(items):
        body_digest, chain_hash = items[seq]
        verifier.record(seq, body_digest, chain_hash)
    report = verifier.finish()
    report.exported = len(parsed.records)
    return report


def _check_manifest(chain: dict[str, Any], trusted: Mapping[str, Ed25519PublicKey],
                    verifier: ChainVerifier) -> dict[int, bytes] | None:
    try:
        manifest_bytes = _unb64(chain["manifest"]["body"])
        signature = _unb64(chain["manifest"]["signature"])
        manifest = orjson.loads(manifest_bytes)
        reason = check_signature(EXPORT_DOMAIN, manifest_bytes, signature,
                                 str(manifest["key"]), trusted)
    except (KeyError, TypeError, ValueError):
        verifier.problem(0, "the export's manifest is missing or malformed")
        return None
    if reason is not None:
        verifier.problem(0, f"the export's manifest: {reason}")
        return None
    if manifest.get("log") != chain.get("log"):
        verifier.problem(0, "the export's manifest belongs to another audit log")
    return {int(seq): bytes.fromhex(h) for seq, h in manifest.get("records", [])}


def _check_shown(record: _Exported, verifier: ChainVerifier) -> None:
    """The AuditEvent or row shown must be exactly what its sealed body renders to."""
    try:
        body = parse_body(record.body)
    except ValueError:
        verifier.problem(record.seq, "its sealed body is not readable")
        return
    revealed = None
    if record.plaintext is not None:
        if not plaintext_matches(body, record.plaintext):
            verifier.problem(record.seq, "its decrypted PHI is not what the sealed body "
                                         "commits to (edited)")
            return
        revealed = revealed_from(record.plaintext)
    if isinstance(record.shown, list):
        expected: Any = csv_row(record.seq, body, record.body, record.chain_hash, revealed)
    else:
        expected = render(record.seq, body, record.body, record.chain_hash, revealed)
    if expected != record.shown:
        verifier.problem(record.seq, "what the export shows differs from its sealed body "
                                     "(edited)")


def _parse(data: bytes) -> _Parsed:
    text = data.lstrip()
    if text.startswith(b"kind,"):
        return _parse_csv(data)
    first_line = text.split(b"\n", 1)[0]
    if first_line.startswith(b'{"resourceType":"Bundle"') or first_line.startswith(b"{\n"):
        return _parse_bundle(data)
    parsed = _Parsed()
    for number, line in enumerate(data.splitlines(), start=1):
        if line.strip():
            _take(parsed, _json_line(line, number, parsed))
    return parsed


def _parse_bundle(data: bytes) -> _Parsed:
    parsed = _Parsed()
    try:
        bundle = orjson.loads(data)
        entries = [e.get("resource") for e in bundle.get("entry", [])]
    except (orjson.JSONDecodeError, AttributeError):
        # Cut off: read the entries that are whole, one a line as written.
        entries = []
        for number, line in enumerate(data.splitlines(), start=1):
            line = line.strip().rstrip(b",")
            if line.startswith(b'{"fullUrl"'):
                entry = _json_line(line, number, parsed)
                if isinstance(entry, dict):
                    entries.append(entry.get("resource"))
    for resource in entries:
        _take(parsed, resource)
    return parsed


def _json_line(line: bytes, number: int, parsed: _Parsed) -> Any:
    try:
        return orjson.loads(line)
    except orjson.JSONDecodeError:
        parsed.problems.append((0, f"line {number} is not JSON (cut off or edited)"))
        return None


def _take(parsed: _Parsed, resource: Any) -> None:
    if not isinstance(resource, dict):
        return
    kind = resource.get("resourceType")
    if kind == "Binary" and resource.get("contentType") == CHAIN_CONTENT_TYPE:
        try:
            parsed.chain = orjson.loads(_unb64(resource["data"]))
        except (KeyError, ValueError, TypeError):
            parsed.problems.append((0, "the chain data is not readable"))
        return
    if kind != "AuditEvent":
        parsed.problems.append((0, f"the file holds a {kind} where only AuditEvents and the "
                                   "chain data belong"))
        return
    chain = next((e for e in resource.get("extension", []) if e.get("url") == CHAIN_EXTENSION),
                 None)
    parts = {p.get("url"): p for p in (chain or {}).get("extension", [])}
    try:
        seq = int(parts["seq"]["valueString"])
        record = _Exported(seq, bytes.fromhex(parts["hash"]["valueString"]),
                           _unb64(parts["body"]["valueBase64Binary"]),
                           _unb64(parts["phi"]["valueBase64Binary"]) if "phi" in parts
                           else None, resource)
    except (KeyError, TypeError, ValueError):
        position = int(resource["id"]) if str(resource.get("id", "")).isdigit() else 0
        parsed.problems.append((position, "an AuditEvent without its chain data (inserted?)"))
        return
    parsed.records.append(record)


def _parse_csv(data: bytes) -> _Parsed:
    parsed = _Parsed()
    # The manifest row lists every exported record: far past csv's default cell limit.
    csv.field_size_limit(max(csv.field_size_limit(), len(data)))
    reader = csv.reader(io.StringIO(data.decode("utf-8", "replace")))
    header = next(reader, None)
    if header is None or tuple(header) != CSV_COLUMNS:
        parsed.problems.append((0, "the CSV header is not an audit export's"))
        return parsed
    column = {name: i for i, name in enumerate(CSV_COLUMNS)}
    checkpoints: list[dict[str, str]] = []
    links: list[list[Any]] = []
    manifest: dict[str, str] | None = None
    for row in reader:
        if len(row) != len(CSV_COLUMNS):
            parsed.problems.append((0, f"CSV line {reader.line_num} has "
                                       f"{len(row)} columns (cut off or edited)"))
            continue
        kind = row[0]
        try:
            if kind == "record":
                phi = row[column["phi"]]
                parsed.records.append(_Exported(
                    int(row[1]), bytes.fromhex(row[column["hash"]]), _unb64(row[column["body"]]),
                    _unb64(phi) if phi else None, row))
            elif kind == "checkpoint":
                checkpoints.append({"body": row[column["body"]],
                                    "signature": row[column["signature"]]})
            elif kind == "link":
                links.append([int(row[1]), row[column["digest"]]])
            elif kind == "manifest":
                manifest = {"body": row[column["body"]], "signature": row[column["signature"]]}
            else:
                parsed.problems.append((0, f"CSV line {reader.line_num}: unknown kind"))
        except ValueError:
            parsed.problems.append((0, f"CSV line {reader.line_num} is not readable"))
    if manifest is not None:
        try:
            log_id = orjson.loads(_unb64(manifest["body"])).get("log")
        except ValueError:
            log_id = None
        parsed.chain = {"format": CHAIN_FORMAT, "log": log_id, "checkpoints": checkpoints,
                        "links": links, "manifest": manifest}
    return parsed


def _unb64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)

