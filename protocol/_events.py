"""Events returned by `Connection.receive_data`: small immutable value classes, one per happening."""

from __future__ import annotations

import dataclasses

from ._errors import ErrorCode
from ._frames import Headers, RequestHead, ResponseHead
from ._settings import Settings


class Event:
    """Base class of every event."""

    __slots__ = ()


@dataclasses.dataclass(frozen=True, slots=True)
class HandshakeComplete(Event):
    """The peer's HELLO arrived: from now on streams may be opened and pings sent."""

    peer_settings: Settings


@dataclasses.dataclass(frozen=True, slots=True)
class StreamOpened(Event):
    """The peer opened a stream with a request head. A `StreamEnded` follows if it has no body."""

    stream_id: int
    head: RequestHead


@dataclasses.dataclass(frozen=True, slots=True)
class ReplyReceived(Event):
    """A response head on a stream we opened; `head.is_interim` tells a 1xx from the final one."""

    stream_id: int
    head: ResponseHead


@dataclasses.dataclass(frozen=True, slots=True)
class DataReceived(Event):
    """Stream bytes. `data` is a read-only view of an immutable buffer: safe to keep.

    Acknowledge them with `Connection.acknowledge_received_data` once consumed, or the window stays shut.
    """

    stream_id: int
    data: memoryview


@dataclasses.dataclass(frozen=True, slots=True)
class TrailersReceived(Event):
    """Trailers that ended the peer's direction of the stream; `StreamEnded` follows."""

    stream_id: int
    headers: Headers


@dataclasses.dataclass(frozen=True, slots=True)
class StreamEnded(Event):
    """The peer half-closed its direction: every byte of it has been delivered before this event."""

    stream_id: int


@dataclasses.dataclass(frozen=True, slots=True)
class StreamReset(Event):
    """The stream is gone. `remote` is True when the peer reset it (or refused it by GOAWAY), False when we
    reset it because the peer broke a stream-level rule. REFUSED_STREAM means the peer never processed it."""

    stream_id: int
    error_code: ErrorCode
    remote: bool


@dataclasses.dataclass(frozen=True, slots=True)
class WindowUpdated(Event):
    """The peer granted more send window; stream_id 0 is the connection."""

    stream_id: int
    delta: int


@dataclasses.dataclass(frozen=True, slots=True)
class PingReceived(Event):
    """The peer pinged; the ACK is already queued."""

    data: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class PingAcknowledged(Event):
    """The peer answered one of our pings."""

    data: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class GoAwayReceived(Event):
    """The peer will process nothing we open above `last_stream_id`; those streams get `StreamReset` events
    with REFUSED_STREAM right after this one."""

    last_stream_id: int
    error_code: ErrorCode
    debug: bytes
