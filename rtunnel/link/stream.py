"""One exchange on a multiplexed link: `MuxStream`, and `StreamReset`, how a stream ends abnormally.

A stream has two faces. The exchange API the HTTP bridge uses (send_reply, send_data, send_trailers,
receive_reply, receive_data...) keeps heads, bytes and END apart and never awaits unless it must wait: on the
hot path a checkpoint per frame would cost a scheduler pass. The trio face (`trio.abc.HalfCloseableStream`:
send_all, receive_some, send_eof, aclose) carries raw bytes after a protocol switch, so one generic loop can pump
them to and from any trio stream; it checkpoints as trio's streams must.

The multiplexer files what its reader parsed into a stream through the methods under "link side", and the
stream asks its multiplexer for what it needs through `StreamHost` (link/mux.py's Multiplexer implements it).
"""

from __future__ import annotations

import contextlib
import operator
from collections import deque
from collections.abc import Callable, Sequence
from typing import Protocol

import trio

from protocol import (
    Connection,
    ConnectionState,
    ErrorCode,
    LocalProtocolError,
    RequestHead,
    ResponseHead,
    StreamState,
)

# A stream's writer waits once this much of its data is queued in the core but not yet framed.
SEND_HIGH_WATER = 128 * 1024
# Response heads (interim 1xx ones, any number of which may precede the final one) received on one stream and
# not yet taken by receive_reply: beyond this, the stream is reset.
MAX_PENDING_REPLIES = 64
# receive_some's size when none is asked for.
DEFAULT_RECEIVE_SIZE = 65536


class StreamReset(Exception):
    """The stream ended abnormally: reset by the peer, by us, or lost with its connection.

    `retryable` is True when the peer cannot have processed it (refused, above a GOAWAY, or never written),
    so sending the request again elsewhere cannot apply it twice.
    """

    def __init__(self, error_code: ErrorCode, *, remote: bool, retryable: bool, reason: str = "") -> None:
        self.error_code = error_code
        self.remote = remote
        self.retryable = retryable
        self.reason = reason
        who = "peer" if remote else "local"
        super().__init__(f"stream reset ({who}, {error_code.name}){': ' + reason if reason else ''}")


class StreamHost(Protocol):
    """What a stream needs from the multiplexer it belongs to."""

    name: str  # of the connection, e.g. "relay wss://..."

    def wake_writer(self) -> None:
        """Frames were queued in the core: put them on the wire (now, or soon)."""

    def block_writer(self, stream: MuxStream, *, new_stall: bool) -> None:
        """`stream` waits for its queued data to drop below SEND_HIGH_WATER: call its room_made() then."""

    def consumed(self, size: int) -> None:
        """`size` received bytes left the stream's buffer (the connection keeps their total)."""

    def reset_after_flush(self, stream_id: int) -> None:
        """Refuse the rest of the peer's direction with RESET(NO_ERROR) once our END on it is written."""

    def release(self, stream: MuxStream, buffered: int) -> None:
        """The stream's owner is done with it; `buffered` received bytes die with it."""


