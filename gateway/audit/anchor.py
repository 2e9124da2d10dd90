"""Heads kept outside the audit database, and how to read them back.

The store alone cannot show a rollback: an older copy of `audit.db`, or a tail cut off
together with the checkpoints that covered it (re-signed, if the signing key sits beside
the data), is a consistent log, just a shorter one. What catches it is a head (record
number and chain hash) kept where the attacker cannot reach: the published checkpoint
file or directory (`audit.checkpoint_publish`), an HTTP witness, the log line each
checkpoint writes, or a `SEQ:HASH` a reviewer noted. `isthmus audit verify` checks that the
chain reaches every such head and says how far they anchor it.

Formats a head is read from, one a line (anything else on a line is skipped, so a
shipped log file can be given as it is):

- a published checkpoint: `{"count":…,"head":"…","log":"…",…,"signature":"<base64>"}`
  (the signed checkpoint body with its signature beside it);
- `SEQ:HASH` (64 hex digits), as `--expect-head` takes it;
- the checkpoint log line: `audit checkpoint signed: record SEQ, head HASH, log LOG`.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from pathlib import Path

import orjson

from gateway.audit.chain import Checkpoint
from gateway.audit.errors import AuditError
from gateway.audit.sealed import canonical

_SEQ_HASH = re.compile(r"^\s*(\d+):([0-9a-fA-F]{64})\s*$")
_LOG_LINE = re.compile(r"audit checkpoint signed: record (\d+), head ([0-9a-f]{64})"
                       r"(?:, log ([0-9a-f]+))?")
# A published directory holds one file a checkpoint, named after the log and the count.
PUBLISHED_SUFFIX = ".json"


class AnchorError(AuditError, ValueError):
    """A head given to verify against cannot be read; names the source and line."""


@dataclass(frozen=True, slots=True)
class Head:
    """A head the chain must reach: record `seq` hashes to `hash` (in log `log`, if
    known). `body`/`signature`: the signed checkpoint it came from, when published."""

    seq: int
    hash: bytes
    source: str
    log: str | None = None
    body: bytes | None = None
    signature: bytes | None = None


def published_line(body: bytes, signature: bytes) -> bytes:
    """A signed checkpoint as one line of the published file (or one published file)."""
    value = orjson.loads(body)
    value["signature"] = base64.b64encode(signature).decode()
    return canonical(value) + b"\n"


def parse_head(text: str, source: str) -> Head:
    """`SEQ:HASH`, as given to --expect-head."""
    head = _line_head(text, source)
    if head is None:
        raise AnchorError(f"{source}: not SEQ:HASH (a record number and 64 hex digits)")
    return head


def read_heads(path: Path) -> list[Head]:
    """Every head in a file, or in every published file of a directory."""
    files = (sorted(p for p in path.iterdir() if p.suffix == PUBLISHED_SUFFIX)
             if path.is_dir() else [path])
    heads: list[Head] = []
    for file in files:
        try:
            text = file.read_text(errors="replace")
        except OSError as exc:
            raise AnchorError(f"{file}: {exc.strerror or exc}") from None
        for number, line in enumerate(text.splitlines(), start=1):
            head = _line_head(line, f"{file}:{number}")
            if head is not None:
                heads.append(head)
    return heads


def _line_head(line: str, source: str) -> Head | None:
    stripped = line.strip()
    if stripped.startswith("{"):
        return _published(stripped, source)
    match = _SEQ_HASH.match(stripped)
    if match:
        return Head(int(match[1]), bytes.fromhex(match[2]), source)
    match = _LOG_LINE.search(line)
    if match:
        return Head(int(match[1]), bytes.fromhex(match[2]), source, match[3])
    return None


def _published(line: str, source: str) -> Head:
    try:
        value = orjson.loads(line)
        signature = base64.b64decode(value.pop("signature"), validate=True)
        body = canonical(value)
        checkpoint = Checkpoint.parse(body)
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError,
            binascii.Error):
        raise AnchorError(f"{source}: not a published audit checkpoint") from None
    return Head(checkpoint.count, checkpoint.head, source, checkpoint.log, body, signature)
