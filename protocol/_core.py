"""State shared by the two halves of a connection, and the helpers both use.

`Connection` (in _connection.py) is the public API and the output scheduler; `_Receiving` (in _receiving.py)
parses the peer's frames. Both work on the state defined here: streams, windows, queues, limits.
"""

from __future__ import annotations

import enum
import struct
from collections import deque

from . import _frames as F
from ._credit import Credit, Windows
from ._errors import ErrorCode, HeadNotEncodable, HeadPart, LocalProtocolError, RemoteProtocolError
from ._events import (
    Event,
    StreamEnded,
    StreamReset,
)
from ._settings import Limits, Settings, TokenBucket
from ._state import ENDED, Fail, ReceivedCell, Recv, Reset, Side
from ._stream import Stream

_HEADER_SIZE = F.FRAME_HEADER_SIZE
_DATA = int(F.FrameType.DATA)
_OPEN = int(F.FrameType.OPEN)
_STREAM_ID = struct.Struct(">I")
_END = F.FLAG_END_STREAM
# The frame header codec, bound once: the per-frame loops below are the core's hot paths.
_HEADER_STRUCT = struct.Struct(">IBI")
_pack_header = _HEADER_STRUCT.pack
_unpack_header = _HEADER_STRUCT.unpack_from
_HEAD_TYPES = frozenset(int(t) for t in F.HEAD_FRAME_TYPES)
# Bound once: reading an enum member off its class is a descriptor call in Python 3.11, and this one is read
# on every acknowledgement and every emptied send queue.
_SIDE_CLOSED = Side.CLOSED


class Role(enum.Enum):
    """DIALER opened the WebSocket (the agent) and uses odd stream ids; ACCEPTOR (the relay) even ones."""

    DIALER = "dialer"
    ACCEPTOR = "acceptor"


class ConnectionState(enum.Enum):
    HANDSHAKING = "handshaking"  # our HELLO is queued; the peer's has not arrived
    OPEN = "open"
    CLOSED = "closed"  # a connection error happened (either side); only queued bytes remain to send