class MuxStream(trio.abc.HalfCloseableStream):
    """One exchange on the connection. Only one task reads and one task writes a stream at a time."""

    def __init__(
        self, host: StreamHost, conn: Connection, stream_id: int, request_head: RequestHead | None
    ) -> None:
        self._host = host
        self._conn = conn
        self.stream_id = stream_id
        self.request_head = request_head
        self.trailers: tuple[tuple[bytes, bytes], ...] | None = None
        # A list, not a deque: at most MAX_PENDING_REPLIES heads, and an empty deque takes 760 bytes, which
        # every open stream (a held long poll) would keep.
        self._replies: list[ResponseHead] = []
        self._chunks: deque[memoryview] = deque()
        self._buffered = 0
        self._ended = False
        self._error: StreamReset | None = None
        self._readable = trio.Event()
        self._writable = trio.Event()
        # Set once, on failure; any number of tasks may wait on it (unlike _readable/_writable, which belong
        # to the one reader and the one writer of the stream).
        self._cancel_on_fail: list[trio.CancelScope] = []
        self.closed = False  # released: by its owner, or with its connection
        self._owner_closed = False  # close()/aclose() was called: the trio face raises ClosedResourceError
        self._sent_end = False
        self._sending = False  # a trio-face send is in progress (BusyResourceError for a second one)
        self._receiving = False
        self._stalled_since: float | None = None  # since when data waits for a window the peer won't open
        self.bytes_received = 0
        self.bytes_sent = 0

    # -- sending -----------------------------------------------------------------------------------

    async def send_reply(
        self, head: ResponseHead, *, data: bytes | bytearray | memoryview = b"", end_stream: bool = False
    ) -> None:
        """Send a response head; with `data`, the first body bytes too (at most SEND_HIGH_WATER): a small
        response already complete goes out as one message, since each call puts its frames on the wire."""
        self._check_alive()
        conn = self._conn
        if data:
            if len(data) > SEND_HIGH_WATER:
                raise ValueError("send_reply takes at most SEND_HIGH_WATER bytes of data")
            conn.send_reply(self.stream_id, head)
            conn.send_data(self.stream_id, data, end_stream=end_stream)
            self.bytes_sent += len(data)
        else:
            conn.send_reply(self.stream_id, head, end_stream=end_stream)
        self._sent_end = self._sent_end or end_stream
        self._host.wake_writer()

    async def send_data(self, data: bytes | bytearray | memoryview, *, end_stream: bool = False) -> None:
        self._check_alive()
        if self._conn.outbound_buffered(self.stream_id) >= SEND_HIGH_WATER:
            await self._wait_for_room(self._check_alive)
        self._queue(data, end_stream)

    @property
    def send_would_wait(self) -> bool:
        """send_data would wait for the peer's window: this stream's unsent data is at its high water."""
        return self._conn.outbound_buffered(self.stream_id) >= SEND_HIGH_WATER

    async def send_end(self) -> None:
        await self.send_data(b"", end_stream=True)

    async def send_trailers(self, headers: Sequence[tuple[bytes, bytes]]) -> None:
        self._check_alive()
        self._conn.send_trailers(self.stream_id, headers)
        self._sent_end = True
        self._host.wake_writer()

    # -- receiving ---------------------------------------------------------------------------------

    async def receive_reply(self) -> ResponseHead:
        while not self._replies:
            if self._error is not None:
                raise self._error
            if self._ended or self._chunks:
                raise StreamReset(
                    ErrorCode.PROTOCOL_ERROR, remote=True, retryable=False, reason="no reply head"
                )
            await self._wait_readable()
        return self._replies.pop(0)

    async def receive_data(self, max_bytes: int = 65536) -> bytes:
        """Next bytes of the peer's direction; b"" once it ended. Credits the window as bytes are taken."""
        while (data := self.receive_data_nowait(max_bytes)) is None:
            await self._wait_readable()
        return data

    def receive_data_nowait(self, max_bytes: int = 65536) -> bytes | None:
        """Like receive_data, but None instead of waiting: lets a caller batch what already arrived (a small
        response's head, body and end) into one socket write."""
        if not self._chunks:
            if self._ended:
                return b""  # complete: a RESET that came after END_STREAM takes nothing away
            if self._error is not None:
                raise self._error
            return None
        chunk = self._chunks[0]
        if len(chunk) <= max_bytes:
            self._chunks.popleft()
        else:
            self._chunks[0] = chunk[max_bytes:]
            chunk = chunk[:max_bytes]
        size = len(chunk)
        self._buffered -= size
        if not self.closed:  # a forgotten stream's bytes already left the total
            self._host.consumed(size)
        self.bytes_received += size
        if self._conn.state is not ConnectionState.CLOSED:
            self._conn.acknowledge_received_data(self.stream_id, size)
            self._host.wake_writer()
        return bytes(chunk)

    @property
    def peer_name(self) -> str:
        """The name of the connection the stream belongs to (e.g. "relay wss://...")."""
        return self._host.name

    @property
    def at_eof(self) -> bool:
        return self._ended and not self._chunks

    def cancel_on_reset(self, scope: trio.CancelScope) -> None:
        """Cancel `scope` when the stream fails (reset by either side, or lost with its connection): lets a
        handler notice a peer's RESET while it waits elsewhere, e.g. on its upstream after the request body
        ended, where receive_data would only return b"" (END wins over a later RESET). A scope, not a watcher
        task: the agent does this for every exchange, and a task plus a nursery each showed in profiles."""
        if self._error is not None:
            scope.cancel()
        else:
            self._cancel_on_fail.append(scope)

    @property
    def error(self) -> StreamReset | None:
        return self._error

    # -- ending ------------------------------------------------------------------------------------

    def reset(self, code: ErrorCode = ErrorCode.CANCEL) -> None:
        """Abort the stream and release it (idempotent). Later calls on it raise StreamReset."""
        self.abort(code)
        self._release()

    def close(self) -> None:
        """Release the stream once its exchange is over.

        A stream whose both directions ended is simply forgotten. If only our direction ended (a complete
        response to a request whose body we did not read), the rest of the peer's body is refused with
        RESET(NO_ERROR) once our last frame is out, as HTTP/2 does. Anything else is abandoned: RESET(CANCEL).
        """
        self._owner_closed = True
        if self._sending or self._receiving:
            # A task blocked in the trio face wakes up to raise ClosedResourceError (trio's contract).
            self._readable.set()
            self._writable.set()
        if self.closed:
            return
        conn = self._conn
        if self._error is None and conn.state is not ConnectionState.CLOSED:
            state = conn.stream_state(self.stream_id)
            if state is StreamState.CLOSED:
                unacknowledged = conn.received_unacknowledged(self.stream_id)
                if unacknowledged:
                    conn.acknowledge_received_data(self.stream_id, unacknowledged)
                    self._host.wake_writer()
            elif self._sent_end:
                self._host.reset_after_flush(self.stream_id)
                unacknowledged = conn.received_unacknowledged(self.stream_id)
                if unacknowledged:
                    conn.acknowledge_received_data(self.stream_id, unacknowledged)
                self._host.wake_writer()
            else:
                self.reset(ErrorCode.CANCEL)
                return
        self._chunks.clear()
        self._release()

    # -- the trio face: trio.abc.HalfCloseableStream --------------------------------------------------

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Send raw bytes on our direction. BrokenResourceError (from the StreamReset) once the stream
        failed; ClosedResourceError after send_eof or aclose."""
        self._enter_send()
        try:
            await self._until_sendable()
            if data:
                # Copied unless immutable: the core holds what it is given until it is framed.
                self._queue(data if type(data) is bytes else bytes(data), False)
        finally:
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        self._enter_send()
        try:
            await self._until_sendable()
        finally:
            self._sending = False

    async def send_eof(self) -> None:
        """End our direction (END_STREAM) after the bytes already sent; idempotent."""
        self._enter_send()
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            if self._owner_closed:
                raise trio.ClosedResourceError("stream closed")
            if not self._sent_end:
                self._check_sendable()
                self._queue(b"", True)  # no bytes: nothing to wait for
            await trio.lowlevel.cancel_shielded_checkpoint()
        finally:
            self._sending = False

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """The peer's next raw bytes; b"" once its direction ended. BrokenResourceError (from the
        StreamReset) if the stream failed first; ClosedResourceError after aclose."""
        size = DEFAULT_RECEIVE_SIZE if max_bytes is None else operator.index(max_bytes)
        if size < 1:
            raise ValueError("max_bytes must be at least 1")
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving on this stream")
        self._receiving = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            waited = False
            while True:
                if self._owner_closed:
                    raise trio.ClosedResourceError("stream closed")
                try:
                    data = self.receive_data_nowait(size)
                except StreamReset as exc:
                    raise trio.BrokenResourceError(str(exc)) from exc
                if data is not None:
                    break
                await self._wait_readable()
                waited = True
            if not waited:
                await trio.lowlevel.cancel_shielded_checkpoint()
            return data
        finally:
            self._receiving = False

    async def aclose(self) -> None:
        """Graceful close: END our direction if it is still open, then close() (which refuses the rest of
        the peer's direction). Never waits for the link: the END is queued, not written."""
        if not self._owner_closed and not self._sent_end and self._error is None:
            # If our direction cannot end yet (no reply sent), close() abandons it with RESET(CANCEL).
            with contextlib.suppress(LocalProtocolError):
                self._queue(b"", True)
        self.close()
        await trio.lowlevel.checkpoint()

    # -- link side: called by the multiplexer ------------------------------------------------------

    def data_received(self, data: memoryview) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        self._readable.set()

    def end_received(self) -> None:
        self._ended = True
        self._readable.set()

    def reply_received(self, head: ResponseHead) -> bool:
        """File a response head; False (not filed) if too many are pending already."""
        if len(self._replies) >= MAX_PENDING_REPLIES:
            return False
        self._replies.append(head)
        self._readable.set()
        return True

    def trailers_received(self, headers: tuple[tuple[bytes, bytes], ...]) -> None:
        self.trailers = headers

    def fail(self, error: StreamReset) -> None:
        """The stream failed (the first error counts): every waiter on it wakes."""
        if self._error is None:
            self._error = error
        self._readable.set()
        self._writable.set()
        for scope in self._cancel_on_fail:
            scope.cancel()
        self._cancel_on_fail.clear()

    def abort(self, code: ErrorCode) -> None:
        """Fail the stream and send RESET, but leave it to its owner to release (it still counts)."""
        if self._error is None:
            self.fail(StreamReset(code, remote=False, retryable=False, reason="reset locally"))
        if self._conn.state is not ConnectionState.CLOSED:
            self._conn.reset_stream(self.stream_id, code)
            self._host.wake_writer()

    def lost(self, error: StreamReset) -> None:
        """The connection is gone: fail and release without telling the multiplexer (it forgets them all)."""
        self.fail(error)
        self.closed = True

    def room_made(self) -> None:
        """Queued data dropped below SEND_HIGH_WATER: a blocked writer may go on."""
        self._writable.set()

    def window_granted(self) -> None:
        """Credit arrived for this stream: it is making progress."""
        self._stalled_since = None

    def stalled_for(self, now: float) -> float | None:
        """Since how long its queued data has found no window, None if it has not since the last check
        (called at heartbeat pace)."""
        conn = self._conn
        waiting = self._error is None and conn.outbound_buffered(self.stream_id) > 0
        if not waiting or conn.send_window(self.stream_id):
            self._stalled_since = None
        elif self._stalled_since is None:
            self._stalled_since = now
        else:
            return now - self._stalled_since
        return None

    # -- internals ---------------------------------------------------------------------------------

    def _queue(self, data: bytes | bytearray | memoryview, end_stream: bool) -> None:
        self._conn.send_data(self.stream_id, data, end_stream=end_stream)
        self._sent_end = self._sent_end or end_stream
        self.bytes_sent += len(data)
        self._host.wake_writer()

    async def _wait_for_room(self, check: Callable[[], None]) -> None:
        """Wait until this stream's queued data is below SEND_HIGH_WATER; `check` raises if it failed."""
        new_stall = True  # counted once per call, however many wake-ups it takes
        while True:
            self._writable = trio.Event()
            self._host.block_writer(self, new_stall=new_stall)
            new_stall = False
            await self._writable.wait()
            if self._owner_closed:
                raise trio.ClosedResourceError("stream closed")
            check()
            if self._conn.outbound_buffered(self.stream_id) < SEND_HIGH_WATER:
                return

    async def _until_sendable(self) -> None:
        """The trio face's one checkpoint before a send: a wait for room, or a pass of the scheduler."""
        await trio.lowlevel.checkpoint_if_cancelled()  # before anything is queued
        self._check_sendable()
        if self.send_would_wait:
            await self._wait_for_room(self._check_sendable)
        else:
            await trio.lowlevel.cancel_shielded_checkpoint()
            self._check_sendable()  # the stream may have failed meanwhile

    def _release(self) -> None:
        if not self.closed:
            self.closed = True
            self._host.release(self, self._buffered)

    def _check_alive(self) -> None:
        if self._error is not None:
            raise self._error

    def _check_sendable(self) -> None:
        if self._owner_closed or self._sent_end:
            raise trio.ClosedResourceError("stream closed" if self._owner_closed else "send_eof was called")
        if self._error is not None:
            raise trio.BrokenResourceError(str(self._error)) from self._error

    def _enter_send(self) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        self._sending = True

    async def _wait_readable(self) -> None:
        self._readable = trio.Event()
        await self._readable.wait()
