"""rtunnel's wire protocol (SPEC.md), sans-IO: bytes in, events out, bytes to send.

Standard library only; no sockets, threads or clocks. The runtime owns all I/O and passes time in.
The frame codec's encoders (and the request-head decoder) are public for peers that must write what a `Connection` never would (the conformance
runner's scripted peers).
"""

from ._connection import Connection, ConnectionState, Role
from ._errors import (
    ErrorCode,
    HeadNotEncodable,
    HeadPart,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
)
from ._events import (
    DataReceived,
    Event,
    GoAwayReceived,
    HandshakeComplete,
    PingAcknowledged,
    PingReceived,
    ReplyReceived,
    StreamEnded,
    StreamOpened,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from ._frames import (
    FRAME_HEADER_SIZE,
    PROTOCOL_VERSION,
    FrameType,
    Headers,
    RequestHead,
    ResponseHead,
    decode_request_head,
    encode_frame,
    encode_hello,
    encode_request_head,
    encode_response_head,
    request_head_size,
)
from ._settings import MAX_STREAM_ID, MAX_WINDOW, Limits, SettingId, Settings
from ._stream import StreamState

__all__ = [
    "FRAME_HEADER_SIZE",
    "MAX_STREAM_ID",
    "MAX_WINDOW",
    "PROTOCOL_VERSION",
    "Connection",
    "ConnectionState",
    "DataReceived",
    "ErrorCode",
    "Event",
    "FrameType",
    "GoAwayReceived",
    "HandshakeComplete",
    "HeadNotEncodable",
    "HeadPart",
    "Headers",
    "Limits",
    "LocalProtocolError",
    "PingAcknowledged",
    "PingReceived",
    "ProtocolError",
    "RemoteProtocolError",
    "ReplyReceived",
    "RequestHead",
    "ResponseHead",
    "Role",
    "SettingId",
    "Settings",
    "StreamEnded",
    "StreamOpened",
    "StreamReset",
    "StreamState",
    "TrailersReceived",
    "WindowUpdated",
    "decode_request_head",
    "encode_frame",
    "encode_hello",
    "encode_request_head",
    "encode_response_head",
    "request_head_size",
]
