"""The input half of a connection: parse the peer's frames and apply SPEC.md sections 6-8 and 11 to them."""

from __future__ import annotations

from . import _frames as F
from ._core import (
    _DATA,
    _END,
    _HEAD_TYPES,
    _HEADER_SIZE,
    ConnectionState,
    _ConnectionCore,
    _unpack_header,
)
from ._errors import ErrorCode, RemoteProtocolError
from ._events import (
    DataReceived,
    Event,
    GoAwayReceived,
    HandshakeComplete,
    PingAcknowledged,
    PingReceived,
    ReplyReceived,
    StreamOpened,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from ._settings import MAX_WINDOW, Settings
from ._stream import Side, Stream, StreamState


class _Receiving(_ConnectionCore):
    """Frame parsing and the per-frame rules. Stream errors become RESET + StreamReset; connection errors
    raise RemoteProtocolError after `_fail` queued the GOAWAY."""

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

    def receive_transport_ping(self, now: float = 0.0) -> None:
        """Charge a ping the transport beneath answered by itself (a WebSocket ping) to the PING budget.

        Such pings cost the same pong as ours, so they share the bucket (SPEC 11). Raises RemoteProtocolError
        with ENHANCE_YOUR_CALM (after queueing the GOAWAY) once the budget is spent.
        """
        if self.state is ConnectionState.CLOSED:
            raise RemoteProtocolError("connection already failed", ErrorCode.PROTOCOL_ERROR)
        if not self._ping_bucket.take(now):
            exc = RemoteProtocolError("transport-level PING flood", ErrorCode.ENHANCE_YOUR_CALM)
            self._fail(exc)
            raise exc

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
