"""Frame and head codecs (SPEC.md sections 3-5). Pure functions over bytes; no connection state here."""

from __future__ import annotations

import dataclasses
import enum
import struct
from collections.abc import Sequence

from ._errors import ErrorCode, HeadNotEncodable, HeadPart, RemoteProtocolError

FRAME_HEADER_SIZE = 9
PROTOCOL_VERSION = 1

# Length (u24) and Type (u8) share one u32, then Flags (u8) and R+Stream Identifier (u32): 9 octets.
_HEADER = struct.Struct(">IBI")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_GOAWAY = struct.Struct(">II")
_HELLO = struct.Struct(">HH")
_SETTING = struct.Struct(">HI")
_STATUS = struct.Struct(">HB")

FLAG_END_STREAM = 0x1
FLAG_ACK = 0x1


class FrameType(enum.IntEnum):
    HELLO = 0x0
    OPEN = 0x1
    REPLY = 0x2
    DATA = 0x3
    TRAILERS = 0x4
    WINDOW_UPDATE = 0x5
    RESET = 0x6
    PING = 0x7
    GOAWAY = 0x8


HEAD_FRAME_TYPES = frozenset({FrameType.OPEN, FrameType.REPLY, FrameType.TRAILERS})
STREAM_FRAME_TYPES = frozenset(
    {FrameType.OPEN, FrameType.REPLY, FrameType.DATA, FrameType.TRAILERS, FrameType.RESET}
)
CONNECTION_FRAME_TYPES = frozenset({FrameType.HELLO, FrameType.PING, FrameType.GOAWAY})

Headers = tuple[tuple[bytes, bytes], ...]


@dataclasses.dataclass(frozen=True, slots=True)
class RequestHead:
    """An HTTP request head: method, request-target and headers as exact octets, order and duplicates kept."""

    method: bytes
    target: bytes
    headers: Headers = ()


@dataclasses.dataclass(frozen=True, slots=True)
class ResponseHead:
    """An HTTP response head. 1xx other than 101 is interim: more heads follow (SPEC 4.3)."""

    status: int
    reason: bytes = b""
    headers: Headers = ()

    @property
    def is_interim(self) -> bool:
        return 100 <= self.status <= 199 and self.status != 101


class HeadDecodeError(Exception):
    """A head payload does not parse. Confined to its stream (SPEC 4: stream error PROTOCOL_ERROR)."""


def pack_header(length: int, frame_type: int, flags: int, stream_id: int) -> bytes:
    return _HEADER.pack((length << 8) | frame_type, flags, stream_id)


def unpack_header(buf: bytes | memoryview, offset: int) -> tuple[int, int, int, int]:
    """Return (length, type, flags, stream_id) of the header at `offset`; the R bit is dropped."""
    length_type, flags, stream_id = _HEADER.unpack_from(buf, offset)
    return length_type >> 8, length_type & 0xFF, flags, stream_id & 0x7FFFFFFF


