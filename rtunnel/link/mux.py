"""The stream multiplexer: drives one `protocol.Connection` over one WebSocket transport.

Three tasks per connection, all in a nursery `Multiplexer.run` owns:
- the reader turns each WebSocket message into events and files them into per-stream buffers without ever
  awaiting, so a slow consumer can never stall the link (the buffers are bounded by the flow-control windows,
  since the core credits only what the application consumed);
- the writer drains everything the core has pending into one WebSocket message per send (a message costs
  far more than a frame). With a single exchange on the link, and a plain TCP link with nothing queued, the
  exchange's own task writes its frames instead (see _wake_writer): a scheduler pass less on each end per
  message. The writer takes over whatever the kernel did not take at once;
- the heartbeat pings an idle link and declares the peer dead when nothing at all has arrived for
  `dead_timeout`, or when one send has been stuck that long. It never waits behind data: it only reads clocks.
  It also reaps stalled streams: one with data queued whose peer granted no window for `stall_timeout` is
  reset with CANCEL, so a peer that never reads (or lies about its windows) cannot pin a stream forever.
Streams the peer opens are handed to `handler`, each in its own task in the same nursery.
"""

from __future__ import annotations

import itertools
import logging
import struct
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol, runtime_checkable

import trio

from protocol import (
    Connection,
    ConnectionState,
    DataReceived,
    ErrorCode,
    GoAwayReceived,
    HandshakeComplete,
    Limits,
    PingAcknowledged,
    RemoteProtocolError,
    ReplyReceived,
    RequestHead,
    ResponseHead,
    Role,
    Settings,
    StreamEnded,
    StreamOpened,
    StreamState,
    TrailersReceived,
    WindowUpdated,
)
from protocol import (
    StreamReset as StreamResetEvent,
)

from .transport import (
    CLOSE_NORMAL,
    CLOSE_POLICY_VIOLATION,
    CLOSE_PROTOCOL_ERROR,
    TextMessage,
    TransportClosed,
)

log = logging.getLogger("rtunnel.mux")

# One WebSocket message carries at most this much: large enough to amortise the per-message cost, small
# enough that a small exchange queued behind bulk data waits at most one message.
MAX_MESSAGE = 256 * 1024
# A stream's writer waits once this much of its data is queued in the core but not yet framed.
SEND_HIGH_WATER = 128 * 1024
# Response heads (interim 1xx ones, any number of which may precede the final one) received on one stream and
# not yet taken by receive_reply: beyond this, the stream is reset.
MAX_PENDING_REPLIES = 64

_PING = struct.Struct(">Q")


class TransportLike(Protocol):
    async def send(self, message: bytes) -> None: ...

    async def receive(self) -> bytes: ...


@runtime_checkable
class DirectTransport(Protocol):
    """A transport that can also write a message without waiting (wslink.Transport on plain TCP)."""

    @property
    def can_send_nowait(self) -> bool: ...

    def send_nowait(self, message: bytes) -> None: ...

    @property
    def send_pending(self) -> bool: ...

    async def flush(self) -> None: ...


@runtime_checkable
class PingingTransport(Protocol):
    """A transport that answers pings of its own (WebSocket) and reports each to `on_ping`."""

    on_ping: Callable[[], None] | None


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


def close_code(error: BaseException) -> int:
    """The WebSocket close code that ends a connection after `error` (SPEC 2): 1002 after a GOAWAY for a
    connection error, 1008 for ENHANCE_YOUR_CALM (the transport turns it into 1003 after a text message)."""
    if isinstance(error, RemoteProtocolError):
        if error.error_code is ErrorCode.ENHANCE_YOUR_CALM:
            return CLOSE_POLICY_VIOLATION
        return CLOSE_PROTOCOL_ERROR
    return CLOSE_NORMAL


class MuxClosed(Exception):
    """The connection is gone or draining: no new stream can be opened on it."""


class LinkDead(Exception):
    """Nothing arrived from the peer for too long, or a send was stuck too long."""