class _ConnectionCore:
    """Fields and shared helpers; see Connection for the public API."""

    def __init__(self, role: Role, settings: Settings | None = None, limits: Limits | None = None) -> None:
        self.role = role
        self.local_settings = settings if settings is not None else Settings()
        self.limits = limits if limits is not None else Limits()
        self.peer_settings: Settings | None = None
        self.state = ConnectionState.HANDSHAKING

        self._streams: dict[int, Stream] = {}
        self._next_local_id = 1 if role is Role.DIALER else 2
        self._peer_parity = 0 if role is Role.DIALER else 1
        self._highest_peer_id = 0
        self._local_active = 0
        self._peer_active = 0

        # Control frames (and OPEN/REPLY, which must precede their stream's DATA) ready to go, in order.
        self._control: deque[bytes] = deque()
        # Streams with DATA, END_STREAM or TRAILERS waiting, in round-robin order.
        self._send_queue: deque[int] = deque()

        local = self.local_settings
        # The connection's windows (its send window is set from the peer's HELLO) and how both kinds are credited.
        self._conn = Windows(0, send_window=0, recv_window=local.connection_window)
        self._conn_credit = Credit(local.connection_window, self._control, refill_below=local.max_frame_size)
        self._stream_credit = Credit(local.initial_stream_window, self._control)

        # The runtime compares this with what it managed to write to learn which OPENs never left (SPEC 10).
        self.highest_emitted_local_stream_id = 0
        # Octets handed to send_data and not yet framed, over all streams (the runtime's memory accounting).
        self.outbound_total = 0
        self._goaway_sent = False
        self._goaway_last_sent = 0  # last-stream-id of our first GOAWAY; later ones repeat it
        self._goaway_received_last: int | None = None

        limits_ = self.limits
        self._ping_bucket = TokenBucket(limits_.ping_burst, limits_.ping_rate)
        self._reset_bucket = TokenBucket(limits_.reset_burst, limits_.reset_rate)
        self._empty_bucket = TokenBucket(limits_.empty_frame_burst, limits_.empty_frame_rate)
        self._window_bucket = TokenBucket(limits_.window_update_burst, limits_.window_update_rate)

        # Partial frame carried over between receive_data calls, and how many octets complete it.
        self._partial = bytearray()
        self._needed = _HEADER_SIZE
        self._control.append(F.encode_hello(self.local_settings.to_pairs()))

    # -- helpers -----------------------------------------------------------------------------------

    def _advance(self, stream: Stream, recv: Recv, events: list[Event]) -> None:
        """Move the receive side to the state its table cell named; the peer's END_STREAM is reported."""
        if recv is not stream.recv:
            stream.recv = recv
            if recv in ENDED:
                events.append(StreamEnded(stream.stream_id))
                self._maybe_retire(stream)

    def _refuse(self, stream_id: int, cell: ReceivedCell, events: list[Event]) -> None:
        """Carry out a table cell that refuses a frame: a stream error, a connection error or a discard."""
        if isinstance(cell, Reset):
            self._stream_error(self._streams[stream_id], cell.code, events)
        elif isinstance(cell, Fail):
            message = cell.message.format(stream_id=stream_id, highest=self._highest_peer_id)
            raise RemoteProtocolError(message, cell.code)

    def _absent(self, stream_id: int) -> Recv:
        """The receive state of a stream not in the table: idle or closed, by its id (SPEC 6)."""
        if stream_id % 2 == self._peer_parity:
            return Recv.CLOSED_PEER if stream_id <= self._highest_peer_id else Recv.IDLE_PEER
        return Recv.CLOSED_OWN if stream_id < self._next_local_id else Recv.IDLE_OWN

    def _stream_error(self, stream: Stream, code: ErrorCode, events: list[Event]) -> None:
        self._control.append(F.encode_reset(stream.stream_id, code))
        self._drop(stream)
        events.append(StreamReset(stream.stream_id, code, remote=False))

    def _drop(self, stream: Stream) -> None:
        """Remove a reset stream: its queued output is discarded, its unacknowledged input credited."""
        del self._streams[stream.stream_id]
        self._deactivate(stream)
        stream.outbound.clear()
        self.outbound_total -= stream.outbound_bytes
        stream.outbound_bytes = 0
        stream.end_pending = False
        stream.trailers_pending = None
        if stream.recv_unacked:
            self._conn_credit.consume(self._conn, stream.recv_unacked)
            stream.recv_unacked = 0

    def _deactivate(self, stream: Stream) -> None:
        if stream.active:
            stream.active = False
            if stream.local_initiated:
                self._local_active -= 1
            else:
                self._peer_active -= 1

    def _maybe_retire(self, stream: Stream) -> None:
        if stream.send_side is not _SIDE_CLOSED or stream.end_pending:
            return
        if stream.recv not in ENDED:
            return
        self._deactivate(stream)
        if stream.recv_unacked == 0:
            self._streams.pop(stream.stream_id, None)

    def _enqueue(self, stream: Stream) -> None:
        if not stream.queued:
            stream.queued = True
            self._send_queue.append(stream.stream_id)

    def _is_used_id(self, stream_id: int) -> bool:
        if stream_id % 2 == self._peer_parity:
            return 0 < stream_id <= self._highest_peer_id
        return 0 < stream_id < self._next_local_id

    def _encode_head(self, head: F.RequestHead | F.ResponseHead) -> bytes:
        if isinstance(head, F.RequestHead):
            payload = F.encode_request_head(head)
        else:
            payload = F.encode_response_head(head)
        if len(payload) > self._peer().max_head_size:
            raise HeadNotEncodable(
                f"head of {len(payload)} octets exceeds the peer's MAX_HEAD_SIZE", HeadPart.SIZE
            )
        return payload

    def _peer(self) -> Settings:
        if self.peer_settings is None:
            raise LocalProtocolError("the peer's HELLO has not arrived yet")
        return self.peer_settings

    def _require_usable(self) -> None:
        if self.state is ConnectionState.CLOSED:
            raise LocalProtocolError("the connection has failed")

    def _require_open(self) -> None:
        self._require_usable()
        self._peer()

    def _stream_for_sending(self, stream_id: int) -> Stream:
        self._require_open()
        stream = self._streams.get(stream_id)
        if stream is None:
            raise LocalProtocolError(f"stream {stream_id} is not open")
        return stream

    def _fail(self, exc: RemoteProtocolError) -> None:
        """Connection error: queue GOAWAY with the code, drop pending stream output, refuse further use."""
        self.state = ConnectionState.CLOSED
        self._send_queue.clear()
        self._streams.clear()
        self.outbound_total = 0
        # Nothing queued before the failure may follow it out (an OPEN sent after we declared the connection
        # dead could be processed by a peer that has not read the GOAWAY yet): the GOAWAY goes alone.
        self._control.clear()
        message = str(exc).encode("utf-8", "replace")[:1000]
        self._control.append(F.encode_goaway(self._goaway_last_stream_id(), exc.error_code, message))

    def _goaway_last_stream_id(self) -> int:
        # SPEC 10: last-stream-id never increases. OPENs that arrive after our first GOAWAY are refused but
        # still raise _highest_peer_id; none of them was processed, so every later GOAWAY repeats the first.
        if not self._goaway_sent:
            self._goaway_last_sent = self._highest_peer_id
        return self._goaway_last_sent