def encode_frame(frame_type: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return pack_header(len(payload), frame_type, flags, stream_id) + payload


# -- fixed-layout payloads ------------------------------------------------------------------------


def encode_hello(settings_pairs: Sequence[tuple[int, int]], version: int = PROTOCOL_VERSION) -> bytes:
    payload = _HELLO.pack(version, 0) + b"".join(_SETTING.pack(i, v) for i, v in settings_pairs)
    return encode_frame(FrameType.HELLO, 0, 0, payload)


def decode_hello(payload: bytes | memoryview) -> tuple[int, list[tuple[int, int]]]:
    if len(payload) < _HELLO.size or (len(payload) - _HELLO.size) % _SETTING.size:
        raise RemoteProtocolError(
            f"HELLO payload of {len(payload)} octets is not 4 + 6n", ErrorCode.FRAME_SIZE_ERROR
        )
    version, _ = _HELLO.unpack_from(payload, 0)
    pairs = [
        _SETTING.unpack_from(payload, offset) for offset in range(_HELLO.size, len(payload), _SETTING.size)
    ]
    return version, pairs


def encode_window_update(stream_id: int, increment: int) -> bytes:
    return pack_header(4, FrameType.WINDOW_UPDATE, 0, stream_id) + _U32.pack(increment)


def encode_reset(stream_id: int, error_code: int) -> bytes:
    return pack_header(4, FrameType.RESET, 0, stream_id) + _U32.pack(error_code)


def encode_ping(opaque: bytes, *, ack: bool = False) -> bytes:
    return pack_header(8, FrameType.PING, FLAG_ACK if ack else 0, 0) + opaque


def encode_goaway(last_stream_id: int, error_code: int, debug: bytes = b"") -> bytes:
    payload = _GOAWAY.pack(last_stream_id, error_code) + debug
    return encode_frame(FrameType.GOAWAY, 0, 0, payload)


def decode_u32(payload: bytes | memoryview, frame_name: str) -> int:
    if len(payload) != 4:
        raise RemoteProtocolError(
            f"{frame_name} payload must be 4 octets, got {len(payload)}", ErrorCode.FRAME_SIZE_ERROR
        )
    value: int = _U32.unpack_from(payload, 0)[0]
    return value


def decode_goaway(payload: bytes | memoryview) -> tuple[int, int, bytes]:
    if len(payload) < _GOAWAY.size:
        raise RemoteProtocolError(
            f"GOAWAY payload must be at least 8 octets, got {len(payload)}",
            ErrorCode.FRAME_SIZE_ERROR,
        )
    last_stream_id, code = _GOAWAY.unpack_from(payload, 0)
    return last_stream_id & 0x7FFFFFFF, code, bytes(payload[_GOAWAY.size :])


# -- heads (SPEC 5) -------------------------------------------------------------------------------


def _header_block_size(headers: Sequence[tuple[bytes, bytes]]) -> int:
    if len(headers) > 0xFFFF:
        raise HeadNotEncodable("more than 65535 headers", HeadPart.HEADER_COUNT)
    size = 2
    for name, value in headers:
        if not 1 <= len(name) <= 0xFFFF or len(value) > 0xFFFF:
            raise HeadNotEncodable(
                "header name must be 1..65535 octets and value at most 65535", HeadPart.HEADER
            )
        size += 4 + len(name) + len(value)
    return size


def _encode_header_block(headers: Sequence[tuple[bytes, bytes]], out: list[bytes]) -> None:
    # The caller checked the block with _header_block_size.
    out.append(_U16.pack(len(headers)))
    for name, value in headers:
        out.append(_U16.pack(len(name)))
        out.append(name)
        out.append(_U16.pack(len(value)))
        out.append(value)


def request_head_size(head: RequestHead) -> int:
    """Octets of `head` as an OPEN payload (SPEC 5.1). Raises HeadNotEncodable when a part is outside its
    wire range; whether the size fits is up to the peer's MAX_HEAD_SIZE."""
    if not 1 <= len(head.method) <= 0xFF:
        raise HeadNotEncodable("method must be 1..255 octets", HeadPart.METHOD)
    if not 1 <= len(head.target) <= 0xFFFF:
        raise HeadNotEncodable("target must be 1..65535 octets", HeadPart.TARGET)
    return 3 + len(head.method) + len(head.target) + _header_block_size(head.headers)


def encode_request_head(head: RequestHead) -> bytes:
    request_head_size(head)
    out = [bytes((len(head.method),)), head.method, _U16.pack(len(head.target)), head.target]
    _encode_header_block(head.headers, out)
    return b"".join(out)


def encode_response_head(head: ResponseHead) -> bytes:
    if not 100 <= head.status <= 999:
        raise HeadNotEncodable("status must be 100..999", HeadPart.STATUS)
    if len(head.reason) > 0xFF:
        raise HeadNotEncodable("reason must be at most 255 octets", HeadPart.REASON)
    _header_block_size(head.headers)
    out = [_STATUS.pack(head.status, len(head.reason)), head.reason]
    _encode_header_block(head.headers, out)
    return b"".join(out)


def encode_trailers(headers: Sequence[tuple[bytes, bytes]]) -> bytes:
    _header_block_size(headers)
    out: list[bytes] = []
    _encode_header_block(headers, out)
    return b"".join(out)


class _Reader:
    """Bounds-checked cursor over a head payload; any overrun is a HeadDecodeError."""

    __slots__ = ("_buf", "_pos")

    def __init__(self, buf: bytes | memoryview) -> None:
        self._buf = bytes(buf)
        self._pos = 0

    def take(self, n: int) -> bytes:
        end = self._pos + n
        if end > len(self._buf):
            raise HeadDecodeError("head runs past the end of its frame")
        chunk = self._buf[self._pos : end]
        self._pos = end
        return chunk

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        value: int = _U16.unpack(self.take(2))[0]
        return value

    def header_block(self) -> Headers:
        count = self.u16()
        headers = []
        for _ in range(count):
            name = self.take(self.u16())
            if not name:
                raise HeadDecodeError("empty header name")
            headers.append((name, self.take(self.u16())))
        if self._pos != len(self._buf):
            raise HeadDecodeError("octets left over after the header block")
        return tuple(headers)


def decode_request_head(payload: bytes | memoryview) -> RequestHead:
    reader = _Reader(payload)
    method = reader.take(reader.u8())
    target = reader.take(reader.u16())
    if not method or not target:
        raise HeadDecodeError("empty method or target")
    return RequestHead(method, target, reader.header_block())


def decode_response_head(payload: bytes | memoryview) -> ResponseHead:
    reader = _Reader(payload)
    status = reader.u16()
    if not 100 <= status <= 999:
        raise HeadDecodeError(f"status {status} is outside 100..999")
    reason = reader.take(reader.u8())
    return ResponseHead(status, reason, reader.header_block())


def decode_trailers(payload: bytes | memoryview) -> Headers:
    return _Reader(payload).header_block()
