"""Checking a chain: from the live store or from an export, one record at a time.

The verifier is fed records in sequence order and collects every problem it can place,
each at the record where it shows, so the first one names the first bad record:

- a record whose contents or position do not give its chain hash (changed, reordered,
  inserted);
- a missing sequence number (deleted), or records missing after the last one present
  that a signed checkpoint covers (truncated);
- a record whose MAC does not verify (written without the audit key: a rewritten or
  extended tail, also after the last checkpoint);
- a chain that does not reach the head hash a checkpoint signed (a rewrite with
  recomputed hashes), and checkpoints that are forged, altered or signed by an unknown key;
- given heads kept outside the store (`anchor.py`): a chain that ends before one of them
  (rolled back, truncated with its checkpoints) or does not pass through it (replaced).

An export holds only the records asked for, so its chain comes in segments, each running
from one signed checkpoint to the next; a segment may start only right after a checkpoint
(or the purge anchor, or the start of the log) and must end on one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from gateway.audit.anchor import Head
from gateway.audit.chain import Chain, Checkpoint, genesis, link, open_checkpoint


@dataclass(frozen=True, slots=True)
class Problem:
    """What is wrong, placed at the record where it shows."""

    position: int
    reason: str
    checkpoint: bool = False

    def __str__(self) -> str:
        what = "checkpoint at record" if self.checkpoint else "record"
        return f"{what} {self.position}: {self.reason}"


@dataclass
class Report:
    """The outcome of a verification."""

    records: int = 0
    first: int | None = None
    last: int | None = None
    checkpoints: int = 0
    signed_through: int = 0
    purged: int = 0
    problems: list[Problem] = field(default_factory=list)
    exported: int | None = None  # records shown in an export (the rest are digests)
    # Heads kept outside the store that the chain was checked against (None: none given),
    # and the furthest one it reaches, with where that head came from.
    anchors: int | None = None
    anchored_through: int = 0
    anchored_by: str = ""

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def unsigned(self) -> int:
        """Records after the last checkpoint that matched (covered by MACs only)."""
        return max(0, (self.last or 0) - self.signed_through)

    def sorted_problems(self) -> list[Problem]:
        return sorted(self.problems, key=lambda p: (p.position, p.checkpoint))

    def summary(self) -> str:
        if not self.ok:
            first = self.sorted_problems()[0]
            return f"audit trail NOT intact: {first}"
        if not self.records:
            span = "no records"
        elif self.exported is not None:
            span = (f"{self.exported} exported records, chained through {self.records} "
                    f"records ({self.first}..{self.last})")
        else:
            span = f"{self.records} records ({self.first}..{self.last})"
        purged = f", records 1..{self.purged} purged by retention" if self.purged else ""
        signed = (f", signed through record {self.signed_through}" if self.signed_through
                  else ", no signed checkpoint yet")
        return (f"audit trail intact: {span}, {self.checkpoints} signed checkpoints"
                f"{signed}{purged}{self._anchored()}")

    def _anchored(self) -> str:
        if self.anchors is None:
            return ""
        if not self.anchored_through:
            return f"; none of the {self.anchors} heads given is after the purge"
        return f"; anchored up to record {self.anchored_through} by {self.anchored_by}"


class ChainVerifier:
    """Feed records in sequence order with `record`; `finish` returns the report.

    `segments` allows the gaps an export has between checkpoint-bounded segments; the
    live store allows none. `chain` (holding the MAC key) checks MACs where given.
    """

    def __init__(self, log_id: str | None, checkpoints: Iterable[tuple[bytes, bytes]],
                 trusted: Mapping[str, Ed25519PublicKey], *, segments: bool = False,
                 chain: Chain | None = None) -> None:
        self.report = Report()
        self._segments = segments
        self._chain = chain
        self._trusted = trusted
        self._by_count: dict[int, list[Checkpoint]] = {}
        anchor: Checkpoint | None = None
        for body, signature in checkpoints:
            checkpoint, reason = open_checkpoint(body, signature, trusted)
            if checkpoint is None:
                self._problem(_count_of(body), reason, checkpoint=True)
                continue
            if log_id is not None and checkpoint.log != log_id:
                self._problem(checkpoint.count, "it belongs to another audit log",
                              checkpoint=True)
                continue
            log_id = checkpoint.log
            self.report.checkpoints += 1
            self._by_count.setdefault(checkpoint.count, []).append(checkpoint)
            if checkpoint.purged and (anchor is None or checkpoint.purged > anchor.purged):
                anchor = checkpoint
        self._log_id = log_id
        self._purged = anchor.purged if anchor else 0
        self._purged_head = anchor.purged_head if anchor else None
        self.report.purged = self._purged
        self._expected: int | None = None
        self._prev: bytes | None = None
        self._segment_start = self._purged + 1
        self._segment_problem = False
        self._heads: dict[int, list[Head]] = {}

    @property
    def log_id(self) -> str | None:
        return self._log_id

    def expect(self, heads: Sequence[Head]) -> None:
        """Heads kept outside the store that the chain must reach and pass through; call
        before feeding records. Heads of other logs are left aside (a shared file), but
        heads of none but other logs mean this is not the log they were taken from."""
        report = self.report
        report.anchors = (report.anchors or 0) + len(heads)
        ours = [h for h in heads if h.log is None or h.log == self._log_id]
        if heads and not ours:
            logs = ", ".join(sorted({str(h.log) for h in heads}))
            self._problem(1, f"the heads in {heads[0].source.rpartition(':')[0] or 'it'} "
                             f"belong to audit log {logs}, this store is log {self._log_id}: "
                             "the audit database was replaced")
        for head in ours:
            if head.body is not None and head.signature is not None:
                checkpoint, reason = open_checkpoint(head.body, head.signature,
                                                     self._trusted)
                if checkpoint is None:
                    self._problem(head.seq, f"the head {head.source} holds: {reason}",
                                  checkpoint=True)
                    continue
            self._heads.setdefault(head.seq, []).append(head)

    def _anchor_reached(self, seq: int, current: bytes | None) -> None:
        for head in self._heads.get(seq, ()):
            if current is not None and current == head.hash:
                if seq >= self.report.anchored_through:
                    self.report.anchored_through, self.report.anchored_by = seq, head.source
                continue
            self._problem(seq, f"it does not match the head {head.source} holds: the audit "
                               "trail was rewritten or replaced")

    def _anchors_beyond(self, last: int) -> None:
        """Heads the chain never reached: past its end (cut off), or at the purge anchor."""
        if self._purged in self._heads and self._purged_head is not None:
            self._anchor_reached(self._purged, self._purged_head)
        beyond = [h for seq, heads in self._heads.items() if seq > last for h in heads]
        if beyond:
            head = max(beyond, key=lambda h: h.seq)
            self._problem(last + 1, f"{_missing(last + 1, head.seq)}: the trail ends at "
                                    f"record {last} but {head.source} holds its head at "
                                    f"record {head.seq} (rolled back or truncated)")

    def problem(self, position: int, reason: str) -> None:
        """Add a problem found outside the chain (columns, manifest, rendering)."""
        self._problem(position, reason)

    def _problem(self, position: int, reason: str, checkpoint: bool = False) -> None:
        self.report.problems.append(Problem(position, reason, checkpoint))
        self._segment_problem = True

    def _anchor(self, seq: int) -> bytes | None:
        """The trusted hash of record seq-1: genesis, the purge anchor or a checkpoint."""
        before = seq - 1
        if before == self._purged:
            if before == 0:
                return genesis(self._log_id) if self._log_id is not None else None
            return self._purged_head
        heads = self._by_count.get(before)
        return heads[0].head if heads else None

    def record(self, seq: int, body_digest: bytes, stored_hash: bytes | None = None,
               mac: bytes | None = None, mac_key: str | None = None) -> None:
        """One record (or, in an export, the digest of one not shown)."""
        report = self.report
        if self._expected is not None and seq < self._expected:
            self._problem(seq, "it appears out of order or twice")
            return
        if self._expected is None or seq != self._expected:
            self._start_segment(seq)
        report.records += 1
        if report.first is None:
            report.first = seq
        report.last = seq
        computed = link(self._prev, seq, body_digest) if self._prev is not None else None
        if computed is not None and stored_hash is not None and computed != stored_hash:
            self._problem(seq, "its contents or position do not match its chain hash "
                               "(changed, reordered or inserted)")
        current = stored_hash if stored_hash is not None else computed
        if mac is not None and current is not None:
            self._check_mac(seq, current, mac, mac_key)
        self._check_checkpoints(seq, current)
        if self._heads:
            self._anchor_reached(seq, current)
        self._prev = current
        self._expected = seq + 1

    def _start_segment(self, seq: int) -> None:
        if self._expected is None:
            start = self._purged + 1
            if seq < start:
                self._problem(seq, f"it should have been purged (the log continues from "
                                   f"record {start})")
            elif seq > start and not self._segments:
                self._problem(start, _missing(start, seq - 1))
        elif not self._segments:
            self._problem(self._expected, _missing(self._expected, seq - 1))
        elif self._expected - 1 not in self._by_count:
            # The segment before must end on a checkpoint.
            self._problem(self._expected, "it is missing from the chain data")
        self._prev = self._anchor(seq)
        if self._prev is None and self._segments:
            # An export's segment must start right after a trusted hash; the live store
            # has reported the gap above and carries on from the stored hashes.
            self._problem(seq, "no signed checkpoint anchors the chain before it "
                               f"(record {seq - 1} is missing)")
        self._segment_start = seq
        self._segment_problem = False

    def _check_mac(self, seq: int, current: bytes, mac: bytes, mac_key: str | None) -> None:
        chain = self._chain
        if chain is None:
            return
        if mac_key == chain.mac_key_id:
            if chain.mac(current) != mac:
                self._problem(seq, "its MAC does not verify: written or rewritten without "
                                   "the audit key")
        elif mac_key not in self._trusted:
            self._problem(seq, f"sealed with key {mac_key}, which is not trusted here")

    def _check_checkpoints(self, seq: int, current: bytes | None) -> None:
        for checkpoint in self._by_count.get(seq, ()):
            if current is not None and checkpoint.head == current:
                self.report.signed_through = max(self.report.signed_through, seq)
                continue
            if self._segment_problem or any(
                    self._segment_start <= p.position <= seq for p in self.report.problems):
                # A record in this segment is already named: this only confirms it.
                self._problem(seq, "the chain does not reach the head hash signed here",
                              checkpoint=True)
            else:
                self._problem(self._segment_start,
                              f"records {self._segment_start}..{seq} do not match the "
                              f"checkpoint signed at record {seq} (rewritten)")
        if seq in self._by_count:
            self._segment_start = seq + 1
            self._segment_problem = False

    def finish(self) -> Report:
        last = self._expected - 1 if self._expected is not None else self._purged
        if self._segments and self._expected is not None and last not in self._by_count:
            self._problem(last + 1, "it is missing from the chain data (the segment does "
                                    "not end on a signed checkpoint)")
        if self._heads:
            self._anchors_beyond(last)
        covered = max((c for c in self._by_count if c > last), default=None)
        if covered is not None and not self._segments:
            self._problem(last + 1, f"{_missing(last + 1, covered)}: the log ends at record "
                                    f"{last} but a checkpoint signed record {covered}")
        return self.report


def _missing(first: int, last: int) -> str:
    if first == last:
        return "it is missing (deleted)"
    return f"records {first}..{last} are missing (deleted)"


def _count_of(body: bytes) -> int:
    try:
        return Checkpoint.parse(body).count
    except (ValueError, KeyError, TypeError):
        return 0
