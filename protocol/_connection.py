"""The connection state machine: bytes in, events out, bytes to send (SPEC.md sections 6-11).

No I/O and no clock: the runtime feeds received bytes with `receive_data(data, now)`, pulls bytes to send with
`data_to_send(max_bytes)` when its transport can take them, and calls the local-action methods. Every local
action is validated before anything is queued, so a `LocalProtocolError` leaves the connection unchanged.
"""

from __future__ import annotations

import enum
import struct
from collections import deque
from collections.abc import Sequence

from . import _frames as F
from ._errors import ErrorCode, LocalProtocolError, RemoteProtocolError
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
from ._settings import MAX_STREAM_ID, MAX_WINDOW, Limits, Settings, TokenBucket
from ._stream import Side, Stream, StreamState

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


class Role(enum.Enum):
    """DIALER opened the WebSocket (the agent) and uses odd stream ids; ACCEPTOR (the relay) even ones."""

    DIALER = "dialer"
    ACCEPTOR = "acceptor"


class ConnectionState(enum.Enum):
    HANDSHAKING = "handshaking"  # our HELLO is queued; the peer's has not arrived
    OPEN = "open"
    CLOSED = "closed"  # a connection error happened (either side); only queued bytes remain to send


class Connection:
    """One rtunnel protocol connection, from one endpoint's point of view."""

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

        self._conn_send_window = 0  # set from the peer's HELLO
        self._conn_recv_window = self.local_settings.connection_window
        self._conn_consumed = 0
        self._conn_update_threshold = max(1, self.local_settings.connection_window // 2)
        self._conn_low_water = min(self._conn_update_threshold, self.local_settings.max_frame_size)
        self._stream_update_threshold = max(1, self.local_settings.initial_stream_window // 2)

        # The runtime compares this with what it managed to write to learn which OPENs never left (SPEC 10).
        self.highest_emitted_local_stream_id = 0
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

    # -- introspection -----------------------------------------------------------------------------

    @property
    def open_stream_count(self) -> int:
        """Streams in the table (including ended ones whose data the application has not acknowledged)."""
        return len(self._streams)

    @property
    def can_open_stream(self) -> bool:
        peer = self.peer_settings
        return (
            self.state is ConnectionState.OPEN
            and peer is not None
            and not self._goaway_sent
            and self._goaway_received_last is None
            and self._local_active < peer.max_concurrent_streams
            and self._next_local_id <= MAX_STREAM_ID
        )

    @property
    def has_data_to_send(self) -> bool:
        if self._control:
            return True
        if not self._send_queue:
            return False
        # Streams that only wait for connection window have nothing sendable until it opens.
        if self._conn_send_window > 0:
            return True
        return any(
            (s := self._streams.get(sid)) is not None and s.outbound_bytes == 0 for sid in self._send_queue
        )

    @property
    def connection_send_window(self) -> int:
        return self._conn_send_window

    def stream_state(self, stream_id: int) -> StreamState:
        stream = self._streams.get(stream_id)
        if stream is not None:
            return stream.state()
        return StreamState.CLOSED if self._is_used_id(stream_id) else StreamState.IDLE

    def send_window(self, stream_id: int) -> int:
        """How many DATA octets could go out on this stream now (both windows applied)."""
        stream = self._streams.get(stream_id)
        if stream is None:
            return 0
        return max(0, min(stream.send_window, self._conn_send_window))

    def outbound_buffered(self, stream_id: int) -> int:
        """Octets the application handed to `send_data` that are not yet framed."""
        stream = self._streams.get(stream_id)
        return 0 if stream is None else stream.outbound_bytes

    def received_unacknowledged(self, stream_id: int) -> int:
        stream = self._streams.get(stream_id)
        return 0 if stream is None else stream.recv_unacked

    # -- local actions -----------------------------------------------------------------------------

    def open_stream(self, head: F.RequestHead, *, end_stream: bool = False) -> int:
        """Queue an OPEN with the request head and return the new stream's id."""
        self._require_open()
        if not self.can_open_stream:
            raise LocalProtocolError("no new stream may be opened on this connection now")
        payload = self._encode_head(head)
        stream_id = self._next_local_id
        self._next_local_id += 2
        peer = self._peer()
        stream = Stream(
            stream_id,
            local_initiated=True,
            send_window=peer.initial_stream_window,
            recv_window=self.local_settings.initial_stream_window,
        )
        if end_stream:
            stream.send_side = Side.CLOSED
        self._streams[stream_id] = stream
        self._local_active += 1
        self._control.append(F.encode_frame(F.FrameType.OPEN, _END if end_stream else 0, stream_id, payload))
        return stream_id

    def send_reply(self, stream_id: int, head: F.ResponseHead, *, end_stream: bool = False) -> None:
        """Queue a REPLY: any number of interim (1xx) heads, then exactly one final head."""
        stream = self._stream_for_sending(stream_id)
        if stream.send_side is not Side.AWAITING_REPLY:
            raise LocalProtocolError(f"stream {stream_id}: a final REPLY was already sent")
        if head.is_interim and end_stream:
            raise LocalProtocolError("an interim (1xx) REPLY cannot end the stream")
        payload = self._encode_head(head)
        if not head.is_interim:
            stream.send_side = Side.CLOSED if end_stream else Side.OPEN
        self._control.append(F.encode_frame(F.FrameType.REPLY, _END if end_stream else 0, stream_id, payload))
        self._maybe_retire(stream)

    def send_data(
        self, stream_id: int, data: bytes | bytearray | memoryview, *, end_stream: bool = False
    ) -> None:
        """Queue stream bytes (not copied: do not mutate `data` afterwards). Never blocks on the window:
        the runtime bounds what it queues with `outbound_buffered`."""
        stream = self._stream_for_sending(stream_id)
        if stream.send_side is not Side.OPEN:
            raise LocalProtocolError(
                f"stream {stream_id}: cannot send data in side state {stream.send_side.value}"
            )
        if data:
            view = memoryview(data).cast("B") if not isinstance(data, bytes) else memoryview(data)
            stream.outbound.append(view)
            stream.outbound_bytes += len(view)
        if end_stream:
            stream.send_side = Side.CLOSED
            stream.end_pending = True
        self._enqueue(stream)

    def end_stream(self, stream_id: int) -> None:
        self.send_data(stream_id, b"", end_stream=True)

    def send_trailers(self, stream_id: int, headers: Sequence[tuple[bytes, bytes]]) -> None:
        """Queue TRAILERS; they end our direction after all queued data."""
        stream = self._stream_for_sending(stream_id)
        if stream.send_side is not Side.OPEN:
            raise LocalProtocolError(
                f"stream {stream_id}: cannot send trailers in side state {stream.send_side.value}"
            )
        try:
            payload = F.encode_trailers(headers)
        except ValueError as exc:
            raise LocalProtocolError(str(exc)) from None
        if len(payload) > self._peer().max_head_size:
            raise LocalProtocolError("trailers exceed the peer's MAX_HEAD_SIZE")
        stream.trailers_pending = payload
        stream.send_side = Side.CLOSED
        stream.end_pending = True
        self._enqueue(stream)

    def reset_stream(self, stream_id: int, error_code: ErrorCode = ErrorCode.CANCEL) -> None:
        """Abort a stream. Resetting a stream that is already closed does nothing (idempotent)."""
        self._require_usable()
        stream = self._streams.get(stream_id)
        if stream is None:
            if not self._is_used_id(stream_id):
                raise LocalProtocolError(f"stream {stream_id} was never opened")
            return
        if stream.state() is not StreamState.CLOSED:
            # A stream whose END_STREAMs have both crossed is closed for the peer already: no RESET.
            self._control.append(F.encode_reset(stream_id, error_code))
        self._drop(stream)

    def acknowledge_received_data(self, stream_id: int, size: int) -> None:
        """Tell the core that the application consumed `size` octets of the stream: credits the windows."""
        self._require_usable()
        if size < 0:
            raise LocalProtocolError("cannot acknowledge a negative amount")
        stream = self._streams.get(stream_id)
        if stream is None:
            if not self._is_used_id(stream_id):
                raise LocalProtocolError(f"stream {stream_id} was never opened")
            # Closed by RESET: its unacknowledged bytes were credited to the connection already (SPEC 8).
            return
        if size > stream.recv_unacked:
            raise LocalProtocolError(
                f"stream {stream_id}: acknowledged {size} octets, only {stream.recv_unacked} unacknowledged"
            )
        stream.recv_unacked -= size
        if stream.recv_side is not Side.CLOSED:
            stream.recv_consumed += size
            if stream.recv_consumed >= self._stream_update_threshold:
                self._control.append(F.encode_window_update(stream_id, stream.recv_consumed))
                stream.recv_window += stream.recv_consumed
                stream.recv_consumed = 0
        self._credit_connection(size)
        self._maybe_retire(stream)

    def ping(self, opaque: bytes) -> None:
        self._require_open()
        if len(opaque) != 8:
            raise LocalProtocolError("a PING payload is exactly 8 octets")
        self._control.append(F.encode_ping(bytes(opaque)))

    def goaway(self, error_code: ErrorCode = ErrorCode.NO_ERROR, debug: bytes = b"") -> None:
        """Promise to process no stream the peer opens after the ones already seen (SPEC 10)."""
        self._require_usable()
        # Before the peer's HELLO its MAX_FRAME_SIZE is unknown: assume the smallest any peer may declare.
        peer = self.peer_settings
        max_debug = (peer.max_frame_size if peer is not None else 1024) - 8
        self._control.append(F.encode_goaway(self._goaway_last_stream_id(), error_code, debug[:max_debug]))
        self._goaway_sent = True

    # -- output ------------------------------------------------------------------------------------

    def data_to_send(self, max_bytes: int = 1 << 20) -> bytes:
        """Return up to `max_bytes` of frames (at least one frame if any is ready), control frames first,
        then DATA round-robin across streams with window."""
        out: list[bytes | memoryview] = []
        budget = max_bytes
        control = self._control
        while control and (budget >= len(control[0]) or not out):
            frame = control.popleft()
            if frame[3] == _OPEN:
                self.highest_emitted_local_stream_id = _STREAM_ID.unpack_from(frame, 5)[0]
            out.append(frame)
            budget -= len(frame)
        if not control and self.state is ConnectionState.OPEN:
            budget = self._emit_stream_frames(out, budget)
        return b"".join(out)

    def _emit_stream_frames(self, out: list[bytes | memoryview], budget: int) -> int:
        queue = self._send_queue
        streams = self._streams
        max_frame = self._peer().max_frame_size
        append = out.append
        waiting = 0  # consecutive streams skipped for lack of connection window or budget
        while queue and waiting < len(queue) and budget > _HEADER_SIZE:
            stream_id = queue.popleft()
            stream = streams.get(stream_id)
            if stream is None:
                continue
            size = stream.outbound_bytes
            if size:
                window = stream.send_window
                conn_window = self._conn_send_window
                room = budget - _HEADER_SIZE
                # min() of four values, spelled out: this runs once per DATA frame.
                if window < size:
                    size = window
                if conn_window < size:
                    size = conn_window
                if max_frame < size:
                    size = max_frame
                if room < size:
                    size = room
                if size <= 0:
                    if window <= 0:
                        stream.queued = False  # a WINDOW_UPDATE for it re-queues it
                    else:
                        queue.append(stream_id)
                        waiting += 1
                    continue
                stream.send_window = window - size
                self._conn_send_window = conn_window - size
            skipped = waiting
            waiting = 0
            drained = stream.outbound_bytes == size
            flags = 0
            if drained and stream.end_pending and stream.trailers_pending is None:
                flags = _END
                stream.end_pending = False
            if size:
                append(_pack_header((size << 8) | _DATA, flags, stream_id))
                outbound = stream.outbound
                first = outbound[0]
                if len(first) == size:  # common cases first: a whole buffer, or a frame-sized piece of one
                    append(outbound.popleft())
                    stream.outbound_bytes -= size
                elif len(first) > size:
                    append(first[:size])
                    outbound[0] = first[size:]
                    stream.outbound_bytes -= size
                else:
                    out.extend(stream.take(size))
                budget -= _HEADER_SIZE + size
            elif flags:
                append(_pack_header(_DATA, flags, stream_id))
                budget -= _HEADER_SIZE
            if drained and stream.trailers_pending is not None:
                trailers = stream.trailers_pending
                # Stay within max_bytes (data_to_send's contract): TRAILERS that do not fit wait for the
                # next call, unless nothing at all went out yet (at least one frame per call).
                if _HEADER_SIZE + len(trailers) <= budget or not out:
                    append(F.encode_frame(F.FrameType.TRAILERS, _END, stream_id, trailers))
                    budget -= _HEADER_SIZE + len(trailers)
                    stream.trailers_pending = None
                    stream.end_pending = False
                elif not size:
                    waiting = skipped + 1  # nothing went out for this stream: it counts as skipped
            if stream.outbound_bytes or stream.end_pending:
                queue.append(stream_id)
            else:
                stream.queued = False
                if stream.send_side is Side.CLOSED:
                    self._maybe_retire(stream)
        return budget

    # -- input -------------------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview, now: float = 0.0) -> list[Event]:
        """Feed octets received from the peer (any split); return the events they complete.

        `now` is the caller's clock in seconds, used only by the abuse rate limits. Raises
        RemoteProtocolError on a connection error (after queueing a GOAWAY for it).
        """
        if self.state is ConnectionState.CLOSED:
            raise RemoteProtocolError("connection already failed", ErrorCode.PROTOCOL_ERROR)
        events: list[Event] = []
        if self._partial:
            self._partial += data
            if len(self._partial) < self._needed:
                return events
            buf = bytes(self._partial)
            self._partial.clear()
        else:
            buf = bytes(data)
        try:
            self._parse(buf, events, now)
        except RemoteProtocolError as exc:
            self._fail(exc)
            raise
        return events

    def _parse(self, buf: bytes, events: list[Event], now: float) -> None:
        view = memoryview(buf)
        end = len(buf)
        pos = 0
        local = self.local_settings
        max_frame = local.max_frame_size
        max_head = local.max_head_size
        smaller_limit = min(max_frame, max_head)
        max_control = self.limits.max_control_queue
        control = self._control
        on_data = self._on_data
        opened = ConnectionState.OPEN
        while end - pos >= _HEADER_SIZE:
            length_type, flags, stream_id = _unpack_header(buf, pos)
            length = length_type >> 8
            frame_type = length_type & 0xFF
            if length > smaller_limit:  # checked from the header alone, before buffering (SPEC 3.1)
                limit = max_head if frame_type in _HEAD_TYPES else max_frame
                if length > limit:
                    raise RemoteProtocolError(
                        f"frame of type {frame_type} with {length} octets exceeds the limit of {limit}",
                        ErrorCode.FRAME_SIZE_ERROR,
                    )
            start = pos + _HEADER_SIZE
            frame_end = start + length
            if frame_end > end:
                break
            pos = frame_end
            stream_id &= 0x7FFFFFFF  # the R bit is ignored (SPEC 3)
            if frame_type == _DATA and self.state is opened:
                on_data(stream_id, flags, view[start:frame_end], events, now)
            else:
                self._on_frame(frame_type, flags, stream_id, view[start:frame_end], events, now)
            if len(control) > max_control:
                raise RemoteProtocolError(
                    "peer provoked too many queued control frames without reading them",
                    ErrorCode.ENHANCE_YOUR_CALM,
                )
        if pos < end:
            self._partial += view[pos:]
            if end - pos >= _HEADER_SIZE:
                self._needed = _HEADER_SIZE + (_unpack_header(buf, pos)[0] >> 8)
            else:
                self._needed = _HEADER_SIZE
        else:
            self._needed = _HEADER_SIZE

    def _on_frame(
        self,
        frame_type: int,
        flags: int,
        stream_id: int,
        payload: memoryview,
        events: list[Event],
        now: float,
    ) -> None:
        if self.state is ConnectionState.HANDSHAKING:
            if frame_type != F.FrameType.HELLO:
                raise RemoteProtocolError("the first frame must be HELLO")
            self._on_hello(stream_id, payload, events)
            return
        try:
            kind = F.FrameType(frame_type)
        except ValueError:
            return  # unknown types are skipped (SPEC 3)
        if kind in F.CONNECTION_FRAME_TYPES:
            if stream_id != 0:
                raise RemoteProtocolError(f"{kind.name} on stream {stream_id}; it belongs to stream 0")
        elif kind in F.STREAM_FRAME_TYPES and stream_id == 0:
            raise RemoteProtocolError(f"{kind.name} on stream 0")
        if kind is F.FrameType.HELLO:
            raise RemoteProtocolError("a second HELLO")
        if kind is F.FrameType.DATA:
            self._on_data(stream_id, flags, payload, events, now)
        elif kind is F.FrameType.OPEN:
            self._on_open(stream_id, flags, payload, events, now)
        elif kind is F.FrameType.REPLY:
            self._on_reply(stream_id, flags, payload, events)
        elif kind is F.FrameType.TRAILERS:
            self._on_trailers(stream_id, flags, payload, events)
        elif kind is F.FrameType.WINDOW_UPDATE:
            self._on_window_update(stream_id, payload, events, now)
        elif kind is F.FrameType.RESET:
            self._on_reset(stream_id, payload, events, now)
        elif kind is F.FrameType.PING:
            self._on_ping(flags, payload, events, now)
        else:
            self._on_goaway(payload, events)

    def _on_hello(self, stream_id: int, payload: memoryview, events: list[Event]) -> None:
        if stream_id != 0:
            raise RemoteProtocolError("HELLO on a stream")
        version, pairs = F.decode_hello(payload)
        if version != F.PROTOCOL_VERSION:
            raise RemoteProtocolError(f"peer speaks protocol version {version}, we speak 1")
        try:
            peer = Settings.from_pairs(pairs)
        except ValueError as exc:
            raise RemoteProtocolError(f"bad HELLO: {exc}") from None
        self.peer_settings = peer
        self._conn_send_window = peer.connection_window
        self.state = ConnectionState.OPEN
        events.append(HandshakeComplete(peer))

    def _lookup(self, stream_id: int) -> Stream | None:
        """The live stream, or None if it is closed; an idle id is a connection error (SPEC 6)."""
        stream = self._streams.get(stream_id)
        if stream is None and not self._is_used_id(stream_id):
            raise RemoteProtocolError(f"frame on idle stream {stream_id}")
        return stream

    def _on_data(
        self, stream_id: int, flags: int, payload: memoryview, events: list[Event], now: float
    ) -> None:
        if stream_id == 0:
            raise RemoteProtocolError("DATA on stream 0")
        size = len(payload)
        if size > self._conn_recv_window:
            raise RemoteProtocolError("DATA exceeds the connection window", ErrorCode.FLOW_CONTROL_ERROR)
        self._conn_recv_window -= size
        if self._conn_consumed and self._conn_recv_window < self._conn_low_water:
            self._credit_connection(0)  # consumed earlier, held back for batching; the peer needs it now
        end = flags & _END
        if not size and not end and not self._empty_bucket.take(now):
            raise RemoteProtocolError("too many empty DATA frames", ErrorCode.ENHANCE_YOUR_CALM)
        stream = self._streams.get(stream_id)
        if stream is None:
            self._lookup(stream_id)  # raises if the id is idle
            self._credit_connection(size)  # crossed a RESET: discard, but give the window back
            return
        side = stream.recv_side
        if side is not Side.OPEN:
            self._credit_connection(size)
            code = ErrorCode.STREAM_CLOSED if side is Side.CLOSED else ErrorCode.PROTOCOL_ERROR
            self._stream_error(stream, code, events)
            return
        if size > stream.recv_window:
            self._credit_connection(size)
            self._stream_error(stream, ErrorCode.FLOW_CONTROL_ERROR, events)
            return
        if size:
            stream.recv_window -= size
            stream.recv_unacked += size
            events.append(DataReceived(stream_id, payload))
        if end:
            self._end_recv(stream, events)

    def _on_open(
        self, stream_id: int, flags: int, payload: memoryview, events: list[Event], now: float
    ) -> None:
        if stream_id % 2 != self._peer_parity:
            raise RemoteProtocolError(f"OPEN of stream {stream_id}, which has our parity")
        if stream_id <= self._highest_peer_id:
            raise RemoteProtocolError(
                f"OPEN of stream {stream_id} after stream {self._highest_peer_id}: ids must increase"
            )
        self._highest_peer_id = stream_id
        local = self.local_settings
        if self._goaway_sent or self._peer_active >= local.max_concurrent_streams:
            if not self._reset_bucket.take(now):
                raise RemoteProtocolError("too many refused streams", ErrorCode.ENHANCE_YOUR_CALM)
            self._control.append(F.encode_reset(stream_id, ErrorCode.REFUSED_STREAM))
            return
        try:
            head = F.decode_request_head(payload)
        except F.HeadDecodeError:
            if not self._reset_bucket.take(now):
                raise RemoteProtocolError("too many malformed OPENs", ErrorCode.ENHANCE_YOUR_CALM) from None
            self._control.append(F.encode_reset(stream_id, ErrorCode.PROTOCOL_ERROR))
            return
        stream = Stream(
            stream_id,
            local_initiated=False,
            send_window=self._peer().initial_stream_window,
            recv_window=local.initial_stream_window,
        )
        self._streams[stream_id] = stream
        self._peer_active += 1
        events.append(StreamOpened(stream_id, head))
        if flags & _END:
            self._end_recv(stream, events)

    def _on_reply(self, stream_id: int, flags: int, payload: memoryview, events: list[Event]) -> None:
        stream = self._lookup(stream_id)
        if stream is None:
            return
        if not stream.local_initiated or stream.recv_side is Side.OPEN:
            self._stream_error(stream, ErrorCode.PROTOCOL_ERROR, events)
            return
        if stream.recv_side is Side.CLOSED:
            self._stream_error(stream, ErrorCode.STREAM_CLOSED, events)
            return
        try:
            head = F.decode_response_head(payload)
        except F.HeadDecodeError:
            self._stream_error(stream, ErrorCode.PROTOCOL_ERROR, events)
            return
        end = flags & _END
        if head.is_interim:
            if end:
                self._stream_error(stream, ErrorCode.PROTOCOL_ERROR, events)
                return
        else:
            stream.recv_side = Side.OPEN
        events.append(ReplyReceived(stream_id, head))
        if end:
            self._end_recv(stream, events)

    def _on_trailers(self, stream_id: int, flags: int, payload: memoryview, events: list[Event]) -> None:
        stream = self._lookup(stream_id)
        if stream is None:
            return
        if stream.recv_side is not Side.OPEN:
            code = ErrorCode.STREAM_CLOSED if stream.recv_side is Side.CLOSED else ErrorCode.PROTOCOL_ERROR
            self._stream_error(stream, code, events)
            return
        if not flags & _END:
            self._stream_error(stream, ErrorCode.PROTOCOL_ERROR, events)
            return
        try:
            headers = F.decode_trailers(payload)
        except F.HeadDecodeError:
            self._stream_error(stream, ErrorCode.PROTOCOL_ERROR, events)
            return
        events.append(TrailersReceived(stream_id, headers))
        self._end_recv(stream, events)

    def _on_window_update(self, stream_id: int, payload: memoryview, events: list[Event], now: float) -> None:
        increment = F.decode_u32(payload, "WINDOW_UPDATE") & 0x7FFFFFFF
        if not self._window_bucket.take(now):
            raise RemoteProtocolError("WINDOW_UPDATE flood", ErrorCode.ENHANCE_YOUR_CALM)
        if stream_id == 0:
            if increment == 0:
                raise RemoteProtocolError("WINDOW_UPDATE of 0 on the connection")
            if self._conn_send_window + increment > MAX_WINDOW:
                raise RemoteProtocolError(
                    "connection window pushed above 2^31-1", ErrorCode.FLOW_CONTROL_ERROR
                )
            self._conn_send_window += increment
            events.append(WindowUpdated(0, increment))
            return
        stream = self._lookup(stream_id)
        if stream is None:
            return
        if increment == 0:
            self._stream_error(stream, ErrorCode.PROTOCOL_ERROR, events)
            return
        if stream.send_window + increment > MAX_WINDOW:
            self._stream_error(stream, ErrorCode.FLOW_CONTROL_ERROR, events)
            return
        stream.send_window += increment
        if stream.has_pending_output:
            self._enqueue(stream)
        events.append(WindowUpdated(stream_id, increment))

    def _on_reset(self, stream_id: int, payload: memoryview, events: list[Event], now: float) -> None:
        code = ErrorCode.from_wire(F.decode_u32(payload, "RESET"))
        if not self._reset_bucket.take(now):
            raise RemoteProtocolError("RESET flood", ErrorCode.ENHANCE_YOUR_CALM)
        stream = self._lookup(stream_id)
        if stream is None or stream.state() is StreamState.CLOSED:
            # Both END_STREAMs crossed already: the exchange is complete and its data stays deliverable.
            return
        self._drop(stream)
        events.append(StreamReset(stream_id, code, remote=True))

    def _on_ping(self, flags: int, payload: memoryview, events: list[Event], now: float) -> None:
        if len(payload) != 8:
            raise RemoteProtocolError(
                f"PING payload must be 8 octets, got {len(payload)}", ErrorCode.FRAME_SIZE_ERROR
            )
        opaque = bytes(payload)
        if flags & F.FLAG_ACK:
            events.append(PingAcknowledged(opaque))
            return
        if not self._ping_bucket.take(now):
            raise RemoteProtocolError("PING flood", ErrorCode.ENHANCE_YOUR_CALM)
        self._control.append(F.encode_ping(opaque, ack=True))
        events.append(PingReceived(opaque))

    def _on_goaway(self, payload: memoryview, events: list[Event]) -> None:
        last_stream_id, code, debug = F.decode_goaway(payload)
        previous = self._goaway_received_last
        if previous is not None and last_stream_id > previous:
            raise RemoteProtocolError("GOAWAY raised its last-stream-id")
        self._goaway_received_last = last_stream_id
        events.append(GoAwayReceived(last_stream_id, ErrorCode.from_wire(code), debug))
        refused = [s for sid, s in self._streams.items() if s.local_initiated and sid > last_stream_id]
        for stream in refused:
            self._drop(stream)
            events.append(StreamReset(stream.stream_id, ErrorCode.REFUSED_STREAM, remote=True))

    # -- helpers -----------------------------------------------------------------------------------

    def _end_recv(self, stream: Stream, events: list[Event]) -> None:
        stream.recv_side = Side.CLOSED
        events.append(StreamEnded(stream.stream_id))
        self._maybe_retire(stream)

    def _stream_error(self, stream: Stream, code: ErrorCode, events: list[Event]) -> None:
        self._control.append(F.encode_reset(stream.stream_id, code))
        self._drop(stream)
        events.append(StreamReset(stream.stream_id, code, remote=False))

    def _drop(self, stream: Stream) -> None:
        """Remove a reset stream: its queued output is discarded, its unacknowledged input credited."""
        del self._streams[stream.stream_id]
        self._deactivate(stream)
        stream.outbound.clear()
        stream.outbound_bytes = 0
        stream.end_pending = False
        stream.trailers_pending = None
        if stream.recv_unacked:
            self._credit_connection(stream.recv_unacked)
            stream.recv_unacked = 0

    def _deactivate(self, stream: Stream) -> None:
        if stream.active:
            stream.active = False
            if stream.local_initiated:
                self._local_active -= 1
            else:
                self._peer_active -= 1

    def _maybe_retire(self, stream: Stream) -> None:
        if stream.send_side is not Side.CLOSED or stream.end_pending:
            return
        if stream.recv_side is not Side.CLOSED:
            return
        self._deactivate(stream)
        if stream.recv_unacked == 0:
            self._streams.pop(stream.stream_id, None)

    def _credit_connection(self, size: int) -> None:
        self._conn_consumed += size
        # Batch credit to half the window, except when the peer is nearly out of window: a stalled stream may
        # hold most of it, and then what its siblings consumed is all the peer can ever get back. Waiting for
        # less than one frame of window left keeps that exception batched too (no WINDOW_UPDATE per read).
        threshold = self._conn_update_threshold
        if self._conn_consumed >= threshold or (
            self._conn_consumed and self._conn_recv_window < self._conn_low_water
        ):
            self._control.append(F.encode_window_update(0, self._conn_consumed))
            self._conn_recv_window += self._conn_consumed
            self._conn_consumed = 0

    def _enqueue(self, stream: Stream) -> None:
        if not stream.queued:
            stream.queued = True
            self._send_queue.append(stream.stream_id)

    def _is_used_id(self, stream_id: int) -> bool:
        if stream_id % 2 == self._peer_parity:
            return 0 < stream_id <= self._highest_peer_id
        return 0 < stream_id < self._next_local_id

    def _encode_head(self, head: F.RequestHead | F.ResponseHead) -> bytes:
        try:
            if isinstance(head, F.RequestHead):
                payload = F.encode_request_head(head)
            else:
                payload = F.encode_response_head(head)
        except ValueError as exc:
            raise LocalProtocolError(str(exc)) from None
        if len(payload) > self._peer().max_head_size:
            raise LocalProtocolError(f"head of {len(payload)} octets exceeds the peer's MAX_HEAD_SIZE")
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