class MuxStream:
    """One exchange on the connection. Only one task reads and one task writes a stream at a time."""

    def __init__(self, mux: Multiplexer, stream_id: int, request_head: RequestHead | None) -> None:
        self._mux = mux
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
        self.closed = False
        self._sent_end = False
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
        conn = self._mux._conn
        if data:
            if len(data) > SEND_HIGH_WATER:
                raise ValueError("send_reply takes at most SEND_HIGH_WATER bytes of data")
            conn.send_reply(self.stream_id, head)
            conn.send_data(self.stream_id, data, end_stream=end_stream)
            self.bytes_sent += len(data)
        else:
            conn.send_reply(self.stream_id, head, end_stream=end_stream)
        self._sent_end = self._sent_end or end_stream
        self._mux._wake_writer()

    async def send_data(self, data: bytes | bytearray | memoryview, *, end_stream: bool = False) -> None:
        conn = self._mux._conn
        stalled = False
        while True:
            self._check_alive()
            if conn.outbound_buffered(self.stream_id) < SEND_HIGH_WATER:
                break
            if not stalled:  # counted once per call, however many wake-ups it takes
                stalled = True
                self._mux.send_stalls += 1
            self._writable = trio.Event()
            self._mux._blocked_writers.add(self)
            await self._writable.wait()
        conn.send_data(self.stream_id, data, end_stream=end_stream)
        self._sent_end = self._sent_end or end_stream
        self.bytes_sent += len(data)
        self._mux._wake_writer()

    @property
    def send_would_wait(self) -> bool:
        """send_data would wait for the peer's window: this stream's unsent data is at its high water."""
        return self._mux._conn.outbound_buffered(self.stream_id) >= SEND_HIGH_WATER

    async def send_end(self) -> None:
        await self.send_data(b"", end_stream=True)

    async def send_trailers(self, headers: Sequence[tuple[bytes, bytes]]) -> None:
        self._check_alive()
        self._mux._conn.send_trailers(self.stream_id, headers)
        self._sent_end = True
        self._mux._wake_writer()

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
            self._mux._buffered_total -= size
        self.bytes_received += size
        mux = self._mux
        if mux._conn.state is not ConnectionState.CLOSED:
            mux._conn.acknowledge_received_data(self.stream_id, size)
            mux._wake_writer()
        return bytes(chunk)

    @property
    def peer_name(self) -> str:
        """The name of the connection the stream belongs to (e.g. "relay wss://...")."""
        return self._mux.name

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

    def reset(self, code: ErrorCode = ErrorCode.CANCEL) -> None:
        """Abort the stream (idempotent). Later calls on it raise StreamReset."""
        if self._error is None:
            self._fail(StreamReset(code, remote=False, retryable=False, reason="reset locally"))
        mux = self._mux
        if mux._conn.state is not ConnectionState.CLOSED:
            mux._conn.reset_stream(self.stream_id, code)
            mux._wake_writer()
        mux._forget(self)

    def close(self) -> None:
        """Release the stream once its exchange is over.

        A stream whose both directions ended is simply forgotten. If only our direction ended (a complete
        response to a request whose body we did not read), the rest of the peer's body is refused with
        RESET(NO_ERROR) once our last frame is out, as HTTP/2 does. Anything else is abandoned: RESET(CANCEL).
        """
        if self.closed:
            return
        mux = self._mux
        conn = mux._conn
        if self._error is None and conn.state is not ConnectionState.CLOSED:
            state = conn.stream_state(self.stream_id)
            if state is StreamState.CLOSED:
                unacknowledged = conn.received_unacknowledged(self.stream_id)
                if unacknowledged:
                    conn.acknowledge_received_data(self.stream_id, unacknowledged)
                    mux._wake_writer()
            elif self._sent_end:
                mux._reset_after_flush.append(self.stream_id)
                unacknowledged = conn.received_unacknowledged(self.stream_id)
                if unacknowledged:
                    conn.acknowledge_received_data(self.stream_id, unacknowledged)
                mux._wake_writer()
            else:
                self.reset(ErrorCode.CANCEL)
                return
        self._chunks.clear()
        mux._forget(self)

    # -- internals ---------------------------------------------------------------------------------

    def _check_alive(self) -> None:
        if self._error is not None:
            raise self._error

    async def _wait_readable(self) -> None:
        self._readable = trio.Event()
        await self._readable.wait()

    def _fail(self, error: StreamReset) -> None:
        if self._error is None:
            self._error = error
        self._readable.set()
        self._writable.set()
        for scope in self._cancel_on_fail:
            scope.cancel()
        self._cancel_on_fail.clear()


