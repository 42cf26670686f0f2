"""The input half of a connection: parse the peer's frames and apply SPEC.md sections 6-8 and 11 to them."""

from __future__ import annotations

from collections.abc import Callable

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
from ._credit import Credit
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
from ._settings import Settings
from ._state import RECEIVED, RECEIVED_BY_EVENT, REPLY_EVENTS, Received, Recv
from ._stream import Stream, StreamState

_E = Received
_DATA_CELLS = RECEIVED_BY_EVENT[Received.DATA]
_DATA_END_CELLS = RECEIVED_BY_EVENT[Received.DATA_END]


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
        handler = _HANDLERS.get(frame_type)
        if handler is None:
            return  # unknown types are skipped (SPEC 3)
        kind = F.FrameType(frame_type)
        if kind in F.CONNECTION_FRAME_TYPES:
            if stream_id != 0:
                raise RemoteProtocolError(f"{kind.name} on stream {stream_id}; it belongs to stream 0")
        elif kind in F.STREAM_FRAME_TYPES and stream_id == 0:
            raise RemoteProtocolError(f"{kind.name} on stream 0")
        handler(self, stream_id, flags, payload, events, now)

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
        self._conn.send_window = peer.connection_window
        self.state = ConnectionState.OPEN
        events.append(HandshakeComplete(peer))

    def _on_second_hello(self, *_: object) -> None:
        raise RemoteProtocolError("a second HELLO")

    def _on_data(
        self, stream_id: int, flags: int, payload: memoryview, events: list[Event], now: float
    ) -> None:
        if stream_id == 0:
            raise RemoteProtocolError("DATA on stream 0")
        size = len(payload)
        conn = self._conn
        if not self._conn_credit.receive(conn, size):
            raise RemoteProtocolError("DATA exceeds the connection window", ErrorCode.FLOW_CONTROL_ERROR)
        end = flags & _END
        if not size and not end and not self._empty_bucket.take(now):
            raise RemoteProtocolError("too many empty DATA frames", ErrorCode.ENHANCE_YOUR_CALM)
        cells = _DATA_END_CELLS if end else _DATA_CELLS
        stream = self._streams.get(stream_id)
        if stream is None:
            # Crossed a RESET (or idle, which fails): discard, but give the connection window back (SPEC 6).
            self._refuse(stream_id, cells[self._absent(stream_id)], events)
            self._conn_credit.consume(conn, size)
            return
        recv = cells[stream.recv]
        if type(recv) is not Recv:
            self._conn_credit.consume(conn, size)
            self._refuse(stream_id, recv, events)
            return
        if not self._stream_credit.receive(stream, size):
            self._conn_credit.consume(conn, size)
            self._stream_error(stream, ErrorCode.FLOW_CONTROL_ERROR, events)
            return
        if size:
            stream.recv_unacked += size
            events.append(DataReceived(stream_id, payload))
        if recv is not stream.recv:
            self._advance(stream, recv, events)

    def _on_open(
        self, stream_id: int, flags: int, payload: memoryview, events: list[Event], now: float
    ) -> None:
        stream = self._streams.get(stream_id)
        before = self._absent(stream_id) if stream is None else stream.recv
        recv = RECEIVED[before, _E.OPEN_END if flags & _END else _E.OPEN]
        if type(recv) is not Recv:
            self._refuse(stream_id, recv, events)  # every refused OPEN is a connection error (SPEC 6)
            return
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
        self._advance(stream, recv, events)

    def _live(self, stream_id: int, event: Received, events: list[Event]) -> tuple[Stream, Recv] | None:
        """Look the frame's cell up; return the stream and its next receive state if the cell accepts it,
        else carry out the refusal and return None."""
        stream = self._streams.get(stream_id)
        cell = RECEIVED[self._absent(stream_id) if stream is None else stream.recv, event]
        if stream is None or type(cell) is not Recv:
            self._refuse(stream_id, cell, events)
            return None
        return stream, cell

    def _on_head(self, stream_id: int, event: Received, head: Event | None, events: list[Event]) -> None:
        """A REPLY or TRAILERS: report its head (None: it did not parse) if the table accepts the frame."""
        accepted = self._live(stream_id, event, events)
        if accepted is not None and head is not None:
            events.append(head)
            self._advance(*accepted, events)

    def _on_reply(
        self, stream_id: int, flags: int, payload: memoryview, events: list[Event], now: float
    ) -> None:
        try:
            head = F.decode_response_head(payload)
        except F.HeadDecodeError:
            self._on_head(stream_id, _E.REPLY_MALFORMED, None, events)
            return
        event = REPLY_EVENTS[head.is_interim, bool(flags & _END)]
        self._on_head(stream_id, event, ReplyReceived(stream_id, head), events)

    def _on_trailers(
        self, stream_id: int, flags: int, payload: memoryview, events: list[Event], now: float
    ) -> None:
        if not flags & _END:
            self._on_head(stream_id, _E.TRAILERS, None, events)  # SPEC 4.5: TRAILERS must end the stream
            return
        try:
            headers = F.decode_trailers(payload)
        except F.HeadDecodeError:
            self._on_head(stream_id, _E.TRAILERS_MALFORMED, None, events)
            return
        self._on_head(stream_id, _E.TRAILERS_END, TrailersReceived(stream_id, headers), events)

    def _on_window_update(
        self, stream_id: int, flags: int, payload: memoryview, events: list[Event], now: float
    ) -> None:
        increment = F.decode_u32(payload, "WINDOW_UPDATE") & 0x7FFFFFFF
        if not self._window_bucket.take(now):
            raise RemoteProtocolError("WINDOW_UPDATE flood", ErrorCode.ENHANCE_YOUR_CALM)
        if stream_id == 0:
            error = Credit.grant(self._conn, increment)
            if error is not None:
                raise RemoteProtocolError(_CONNECTION_GRANT_ERRORS[error], error)
            events.append(WindowUpdated(0, increment))
            return
        accepted = self._live(stream_id, _E.WINDOW_UPDATE, events)
        if accepted is None:
            return
        stream = accepted[0]
        error = Credit.grant(stream, increment)
        if error is not None:
            self._stream_error(stream, error, events)
            return
        if stream.has_pending_output:
            self._enqueue(stream)
        events.append(WindowUpdated(stream_id, increment))

    def _on_reset(
        self, stream_id: int, flags: int, payload: memoryview, events: list[Event], now: float
    ) -> None:
        code = ErrorCode.from_wire(F.decode_u32(payload, "RESET"))
        if not self._reset_bucket.take(now):
            raise RemoteProtocolError("RESET flood", ErrorCode.ENHANCE_YOUR_CALM)
        stream = self._streams.get(stream_id)
        if stream is not None and stream.state() is StreamState.CLOSED:
            # SPEC 7: both END_STREAMs crossed, so the exchange is complete and its data stays deliverable.
            stream = None
        cell = RECEIVED[self._absent(stream_id) if stream is None else stream.recv, _E.RESET]
        if stream is None or type(cell) is not Recv:
            self._refuse(stream_id, cell, events)
            return
        self._drop(stream)
        events.append(StreamReset(stream_id, code, remote=True))

    def _on_ping(
        self, stream_id: int, flags: int, payload: memoryview, events: list[Event], now: float
    ) -> None:
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

    def _on_goaway(
        self, stream_id: int, flags: int, payload: memoryview, events: list[Event], now: float
    ) -> None:
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


_Handler = Callable[[_Receiving, int, int, memoryview, list[Event], float], None]
# Frame type -> its rules, once the connection is open (SPEC 4).
_HANDLERS: dict[int, _Handler] = {
    F.FrameType.HELLO: _Receiving._on_second_hello,
    F.FrameType.OPEN: _Receiving._on_open,
    F.FrameType.REPLY: _Receiving._on_reply,
    F.FrameType.DATA: _Receiving._on_data,
    F.FrameType.TRAILERS: _Receiving._on_trailers,
    F.FrameType.WINDOW_UPDATE: _Receiving._on_window_update,
    F.FrameType.RESET: _Receiving._on_reset,
    F.FrameType.PING: _Receiving._on_ping,
    F.FrameType.GOAWAY: _Receiving._on_goaway,
}
_CONNECTION_GRANT_ERRORS = {
    ErrorCode.PROTOCOL_ERROR: "WINDOW_UPDATE of 0 on the connection",
    ErrorCode.FLOW_CONTROL_ERROR: "connection window pushed above 2^31-1",
}
