"""A link's data frames, below the protocol object: the frames it sends (`OutgoingFrames`), where the handshake's
HTTP head ends, and the frames behind it split at their boundaries (`IncomingFrames`; wslink.py feeds both from
its reads).

Why the link frames its messages itself: the protocol object's serializer makes two payload-sized allocations
per message, and above glibc's 128 KiB mmap threshold each one faults its pages in again (0.8 s/GB measured for
256 KiB messages; masking 64 KiB pieces into a kept buffer: 0.08 s/GB). Its state does not change for a data
frame, so nothing is lost by going around it.

Why not let the protocol object parse every frame: its reader copies each message three times on its way out (into
its buffer, out of it, and unmasked) and runs a generator per frame; rtunnel's messages are almost all final binary
frames, which `IncomingFrames` cuts out of the read itself (one copy, or two when masked). Every other frame (control
frames, fragments, text, anything malformed or over the size limit) goes to the protocol object whole, so that its
parser is at a frame boundary whenever a message is taken here, and every rule it enforces still holds.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

try:
    from websockets.speedups import apply_mask
except ImportError:  # no C extension for this platform: still correct, ~100x slower masking
    from websockets.utils import apply_mask

from ..net.entropy import random_bytes

_FINAL_BINARY = 0x82  # FIN, no RSV bits, opcode 2 (RFC 6455 5.2)
# Masking works on pieces of this size, written into a buffer kept per link.
_MASK_CHUNK = 64 * 1024
_KEEP_FRAME_BUFFER = 1024 * 1024 + 14
_MASKED = 0x80
_HEAD_END = b"\r\n\r\n"


class OutgoingFrames:
    """Final binary frames for one link's messages; masked on a client's link (RFC 6455 5.3)."""

    def __init__(self, *, masked: bool) -> None:
        self._masked = masked
        self._buffer = bytearray()  # for masking large messages: what `frame` returns may be a view of it

    def frame(self, message: bytes | bytearray | memoryview) -> bytes | memoryview:
        """One frame of `message`, valid until the next call (a view of the kept buffer, for large ones)."""
        size = len(message)
        if size < 126:
            head = struct.pack("!BB", _FINAL_BINARY, size)
        elif size < 65536:
            head = struct.pack("!BBH", _FINAL_BINARY, 126, size)
        else:
            head = struct.pack("!BBQ", _FINAL_BINARY, 127, size)
        if not self._masked:
            return b"".join((head, message))
        mask = random_bytes(4)  # unpredictable keys (RFC 6455 5.3)
        head = bytes([head[0], head[1] | _MASKED]) + head[2:] + mask
        if size <= _MASK_CHUNK:
            return b"".join((head, apply_mask(message, mask)))
        total = len(head) + size
        buf = self._buffer
        if len(buf) < total:
            buf = bytearray(total)  # never resized in place: a view of the old one may live on
            if total <= _KEEP_FRAME_BUFFER:
                self._buffer = buf
        buf[: len(head)] = head
        view = memoryview(message)
        offset = len(head)
        for start in range(0, size, _MASK_CHUNK):  # multiples of 4: the mask phase is kept
            piece = apply_mask(view[start : start + _MASK_CHUNK], mask)
            buf[offset + start : offset + start + len(piece)] = piece
        return memoryview(buf)[:total]


class HeadEnd:
    """Where an HTTP head ends in what a handshake reads, so that the protocol object parses the head and the link
    the frames behind it."""

    def __init__(self) -> None:
        self._tail = b""  # the last bytes read, in case the blank line is split between two reads

    def split(self, data: bytes | bytearray) -> tuple[bytes | bytearray, bytes | bytearray | None]:
        """(the part of `data` in the head, what follows it): None while the head goes on past `data`."""
        joined = self._tail + data
        at = joined.find(_HEAD_END)
        if at < 0:
            self._tail = joined[-3:]
            return data, None
        cut = at + len(_HEAD_END) - len(self._tail)
        return data[:cut], data[cut:]


def frame_header(view: memoryview, pos: int, end: int) -> tuple[int, int] | None:
    """(header size with the mask key, payload length) of the frame at `pos`; None until all of its header is in."""
    if end - pos < 2:
        return None
    second = view[pos + 1]
    length = second & 0x7F
    size = 2
    if length == 126:
        size = 4
        if end - pos < size:
            return None
        length = int.from_bytes(view[pos + 2 : pos + 4], "big")
    elif length == 127:
        size = 10
        if end - pos < size:
            return None
        length = int.from_bytes(view[pos + 2 : pos + 10], "big")
    if second & _MASKED:
        size += 4
    return (size, length) if end - pos >= size else None


class IncomingFrames:
    """Splits what the socket brings into frames: final binary frames become messages (`on_message`), the rest goes
    to `to_protocol` in order, each frame whole (in pieces when it spans reads, but never mixed with another).

    `fast_ok()` says whether the protocol object would take a binary frame now as a message of its own (its
    connection is open, no fragmented message is under way, nothing ended the link); when it says no, the frame
    goes to the protocol object, which decides."""

    def __init__(
        self,
        *,
        masked: bool,
        max_size: int,
        on_message: Callable[[bytes | bytearray], None],
        fast_ok: Callable[[], bool],
        to_protocol: Callable[[bytes], None],
    ) -> None:
        self._masked = masked  # a server receives masked frames, a client unmasked ones (RFC 6455 5.3)
        self._max_size = max_size
        self._on_message = on_message
        self._fast_ok = fast_ok
        self._to_protocol = to_protocol
        self._splitting = True  # until a frame over max_size: then the protocol object fails the link on it
        self._pending = b""  # the start of a header that the next read completes
        self._payload: bytearray | None = None  # a message's payload that spans reads, being filled
        self._filled = 0
        self._mask: bytes | None = None
        self._protocol_left = 0  # bytes of the current frame still to go to the protocol object

    def feed(self, data: bytes | bytearray) -> None:
        view = memoryview(self._pending + data if self._pending else data)
        self._pending = b""
        pos, end = 0, len(view)
        while pos < end:
            if self._payload is not None:
                pos = self._fill(view, pos, end)
            elif self._protocol_left:
                size = min(self._protocol_left, end - pos)
                self._protocol_left -= size
                self._to_protocol(bytes(view[pos : pos + size]))
                pos += size
            elif not self._splitting:
                self._to_protocol(bytes(view[pos:]))
                return
            else:
                header = frame_header(view, pos, end)
                if header is None:
                    self._pending = bytes(view[pos:])
                    return
                pos = self._start_frame(view, pos, end, *header)

    def _start_frame(self, view: memoryview, pos: int, end: int, header_size: int, length: int) -> int:
        """Take the frame at `pos` (its header is in): the position after what was taken of it."""
        masked = bool(view[pos + 1] & _MASKED)
        if (
            view[pos] != _FINAL_BINARY
            or masked is not self._masked
            or length > self._max_size
            or not self._fast_ok()
        ):
            if length > self._max_size:
                # The protocol object refuses it as soon as it reads the header (or, with no limit set, which
                # max_size -1 stands for, takes every frame from here on).
                self._splitting = False
            else:
                self._protocol_left = header_size + length
            return pos
        start = pos + header_size
        mask = bytes(view[start - 4 : start]) if masked else None
        stop = start + length
        if stop <= end:
            payload = view[start:stop]
            self._on_message(apply_mask(payload, mask) if mask is not None else bytes(payload))
            return stop
        self._payload = bytearray(length)
        self._filled = 0
        self._mask = mask
        return start

    def _fill(self, view: memoryview, pos: int, end: int) -> int:
        payload = self._payload
        assert payload is not None
        filled = self._filled
        size = min(len(payload) - filled, end - pos)
        payload[filled : filled + size] = view[pos : pos + size]
        filled += size
        if filled < len(payload):
            self._filled = filled
        else:
            self._payload = None
            self._on_message(apply_mask(payload, self._mask) if self._mask is not None else payload)
        return pos + size
