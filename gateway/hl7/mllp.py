"""MLLP framing (HL7 v2 Appendix C): 0x0B, payload, 0x1C 0x0D. Bytes in, frames out.

The decoder is a push parser with no I/O: feed it whatever a socket read returned and it
yields every complete frame, however the bytes were split or joined by the network.
"""

from __future__ import annotations

from dataclasses import dataclass

START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c\x0d"
_FS = 0x1C
_CR = 0x0D
# Enough of an oversize frame to read its MSH segment for the answer.
_HEAD_BYTES = 4096


def frame(payload: bytes) -> bytes:
    return START_BLOCK + payload + END_BLOCK


@dataclass(frozen=True, slots=True)
class FrameTooLarge:
    """A frame grew past the limit; the rest of it is discarded, not buffered.

    `head` keeps the frame's first bytes so the answer can still echo MSH-10.
    """

    limit: int
    head: bytes = b""
    # "frame": this frame passed the per-frame limit; "gateway": partial frames across all
    # connections passed the gateway's memory limit and this one was dropped to stay under.
    scope: str = "frame"


class FrameDecoder:
    """Reassemble MLLP frames from a byte stream, skipping and counting stray bytes."""

    __slots__ = ("max_frame_bytes", "skipped_bytes", "frames_closed", "_buf", "_in_frame",
                 "_discarding", "_pending_fs")

    def __init__(self, max_frame_bytes: int) -> None:
        self.max_frame_bytes = max_frame_bytes
        self.skipped_bytes = 0
        # Frames that reached their end block (kept, refused or discarded): a caller's
        # clock for "how long has this frame been open" restarts only when this moves,
        # not when a new start block abandons a partial frame.
        self.frames_closed = 0
        self._buf = bytearray()
        self._in_frame = False
        self._discarding = False
        # The previous read ended on 0x1C: the frame ends if this read starts with 0x0D.
        self._pending_fs = False

    @property
    def buffered(self) -> int:
        return len(self._buf)

    @property
    def in_frame(self) -> bool:
        return self._in_frame

    def feed(self, data: bytes) -> list[bytes | FrameTooLarge]:
        out: list[bytes | FrameTooLarge] = []
        pos = 0
        end = len(data)
        while pos < end:
            if not self._in_frame:
                start = data.find(START_BLOCK, pos)
                if start < 0:
                    self.skipped_bytes += end - pos
                    return out
                self.skipped_bytes += start - pos
                self._open()
                pos = start + 1
                continue
            if self._pending_fs:
                self._pending_fs = False
                if data[pos] == _CR:
                    self._close(out, with_trailing_fs=True)
                    pos += 1
                    continue
            pos = self._scan(data, pos, out)
        return out

    def _scan(self, data: bytes, pos: int, out: list[bytes | FrameTooLarge]) -> int:
        stop = data.find(END_BLOCK, pos)
        limit = len(data) if stop < 0 else stop
        restart = data.find(START_BLOCK, pos, limit)
        if restart >= 0:
            # A new start block before this frame ended: the sender gave up on the partial
            # frame (for example after a timeout); drop it and begin again.
            self.skipped_bytes += len(self._buf) + (restart - pos)
            self._open()
            return restart + 1
        # A view, not a slice: the chunk is copied once, into the frame's buffer.
        self._append(memoryview(data)[pos:limit], out)
        if stop >= 0:
            self._close(out, with_trailing_fs=False)
            return stop + 2
        if data[-1] == _FS:
            self._pending_fs = True
        return len(data)

    def _open(self) -> None:
        self._buf.clear()
        self._in_frame = True
        self._discarding = False
        self._pending_fs = False

    def _append(self, chunk: memoryview, out: list[bytes | FrameTooLarge]) -> None:
        if self._discarding:
            return
        if len(self._buf) + len(chunk) > self.max_frame_bytes + 1:
            # +1: a trailing 0x1C may still turn out to be half of the end block.
            head = bytes((self._buf + chunk[:_HEAD_BYTES])[:_HEAD_BYTES])
            self._buf.clear()
            self._discarding = True
            out.append(FrameTooLarge(self.max_frame_bytes, head))
            return
        self._buf += chunk

    def abandon(self) -> FrameTooLarge | None:
        """Drop the partial frame being buffered (memory pressure); the rest is discarded."""
        if not self._in_frame or self._discarding or not self._buf:
            return None
        head = bytes(self._buf[:_HEAD_BYTES])
        self._buf.clear()
        self._discarding = True
        return FrameTooLarge(self.max_frame_bytes, head, scope="gateway")

    def _close(self, out: list[bytes | FrameTooLarge], with_trailing_fs: bool) -> None:
        if not self._discarding:
            if with_trailing_fs:
                del self._buf[-1:]  # in place: a slice would be one more copy of the frame
            payload = bytes(self._buf)
            if len(payload) > self.max_frame_bytes:
                out.append(FrameTooLarge(self.max_frame_bytes, payload[:_HEAD_BYTES]))
            else:
                out.append(payload)
        self._buf.clear()
        self._in_frame = False
        self._discarding = False
        self.frames_closed += 1
