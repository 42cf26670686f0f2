"""Error codes (SPEC.md section 10) and the exception hierarchy of the core.

The split follows h11: a `LocalProtocolError` is our own application misusing the API (nothing was written);
a `RemoteProtocolError` is the peer breaking the protocol badly enough that the whole connection is gone.
Errors confined to one stream never raise: they become a RESET and a `StreamReset` event.
"""

from __future__ import annotations

import enum


class ErrorCode(enum.IntEnum):
    NO_ERROR = 0x0
    PROTOCOL_ERROR = 0x1
    INTERNAL_ERROR = 0x2
    FLOW_CONTROL_ERROR = 0x3
    STREAM_CLOSED = 0x5
    FRAME_SIZE_ERROR = 0x6
    REFUSED_STREAM = 0x7
    CANCEL = 0x8
    ENHANCE_YOUR_CALM = 0xB

    @classmethod
    def from_wire(cls, value: int) -> ErrorCode:
        # SPEC 10: unknown codes are treated as INTERNAL_ERROR, so a newer peer cannot crash an older one.
        try:
            return cls(value)
        except ValueError:
            return cls.INTERNAL_ERROR


class ProtocolError(Exception):
    """Base of every error the core raises. `error_code` is what goes (or went) on the wire."""

    def __init__(self, message: str, error_code: ErrorCode = ErrorCode.PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.error_code = error_code


class LocalProtocolError(ProtocolError):
    """Our application asked for something the protocol or the current state forbids."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol; the connection is dead (a GOAWAY is queued for it)."""


class HeadPart(enum.Enum):
    """Which part of a head is outside what the wire format carries (SPEC 5)."""

    METHOD = "method"  # 1..255 octets
    TARGET = "target"  # 1..65535 octets
    STATUS = "status"  # 100..999
    REASON = "reason"  # at most 255 octets
    HEADER = "header"  # a name of 1..65535 octets or a value of at most 65535
    HEADER_COUNT = "header count"  # at most 65535 fields
    SIZE = "size"  # the whole payload, at most the peer's MAX_HEAD_SIZE


class HeadNotEncodable(LocalProtocolError):
    """A head the wire format cannot carry. Nothing was queued: the connection is as it was, and the same
    head will fail again on any connection (SIZE: on any whose peer declared the same MAX_HEAD_SIZE)."""

    def __init__(self, message: str, part: HeadPart) -> None:
        super().__init__(message)
        self.part = part