class Multiplexer:
    """Runs one protocol connection over one transport until it ends."""

    def __init__(
        self,
        transport: TransportLike,
        role: Role,
        *,
        handler: Callable[[MuxStream], Awaitable[None]] | None = None,
        settings: Settings | None = None,
        limits: Limits | None = None,
        ping_interval: float = 5.0,
        dead_timeout: float = 20.0,
        handshake_timeout: float = 10.0,
        stall_timeout: float | None = 60.0,
        name: str = "",
    ) -> None:
        self._transport = transport
        self._conn = Connection(role, settings, limits)
        self._handler = handler
        self._streams: dict[int, MuxStream] = {}
        self._blocked_writers: set[MuxStream] = set()
        self._buffered_total = 0  # received and not yet consumed, over all streams
        # Streams to reset with NO_ERROR once our END_STREAM on them has been written (see MuxStream.close).
        self._reset_after_flush: list[int] = []
        self._writer_wakeup = trio.Event()
        # The writer task is sending (or about to), or _send_now is running: frames go through it then.
        self._writer_busy = False
        self._direct = transport if isinstance(transport, DirectTransport) else None
        self._held_open_id = 0  # highest OPEN in a message whose tail the transport still holds
        self._ready = trio.Event()
        self._stream_slot = trio.Event()
        self._closed = False
        self.close_reason = ""
        self.ping_interval = ping_interval
        self.dead_timeout = dead_timeout
        self.handshake_timeout = handshake_timeout
        self.stall_timeout = stall_timeout  # None: never reap stalled streams
        self.name = name
        self._last_received = trio.current_time()
        self._send_started: float | None = None
        self._ping_ids = itertools.count(1)
        self._pings_sent: dict[bytes, float] = {}
        self.rtt: float | None = None
        self.send_stalls = 0  # send_data calls that had to wait for flow-control room (metrics)
        self._confirmed_open_id = 0
        self.goaway_received = False
        self.on_goaway: Callable[[], None] | None = None
        self._nursery: trio.Nursery | None = None
        self._cancel_scope: trio.CancelScope | None = None
        self._failure: BaseException | None = None
        if isinstance(transport, PingingTransport):
            # Its pings cost a pong like ours: a peer must not get unlimited ones by pinging one layer down.
            transport.on_ping = self._transport_pinged

    # -- public ------------------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        """Exchanges not yet finished on this connection (for least-loaded routing)."""
        return len(self._streams)

    @property
    def buffered_bytes(self) -> int:
        """Stream data held in memory for this connection: received and not yet consumed, plus handed to
        send_data and not yet framed (the relay's memory budget sums this over its agents)."""
        # Both are running totals: this is asked for on every new exchange, with thousands of streams open.
        return self._buffered_total + self._conn.outbound_total

    @property
    def accepting_streams(self) -> bool:
        return not self._closed and not self.goaway_received and self._conn.can_open_stream

    @property
    def is_closed(self) -> bool:
        return self._closed

    async def wait_ready(self) -> None:
        await self._ready.wait()

    async def open_stream(self, head: RequestHead, *, end_stream: bool = False) -> MuxStream:
        """Open a stream carrying `head`; waits while the peer's concurrent-stream limit is reached.

        MuxClosed: the connection is closed or draining, never to take a stream again. HeadNotEncodable
        (protocol's): this head cannot go over this connection; the connection itself is fine."""
        while True:
            if self._closed or self.goaway_received:
                raise MuxClosed(self.close_reason or "connection is draining")
            if self._conn.can_open_stream:
                break
            await self._wait_stream_slot()
        stream_id = self._conn.open_stream(head, end_stream=end_stream)
        stream = MuxStream(self, stream_id, None)
        self._streams[stream_id] = stream
        self._wake_writer()
        return stream

    def goaway(self, error_code: ErrorCode = ErrorCode.NO_ERROR, debug: bytes = b"") -> None:
        """Start a graceful drain: the peer opens nothing new here; streams in progress go on."""
        if self._conn.state is ConnectionState.CLOSED:
            return
        self._conn.goaway(error_code, debug)
        self._wake_writer()

    async def wait_idle(self) -> None:
        """Wait until no stream is left (used by graceful drain, under the caller's timeout)."""
        while self._streams and not self._closed:
            await self._wait_stream_slot()

    async def _wait_stream_slot(self) -> None:
        # Every waiter shares the current event: replacing one that is not set yet would orphan the tasks
        # already waiting on it (with 300 requests queued on 256 slots, all but the last one stalled).
        if self._stream_slot.is_set():
            self._stream_slot = trio.Event()
        await self._stream_slot.wait()

    def abort(self, reason: str) -> None:
        """End the connection now (every stream fails)."""
        self.close_reason = self.close_reason or reason
        if self._cancel_scope is not None:
            self._cancel_scope.cancel()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until the connection ends; `task_status.started()` once the peer's HELLO arrived.

        Returns when `abort` was called; raises LinkDead (silent peer, stuck send, no HELLO),
        RemoteProtocolError (the peer broke the protocol) or TransportClosed (the link went away).
        """
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._cancel_scope = nursery.cancel_scope
                nursery.start_soon(self._guard, self._reader)
                nursery.start_soon(self._guard, self._writer)
                self._wake_writer()
                with trio.move_on_after(self.handshake_timeout):
                    await self._ready.wait()
                if not self._ready.is_set() or self._failure is not None:
                    if self._failure is None:
                        self._failure = LinkDead("no HELLO from the peer in time")
                    nursery.cancel_scope.cancel()
                else:
                    nursery.start_soon(self._guard, self._heartbeat)
                    task_status.started()
        finally:
            self._shut_down()
        if self._failure is not None:
            raise self._failure

    async def _guard(self, task: Callable[[], Awaitable[None]]) -> None:
        """Turn the ways a connection ends into one recorded failure that cancels its siblings, so `run`
        raises one plain exception instead of an ExceptionGroup."""
        try:
            await task()
        except (LinkDead, RemoteProtocolError, TransportClosed) as exc:
            if self._failure is None:
                self._failure = exc
                self.close_reason = self.close_reason or str(exc) or type(exc).__name__
            assert self._cancel_scope is not None
            self._cancel_scope.cancel()

    # -- tasks -------------------------------------------------------------------------------------

    def _transport_pinged(self) -> None:
        if not self._closed:
            self._conn.receive_transport_ping(trio.current_time())  # RemoteProtocolError ends receive()

    async def _reader(self) -> None:
        conn = self._conn
        streams = self._streams
        while True:
            try:
                message = await self._transport.receive()
                now = trio.current_time()
                self._last_received = now
                events = conn.receive_data(message, now)
            except TextMessage as exc:
                raise await self._connection_error(conn.fail(exc.reason)) from None
            except RemoteProtocolError as exc:
                await self._connection_error(exc)
                raise
            for event in events:
                if type(event) is DataReceived:
                    stream = streams.get(event.stream_id)
                    if stream is None:
                        conn.acknowledge_received_data(event.stream_id, len(event.data))
                        continue
                    stream._chunks.append(event.data)
                    stream._buffered += len(event.data)
                    self._buffered_total += len(event.data)
                    stream._readable.set()
                else:
                    self._dispatch(event)
            if conn.has_data_to_send:
                self._wake_writer()

    def _dispatch(self, event: object) -> None:
        streams = self._streams
        if isinstance(event, StreamEnded):
            stream = streams.get(event.stream_id)
            if stream is not None:
                stream._ended = True
                stream._readable.set()
        elif isinstance(event, ReplyReceived):
            stream = streams.get(event.stream_id)
            if stream is not None:
                if len(stream._replies) >= MAX_PENDING_REPLIES:
                    # Interim heads are not flow-controlled: a peer must not pile them up without limit.
                    stream.reset(ErrorCode.ENHANCE_YOUR_CALM)
                    return
                stream._replies.append(event.head)
                stream._readable.set()
        elif isinstance(event, StreamOpened):
            self._on_stream_opened(event)
        elif isinstance(event, TrailersReceived):
            stream = streams.get(event.stream_id)
            if stream is not None:
                stream.trailers = event.headers
        elif isinstance(event, StreamResetEvent):
            stream = streams.pop(event.stream_id, None)
            if stream is not None:
                retryable = event.error_code is ErrorCode.REFUSED_STREAM and event.remote
                stream._fail(StreamReset(event.error_code, remote=event.remote, retryable=retryable))
                self._stream_slot.set()
        elif isinstance(event, PingAcknowledged):
            sent = self._pings_sent.pop(event.data, None)
            if sent is not None:
                self.rtt = trio.current_time() - sent
        elif isinstance(event, GoAwayReceived):
            self.goaway_received = True
            log.info(
                "%s: peer sent GOAWAY (%s, last stream %d)",
                self.name or "connection",
                event.error_code.name,
                event.last_stream_id,
            )
            if self.on_goaway is not None:
                self.on_goaway()
            self._stream_slot.set()
        elif isinstance(event, HandshakeComplete):
            self._ready.set()
        elif isinstance(event, WindowUpdated):
            # Any credit is progress: restart the stall clock of the stream(s) it can unblock.
            if event.stream_id == 0:
                for stream in streams.values():
                    stream._stalled_since = None
            elif (stream := streams.get(event.stream_id)) is not None:
                stream._stalled_since = None
        # PingReceived needs nothing beyond waking the writer, done by the reader.

    def _on_stream_opened(self, event: StreamOpened) -> None:
        stream = MuxStream(self, event.stream_id, event.head)
        if self._handler is None or self._nursery is None:
            self._conn.reset_stream(event.stream_id, ErrorCode.REFUSED_STREAM)
            return
        self._streams[event.stream_id] = stream
        self._nursery.start_soon(self._run_handler, self._handler, stream)

    async def _run_handler(self, handler: Callable[[MuxStream], Awaitable[None]], stream: MuxStream) -> None:
        try:
            await handler(stream)
        except StreamReset:
            pass
        except Exception:
            # A bug in one exchange must not take the other exchanges on this link down with it.
            log.exception("stream %d: handler failed", stream.stream_id)
            stream.reset(ErrorCode.INTERNAL_ERROR)
        finally:
            stream.close()

    async def _writer(self) -> None:
        """Sends what the streams' own tasks could not write at once (see _wake_writer)."""
        conn = self._conn
        send = self._transport.send
        direct = self._direct
        while True:
            await self._writer_wakeup.wait()
            self._writer_wakeup = trio.Event()
            self._writer_busy = True
            try:
                if direct is not None and direct.send_pending:
                    self._send_started = trio.current_time()
                    await direct.flush()
                    self._send_started = None
                    self._sent(self._held_open_id)
                while True:
                    data = conn.data_to_send(MAX_MESSAGE)
                    if not data:
                        break
                    opened = conn.highest_emitted_local_stream_id
                    self._send_started = trio.current_time()
                    await send(data)
                    self._send_started = None
                    self._sent(opened)
            finally:
                self._writer_busy = False

    async def _heartbeat(self) -> None:
        interval = min(self.ping_interval, self.dead_timeout / 4)
        if self.stall_timeout is not None:
            interval = min(interval, self.stall_timeout / 4)
        while True:
            await trio.sleep(interval)
            now = trio.current_time()
            silent = now - self._last_received
            if silent >= self.dead_timeout:
                self.close_reason = f"no data from the peer for {silent:.1f} s"
                raise LinkDead(self.close_reason)
            started = self._send_started
            if started is not None and now - started >= self.dead_timeout:
                self.close_reason = f"a send has been stuck for {now - started:.1f} s"
                raise LinkDead(self.close_reason)
            if silent >= self.ping_interval and self._conn.state is ConnectionState.OPEN:
                opaque = _PING.pack(next(self._ping_ids))
                if len(self._pings_sent) > 16:
                    self._pings_sent.clear()  # unanswered pings: RTT is moot, don't grow
                self._pings_sent[opaque] = now
                self._conn.ping(opaque)
                self._wake_writer()
            if self.stall_timeout is not None:
                self._reap_stalled(now, self.stall_timeout)

    def _reap_stalled(self, now: float, timeout: float) -> None:
        """Reset streams whose queued data found no window since `timeout` (checked at heartbeat pace)."""
        conn = self._conn
        for stream in list(self._streams.values()):
            stream_id = stream.stream_id
            waiting = stream._error is None and conn.outbound_buffered(stream_id) > 0
            if not waiting or conn.send_window(stream_id):
                stream._stalled_since = None
            elif stream._stalled_since is None:
                stream._stalled_since = now
            elif now - stream._stalled_since >= timeout:
                log.warning(
                    "%s: stream %d reset: the peer granted no window for %.0f s",
                    self.name or "connection",
                    stream_id,
                    now - stream._stalled_since,
                )
                stream.reset(ErrorCode.CANCEL)

    # -- helpers -----------------------------------------------------------------------------------

    def _wake_writer(self) -> None:
        """Put what the core has pending on the wire.

        With one exchange on the link (requests one at a time) the calling task writes it itself (_send_now):
        waking the writer task would cost a scheduler pass on each end of every exchange. With more, the writer
        task sends: it runs after every task of the current batch, so the frames of many exchanges go out in
        one message and one write (writing each exchange's frames at once doubled the writes per request and
        shrank the peer's batches: 1.2 instead of 0.2 epoll waits per request at -c64). The writer task also
        takes over whenever a write would wait, so no stream's task ever waits for the socket."""
        if self._writer_busy or self._writer_wakeup.is_set() or not self._conn.has_data_to_send:
            return  # the writer (or _send_now up the stack) will see it; or there is nothing to send
        direct = self._direct
        if direct is not None and len(self._streams) <= 1 and direct.can_send_nowait:
            self._send_now(direct)
            if not direct.send_pending and not self._conn.has_data_to_send:
                return
        self._writer_wakeup.set()

    def _send_now(self, direct: DirectTransport) -> None:
        conn = self._conn
        self._writer_busy = True
        try:
            while direct.can_send_nowait:
                data = conn.data_to_send(MAX_MESSAGE)
                if not data:
                    return
                opened = conn.highest_emitted_local_stream_id
                direct.send_nowait(data)
                if direct.send_pending:  # the kernel took part of it: the writer task writes the rest
                    self._held_open_id = opened
                    return
                self._sent(opened)
        finally:
            self._writer_busy = False

    def _sent(self, opened: int) -> None:
        """A message is out whole: the peer may have processed the streams it opened; writers may go on."""
        self._confirmed_open_id = opened
        if self._blocked_writers:
            self._release_writers()
        if self._reset_after_flush:
            self._reset_flushed()

    def _release_writers(self) -> None:
        conn = self._conn
        released = [s for s in self._blocked_writers if conn.outbound_buffered(s.stream_id) < SEND_HIGH_WATER]
        for stream in released:
            self._blocked_writers.discard(stream)
            stream._writable.set()

    def _reset_flushed(self) -> None:
        conn = self._conn
        still_waiting = []
        for stream_id in self._reset_after_flush:
            state = conn.stream_state(stream_id)
            if state is StreamState.HALF_CLOSED_LOCAL:
                conn.reset_stream(stream_id, ErrorCode.NO_ERROR)
                self._wake_writer()
            elif state is not StreamState.CLOSED:
                still_waiting.append(stream_id)
        self._reset_after_flush = still_waiting

    def _forget(self, stream: MuxStream) -> None:
        if not stream.closed:
            self._buffered_total -= stream._buffered
        stream.closed = True
        self._blocked_writers.discard(stream)
        if self._streams.pop(stream.stream_id, None) is not None:
            self._stream_slot.set()

    async def _connection_error(self, exc: RemoteProtocolError) -> RemoteProtocolError:
        """The peer broke the protocol: send the GOAWAY the core queued for it (best effort, SPEC 10)."""
        self.close_reason = f"peer broke the protocol: {exc}"
        log.warning("%s: %s", self.name or "connection", self.close_reason)
        data = self._conn.data_to_send(MAX_MESSAGE)
        if data:
            with trio.move_on_after(1):
                await self._transport.send(data)
        return exc

    def _shut_down(self) -> None:
        self._closed = True
        self.close_reason = self.close_reason or "connection closed"
        unsent = self._confirmed_open_id
        for stream in list(self._streams.values()):
            # A stream we opened whose OPEN never left in a completed send cannot have been processed.
            never_written = stream.request_head is None and stream.stream_id > unsent
            stream._fail(
                StreamReset(ErrorCode.CANCEL, remote=False, retryable=never_written, reason=self.close_reason)
            )
            stream.closed = True
        self._streams.clear()
        self._buffered_total = 0
        self._blocked_writers.clear()
        self._ready.set()
        self._stream_slot.set()
