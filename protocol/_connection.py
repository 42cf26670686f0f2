"""The connection state machine: bytes in, events out, bytes to send (SPEC.md sections 6-11).

No I/O and no clock: the runtime feeds received bytes with `receive_data(data, now)`, pulls bytes to send with
`data_to_send(max_bytes)` when its transport can take them, and calls the local-action methods. Every local
action is validated before anything is queued, so a `LocalProtocolError` leaves the connection unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

from . import _frames as F
from ._core import (
    _DATA,
    _END,
    _HEADER_SIZE,
    _OPEN,
    _SIDE_CLOSED,
    _STREAM_ID,
    ConnectionState,
    Role,
    _pack_header,
)
from ._errors import ErrorCode, HeadNotEncodable, HeadPart, LocalProtocolError, RemoteProtocolError
from ._receiving import _Receiving
from ._settings import MAX_STREAM_ID
from ._state import ENDED, REPLY_ACTIONS, SENT, SENT_BY_EVENT, Misuse, Sent, SentCell, Side
from ._stream import Stream, StreamState

_SEND_DATA = SENT_BY_EVENT[Sent.DATA]
_SEND_DATA_END = SENT_BY_EVENT[Sent.DATA_END]

__all__ = ["Connection", "ConnectionState", "Role"]


class Connection(_Receiving):
    """One rtunnel protocol connection, from one endpoint's point of view."""

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
        if self._conn.send_window > 0:
            return True
        return any(
            (s := self._streams.get(sid)) is not None and s.outbound_bytes == 0 for sid in self._send_queue
        )

    @property
    def connection_send_window(self) -> int:
        return self._conn.send_window

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
        return max(0, min(stream.send_window, self._conn.send_window))

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
        side = self._transition(stream, REPLY_ACTIONS[head.is_interim, end_stream])
        payload = self._encode_head(head)
        stream.send_side = side
        self._control.append(F.encode_frame(F.FrameType.REPLY, _END if end_stream else 0, stream_id, payload))
        self._maybe_retire(stream)

    def send_data(
        self, stream_id: int, data: bytes | bytearray | memoryview, *, end_stream: bool = False
    ) -> None:
        """Queue stream bytes (not copied: do not mutate `data` afterwards). Never blocks on the window:
        the runtime bounds what it queues with `outbound_buffered`."""
        stream = self._stream_for_sending(stream_id)
        side = (_SEND_DATA_END if end_stream else _SEND_DATA)[stream.send_side]
        if type(side) is not Side:
            raise _misuse(stream, side)
        if data:
            view = memoryview(data).cast("B") if not isinstance(data, bytes) else memoryview(data)
            stream.outbound.append(view)
            stream.outbound_bytes += len(view)
            self.outbound_total += len(view)
        stream.send_side = side
        if end_stream:
            stream.end_pending = True
        self._enqueue(stream)

    def end_stream(self, stream_id: int) -> None:
        self.send_data(stream_id, b"", end_stream=True)

    def send_trailers(self, stream_id: int, headers: Sequence[tuple[bytes, bytes]]) -> None:
        """Queue TRAILERS; they end our direction after all queued data."""
        stream = self._stream_for_sending(stream_id)
        side = self._transition(stream, Sent.TRAILERS)
        payload = F.encode_trailers(headers)
        if len(payload) > self._peer().max_head_size:
            raise HeadNotEncodable("trailers exceed the peer's MAX_HEAD_SIZE", HeadPart.SIZE)
        stream.trailers_pending = payload
        stream.send_side = side
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
        if stream.recv not in ENDED:  # a stream's window is never credited after the peer's END_STREAM
            self._stream_credit.consume(stream, size)
        self._conn_credit.consume(self._conn, size)
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

    def fail(self, reason: str, error_code: ErrorCode = ErrorCode.PROTOCOL_ERROR) -> RemoteProtocolError:
        """A connection error the runtime detected below this layer (SPEC 2: a text WebSocket message): queue
        the GOAWAY for it alone, as for one found in the frames, and return the error to raise."""
        error = RemoteProtocolError(reason, error_code)
        if self.state is not ConnectionState.CLOSED:
            self._fail(error)
        return error

    @staticmethod
    def _transition(stream: Stream, action: Sent) -> Side:
        """The send side `action` leads to (SPEC 7); LocalProtocolError, before anything changed, if none."""
        cell = SENT[stream.send_side, action]
        if type(cell) is not Side:
            raise _misuse(stream, cell)
        return cell

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
        conn = self._conn
        waiting = 0  # consecutive streams skipped for lack of connection window or budget
        while queue and waiting < len(queue) and budget > _HEADER_SIZE:
            stream_id = queue.popleft()
            stream = streams.get(stream_id)
            if stream is None:
                continue
            size = stream.outbound_bytes
            if size:
                window = stream.send_window
                conn_window = conn.send_window
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
                    waiting += self._park(stream)
                    continue
                stream.send_window = window - size
                conn.send_window = conn_window - size
            skipped = waiting
            waiting = 0
            drained = stream.outbound_bytes == size
            flags = 0
            if drained and stream.end_pending and stream.trailers_pending is None:
                flags = _END
                stream.end_pending = False
            if size:
                append(_pack_header((size << 8) | _DATA, flags, stream_id))
                stream.take_into(size, out)
                self.outbound_total -= size
                budget -= _HEADER_SIZE + size
            elif flags:
                append(_pack_header(_DATA, flags, stream_id))
                budget -= _HEADER_SIZE
            if drained and stream.trailers_pending is not None:
                if self._emit_trailers(stream, out, budget):
                    budget -= len(out[-1])  # the TRAILERS frame
                elif not size:
                    waiting = skipped + 1  # nothing went out for this stream: it counts as skipped
            if stream.outbound_bytes or stream.end_pending:
                queue.append(stream_id)
            else:
                stream.queued = False
                if stream.send_side is _SIDE_CLOSED:
                    self._maybe_retire(stream)
        return budget

    def _park(self, stream: Stream) -> int:
        """A stream with data but no window or budget for it: 1 if it stays queued (and counts as skipped)."""
        if stream.send_window <= 0:
            stream.queued = False  # a WINDOW_UPDATE for it re-queues it
            return 0
        self._send_queue.append(stream.stream_id)
        return 1

    @staticmethod
    def _emit_trailers(stream: Stream, out: list[bytes | memoryview], budget: int) -> bool:
        trailers = stream.trailers_pending
        assert trailers is not None
        # Stay within max_bytes (data_to_send's contract): TRAILERS that do not fit wait for the next call,
        # unless nothing at all went out yet (at least one frame per call).
        if _HEADER_SIZE + len(trailers) > budget and out:
            return False
        out.append(F.encode_frame(F.FrameType.TRAILERS, _END, stream.stream_id, trailers))
        stream.trailers_pending = None
        stream.end_pending = False
        return True


def _misuse(stream: Stream, cell: SentCell) -> LocalProtocolError:
    assert isinstance(cell, Misuse)
    return LocalProtocolError(cell.message.format(stream_id=stream.stream_id))
