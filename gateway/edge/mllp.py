"""The MLLP listener: accept connections, reassemble frames, answer in order.

One asyncio Protocol per connection, no task per message: frames are handed to the frame
handler (a `gateway.ingest.protocol.FrameHandler`) as they complete and their ACKs written
strictly in arrival order as they resolve (pipelining). A connection that sends faster
than its ACKs resolve, or stops reading its ACKs, is paused on its own; every other
connection carries on.

Slow senders (slow loris) cannot hold the connection slots: a frame must end within
`frame_deadline` of its first byte and arrive at `min_bytes_per_second` at least over each
`rate_window`, a connection that stops reading its ACKs is bounded by `idle_timeout`, and
bytes outside frames are not activity. Violators are evicted (closed, counted, logged with
their address and why). With an allow-list that reserves slots, other peers draw only on
the unreserved ones, so they cannot take the last slot a named sender needs.

Memory: unfinished frames are charged to the edge's `Budget` as they are read, beside the
whole frames the handler holds. While it is full, no connection is read until answered
frames give bytes back; when only unfinished frames fill it (nothing would give any back),
the frame whose read crossed the line is dropped and answered AR instead.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections import deque
from collections.abc import Iterable
from typing import Any, cast

from opentelemetry import metrics

from gateway.edge.dn import from_certificate
from gateway.edge.tls import NameKey, Reservations
from gateway.hl7.mllp import FrameDecoder, FrameTooLarge, frame
from gateway.ingest.protocol import Budget, FrameHandler, Peer, Reply

log = logging.getLogger(__name__)

# Why a connection was evicted: the metric's label (a fixed word) and the log's text.
FRAME_DEADLINE = "frame_deadline"
MIN_RATE = "min_rate"
UNREAD_ACKS = "unread_acks"
_EVICTED_BECAUSE = {
    FRAME_DEADLINE: "a frame was not complete within mllp.frame_deadline",
    MIN_RATE: "a frame arrived slower than mllp.min_bytes_per_second",
    UNREAD_ACKS: "its ACKs went unread for longer than mllp.idle_timeout",
}
# The most one read of a socket returns (asyncio's and uvloop's transports): the room the
# budget keeps free, so the read that comes after it says "full" cannot cross its limit.
_READ_BYTES = 256 * 1024
# The shared pool's name in a connection's slot (a reserve is named by its subject's
# RDNs; no subject has none).
_SHARED: NameKey = ()


class MllpServer:
    """Owns the listening socket and the live connections."""

    def __init__(
        self,
        ingest: FrameHandler,
        *,
        max_frame_bytes: int,
        idle_timeout: float,
        max_connections: int,
        max_in_flight: int,
        max_buffered_bytes: int = 256 * 1024 * 1024,
        frame_deadline: float = 120.0,
        min_bytes_per_second: float = 0.0,
        rate_window: float = 10.0,
        reservations: Reservations | None = None,
        ssl_context: ssl.SSLContext | None = None,
        meter: metrics.Meter | None = None,
        budget: Budget | None = None,
    ) -> None:
        self._ingest = ingest
        self.max_frame_bytes = max_frame_bytes
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self.max_in_flight = max_in_flight
        self.max_buffered_bytes = max_buffered_bytes
        self.frame_deadline = frame_deadline
        self.min_bytes_per_second = min_bytes_per_second
        self.rate_window = rate_window
        self._reservations = reservations
        # Slots in use: the shared pool, and each named sender's reserve.
        self._shared_limit = max_connections - (reservations.total if reservations else 0)
        self._shared_used = 0
        self._reserve_used: dict[NameKey, int] = {}
        # Bytes of unfinished frames held across all connections (memory bound).
        self.buffered_bytes = 0
        # The edge's memory budget, shared with the handler; while `memory_paused` no
        # connection is read.
        self.budget = budget
        self.memory_paused = False
        if budget is not None:
            budget.headroom = _READ_BYTES
            budget.on_room = self._room
        self._ssl = ssl_context
        self._server: asyncio.Server | None = None
        self._connections: set[MllpConnection] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self.skipped_bytes = 0
        meter = meter or metrics.NoOpMeter("isthmus")
        self._open_connections = meter.create_up_down_counter(
            "isthmus.mllp.connections", description="open MLLP connections")
        self._refused = meter.create_counter(
            "isthmus.mllp.connections_refused", description="connections over the limit")
        self._evictions = meter.create_counter(
            "isthmus.mllp.evictions",
            description="connections closed for a slow frame or unread ACKs, by reason")
        self._skipped = meter.create_counter(
            "isthmus.mllp.skipped_bytes", unit="By",
            description="bytes received outside MLLP frames (discarded)")
        self._paused = meter.create_counter(
            "isthmus.mllp.backpressure_pauses",
            description="times a connection stopped being read: its ACKs behind, or the memory "
                        "budget full")
        # Read when metrics are collected, so the hot path pays nothing for them.
        meter.create_observable_gauge(
            "isthmus.mllp.in_flight", callbacks=[self._observe_in_flight],
            description="MLLP messages received and not yet answered")
        meter.create_observable_gauge(
            "isthmus.mllp.buffered_bytes", callbacks=[self._observe_buffered], unit="By",
            description="bytes of unfinished MLLP frames held across all connections")

    def _observe_in_flight(self, options: metrics.CallbackOptions
                           ) -> Iterable[metrics.Observation]:
        # May run on an exporter's thread: list() copies the set in one step.
        return [metrics.Observation(sum(conn.in_flight for conn in list(self._connections)))]

    def _observe_buffered(self, options: metrics.CallbackOptions
                          ) -> Iterable[metrics.Observation]:
        return [metrics.Observation(self.buffered_bytes)]

    def paused(self) -> None:
        """A connection stopped being read (backpressure)."""
        self._paused.add(1)

    def mind_budget(self, conn: MllpConnection) -> None:
        """After `conn` read: if the budget is full, stop reading every connection while
        answered frames will give bytes back; if only unfinished frames hold it, drop the
        one `conn` is receiving (AR "resend later"): waiting would free nothing."""
        budget = self.budget
        if budget is None or not budget.full:
            return
        if not budget.draining:
            conn.drop_partial()
            return
        if not self.memory_paused:
            self.memory_paused = True
            for other in list(self._connections):
                other._update_reading()

    def _room(self) -> None:
        """The budget has room again, or nothing but unfinished frames fills it (which only
        reading on can resolve: `mind_budget` drops the frame whose read crosses the line):
        read every connection."""
        if self.memory_paused:
            self.memory_paused = False
            for conn in list(self._connections):
                conn._update_reading()

    @property
    def ingest(self) -> FrameHandler:
        return self._ingest

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    async def start(self, host: str, port: int) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: MllpConnection(self), host, port, ssl=self._ssl, backlog=1024,
            reuse_address=True,
            # A client that connects and never completes the handshake is not yet a
            # connection the idle sweeper sees; bound it here instead of asyncio's 60 s.
            ssl_handshake_timeout=min(self.idle_timeout, 10.0) if self._ssl else None,
        )
        self._sweeper = asyncio.create_task(self._sweep(), name="mllp-sweeper")
        sockname = self._server.sockets[0].getsockname()
        return str(sockname[0]), int(sockname[1])

    def register(self, conn: MllpConnection) -> bool:
        slot = self._take_slot(conn.peer)
        if slot is None:
            self._refused.add(1)
            return False
        conn.slot = slot
        self._connections.add(conn)
        self._open_connections.add(1)
        return True

    def _take_slot(self, peer: Peer) -> NameKey | None:
        """The pool a new connection's slot comes from: its subject's reserve while that
        has room, else the shared pool; None when neither has a free slot for it."""
        reservations = self._reservations
        key = reservations.key_for(peer) if reservations is not None else None
        if key is not None and reservations is not None:
            used = self._reserve_used.get(key, 0)
            if used < reservations.slots[key]:
                self._reserve_used[key] = used + 1
                return key
        if self._shared_used < self._shared_limit:
            self._shared_used += 1
            return _SHARED
        return None

    def unregister(self, conn: MllpConnection) -> None:
        if conn not in self._connections:
            return
        self._connections.discard(conn)
        if conn.slot == _SHARED:
            self._shared_used -= 1
        else:
            self._reserve_used[conn.slot] -= 1
        self.buffered_bytes -= conn.decoder.buffered
        conn.decoder.abandon()
        conn.recharge()
        self._open_connections.add(-1)
        skipped = conn.decoder.skipped_bytes
        if skipped:
            self.skipped_bytes += skipped
            self._skipped.add(skipped)
            # A count only: the bytes themselves may be message content.
            log.info("MLLP connection from %s sent %d bytes outside frames (discarded)",
                     conn.peer.address, skipped)

    async def _sweep(self) -> None:
        """Close idle connections and evict slow ones, a few times per deadline."""
        bounds = [self.idle_timeout / 4, self.frame_deadline / 4, 5.0]
        if self.min_bytes_per_second:
            bounds.append(self.rate_window / 2)
        interval = max(0.05, min(bounds))
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for conn in list(self._connections):
                reason = conn.overdue(now)
                if reason is not None:
                    self.evict(conn, reason)
                elif conn.idle_since(now - self.idle_timeout):
                    conn.close("idle timeout")

    def evict(self, conn: MllpConnection, reason: str) -> None:
        """Close a connection that holds a slot without making progress, at once."""
        self._evictions.add(1, {"mllp.eviction_reason": reason})
        # The address and the rule broken; never a byte of what it sent.
        log.warning("evicted MLLP connection from %s: %s", conn.peer.address,
                    _EVICTED_BECAUSE[reason])
        conn.abort()

    async def stop(self, timeout: float) -> None:
        """Stop accepting, let in-flight messages finish and their ACKs go out, close all."""
        if self._server is None:
            return
        self._server.close()
        for conn in list(self._connections):
            conn.stop_reading()
        deadline = time.monotonic() + timeout
        while any(conn.busy for conn in self._connections) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for conn in list(self._connections):
            conn.close("shutting down")
        if self._sweeper is not None:
            self._sweeper.cancel()
        try:
            await asyncio.wait_for(self._server.wait_closed(), timeout=1.0)
        except TimeoutError:
            log.warning("MLLP listener did not close within 1 s")
        self._server = None


class MllpConnection(asyncio.Protocol):
    """One client connection: frames in, ACKs out in the same order."""

    def __init__(self, server: MllpServer) -> None:
        self._server = server
        self.decoder = FrameDecoder(server.max_frame_bytes)
        self._transport: asyncio.Transport | None = None
        self._peer = Peer("unknown")
        self._replies: deque[asyncio.Future[Reply]] = deque()
        self._last_activity = time.monotonic()
        self._reading_paused = False
        self._writing_paused = False
        self._stopped = False
        # Which pool this connection's slot came from (set by the server on register).
        self.slot: NameKey = _SHARED
        # The open frame's first byte (None between frames), and the bytes received in
        # the current rate window; both clocks stop while we are not reading.
        self._frame_started: float | None = None
        self._window_started = 0.0
        self._window_bytes = 0
        self._paused_at = 0.0
        self._writing_paused_at = 0.0
        # The bytes of the unfinished frame charged to the server's budget.
        self._charged = 0

    @property
    def peer(self) -> Peer:
        return self._peer

    # -- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (asyncio's or uvloop's, which does not subclass asyncio's).
        transport = cast(asyncio.Transport, transport)
        self._transport = transport
        self._peer = Peer(_address(transport.get_extra_info("peername")),
                          _tls_subject(transport.get_extra_info("ssl_object")))
        if not self._server.register(self):
            log.warning("MLLP connection from %s refused: no free slot (%d open, "
                        "mllp.max_connections %d)", self._peer.address,
                        self._server.connection_count, self._server.max_connections)
            transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self._server.unregister(self)
        self._transport = None

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        server = self._server
        decoder = self.decoder
        before = decoder.buffered
        was_in_frame = decoder.in_frame
        closed = decoder.frames_closed
        items = decoder.feed(data)
        server.buffered_bytes += decoder.buffered - before
        if decoder.in_frame:
            if not was_in_frame or decoder.frames_closed != closed:
                # A frame began in this read: its deadline and rate window start now. A
                # new start block inside an open frame does not restart them.
                self._frame_started = now
                self._window_started = now
                self._window_bytes = 0
            else:
                self._window_bytes += len(data)
        else:
            self._frame_started = None
        if decoder.in_frame or decoder.frames_closed != closed:
            # Only frames are activity: stray bytes trickled between frames are not.
            self._last_activity = now
        if server.buffered_bytes > server.max_buffered_bytes:
            # This connection pushed the total over: its unfinished frame is the one refused.
            held = self.decoder.buffered
            dropped = self.decoder.abandon()
            if dropped is not None:
                server.buffered_bytes -= held
                items.append(dropped)
        # Before the frames are handed on: a whole frame's bytes move from the listener's
        # charge to the handler's.
        self.recharge()
        for item in items:
            self._dispatch(item)
        server.mind_budget(self)

    def recharge(self) -> None:
        """Charge the budget for what the unfinished frame now holds."""
        budget = self._server.budget
        if budget is not None:
            held = self.decoder.buffered
            budget.receive(held - self._charged)
            self._charged = held

    def drop_partial(self) -> None:
        """Give up the unfinished frame for memory (the rest of it is discarded); its
        sender is answered AR "resend later" at once."""
        held = self.decoder.buffered
        dropped = self.decoder.abandon()
        if dropped is not None:
            self._server.buffered_bytes -= held
            self.recharge()
            self._dispatch(dropped)

    def pause_writing(self) -> None:
        # The client is not reading its ACKs: stop reading its messages until it does.
        self._writing_paused = True
        self._writing_paused_at = time.monotonic()
        self._update_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._update_reading()

    # -- frames and replies ---------------------------------------------------------------

    def _dispatch(self, item: bytes | FrameTooLarge) -> None:
        reply = self._server.ingest.handle(item, self._peer, self.push)
        self._replies.append(reply)
        if reply.done() and len(self._replies) == 1:
            self._flush()
        else:
            reply.add_done_callback(self._on_reply)
            self._update_reading()

    def push(self, message: bytes) -> None:
        """Send an unsolicited message (an application ACK) after every answer already
        queued, if the connection is open; if closed, the outcome stays in the inbox."""
        if self._transport is None or self._transport.is_closing():
            log.info("application ACK not sent: the sender's connection is closed")
            return
        ready: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        ready.set_result(message)
        self._replies.append(ready)
        self._flush()

    def _on_reply(self, _: asyncio.Future[Reply]) -> None:
        self._flush()

    def _flush(self) -> None:
        """Write every ACK at the head of the queue that is ready, in arrival order."""
        replies = self._replies
        out: list[bytes] = []
        while replies and replies[0].done():
            ack = replies.popleft().result()
            if ack is not None:
                out.append(frame(ack))
        if out and self._transport is not None and not self._transport.is_closing():
            self._transport.write(b"".join(out))
            self._last_activity = time.monotonic()
        self._update_reading()

    def _update_reading(self) -> None:
        if self._transport is None or self._stopped:
            return
        server = self._server
        should_pause = (self._writing_paused or len(self._replies) >= server.max_in_flight
                        or server.memory_paused)
        if should_pause and not self._reading_paused:
            self._transport.pause_reading()
            self._reading_paused = True
            self._paused_at = time.monotonic()
            self._server.paused()
        elif not should_pause and self._reading_paused:
            self._transport.resume_reading()
            self._reading_paused = False
            # The time we did not read is ours, not the sender's: its clocks resume.
            now = time.monotonic()
            if self._frame_started is not None:
                self._frame_started += now - self._paused_at
            self._window_started = now
            self._window_bytes = 0

    # -- lifecycle ------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return len(self._replies)

    @property
    def busy(self) -> bool:
        """Messages in flight: received, not yet answered."""
        return bool(self._replies)

    def idle_since(self, deadline: float) -> bool:
        return not self._replies and self._last_activity < deadline

    def overdue(self, now: float) -> str | None:
        """Why this connection should be evicted now (a reason word), or None."""
        server = self._server
        if self._transport is None or self._transport.is_closing():
            return None  # already on its way out (evicted or closed): count it once
        if self._reading_paused:
            # Not read by our choice (backpressure): only a client that leaves its ACKs
            # unread for as long as an idle connection is allowed to live is at fault.
            if self._writing_paused and now - self._writing_paused_at > server.idle_timeout:
                return UNREAD_ACKS
            return None
        started = self._frame_started
        if started is None:
            return None
        if now - started > server.frame_deadline:
            return FRAME_DEADLINE
        elapsed = now - self._window_started
        if server.min_bytes_per_second and elapsed >= server.rate_window:
            if self._window_bytes < server.min_bytes_per_second * elapsed:
                return MIN_RATE
            self._window_started = now
            self._window_bytes = 0
        return None

    def stop_reading(self) -> None:
        self._stopped = True
        if self._transport is not None and not self._reading_paused:
            self._transport.pause_reading()
            self._reading_paused = True

    def close(self, why: str) -> None:
        if self._transport is not None and not self._transport.is_closing():
            log.debug("closing MLLP connection from %s: %s", self._peer.address, why)
            self._transport.close()

    def abort(self) -> None:
        """Close now, dropping unsent ACKs: a close() would wait for a peer that may never
        read them, and the slot is only free once the connection is gone."""
        if self._transport is not None:
            self._transport.abort()


def _address(peername: Any) -> str:
    if isinstance(peername, tuple) and len(peername) >= 2:
        return f"{peername[0]}:{peername[1]}"
    return str(peername)


def _tls_subject(ssl_object: Any) -> str | None:
    """The verified peer certificate's subject as RFC 4514 writes it (last RDN first:
    'CN=lab.example,O=Example Lab' for '/O=Example Lab/CN=lab.example'), else None.

    Read from the certificate's DER, values escaped as RFC 4514 says, so a common name
    holding ',O=…' cannot pose as another subject on the allow-list.
    """
    getpeercert = getattr(ssl_object, "getpeercert", None)
    # The decoded form is empty unless the certificate was verified against our CA.
    if getpeercert is None or not getpeercert():
        return None
    try:
        return from_certificate(getpeercert(binary_form=True)).rfc4514()
    except ValueError as exc:
        log.warning("MLLP peer certificate subject unreadable: %s", exc)
        return None
