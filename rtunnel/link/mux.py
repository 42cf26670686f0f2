"""The stream multiplexer: drives one `protocol.Connection` over one WebSocket transport.

Three tasks per connection, all in a nursery `Multiplexer.run` owns:
- the reader turns each WebSocket message into events and files them into per-stream buffers without ever
  awaiting, so a slow consumer can never stall the link (the buffers are bounded by the flow-control windows,
  since the core credits only what the application consumed);
- the writer drains everything the core has pending into one WebSocket message per send (a message costs
  far more than a frame). With a single exchange on the link, and a plain TCP link with nothing queued, the
  exchange's own task writes its frames instead (see wake_writer): a scheduler pass less on each end per
  message. The writer takes over whatever the kernel did not take at once;
- the heartbeat (link/heartbeat.py) pings an idle link and declares the peer dead when nothing at all has
  arrived for `dead_timeout`, or when one send has been stuck that long. It also reaps stalled streams: one
  with data queued whose peer granted no window for `stall_timeout` is reset with CANCEL, so a peer that never
  reads (or lies about its windows) cannot pin a stream forever.
Streams the peer opens are handed to `handler`, each in its own task in the same nursery. A stream (MuxStream,
link/stream.py) counts in `in_flight` until its owner releases it, even after a RESET.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

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

from .heartbeat import Heartbeat, LinkDead
from .muxlink import DirectTransport, MuxClosed, PingingTransport, TransportLike, close_code
from .stream import SEND_HIGH_WATER, MuxStream, StreamReset
from .transport import (
    TextMessage,
    TransportClosed,
)

__all__ = [
    "MAX_MESSAGE",
    "SEND_HIGH_WATER",
    "DirectTransport",
    "LinkDead",
    "Multiplexer",
    "MuxClosed",
    "MuxStream",
    "PingingTransport",
    "StreamReset",
    "TransportLike",
    "close_code",
]

log = logging.getLogger("rtunnel.mux")

# One WebSocket message carries at most this much: large enough to amortise the per-message cost, small
# enough that a small exchange queued behind bulk data waits at most one message.
MAX_MESSAGE = 256 * 1024


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
        self.handshake_timeout = handshake_timeout
        self.name = name
        self._beat = Heartbeat(ping_interval, dead_timeout, stall_timeout)
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
        """Exchanges not yet finished on this connection (least-loaded routing, metrics, the drain): a stream
        counts until its owner releases it, also after a RESET either way, since its task still runs."""
        return len(self._streams)

    @property
    def rtt(self) -> float | None:
        """The round-trip time of the last ping answered, None before the first."""
        return self._beat.rtt

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
        stream = MuxStream(self, self._conn, stream_id, None)
        self._streams[stream_id] = stream
        self.wake_writer()
        return stream

    def goaway(self, error_code: ErrorCode = ErrorCode.NO_ERROR, debug: bytes = b"") -> None:
        """Start a graceful drain: the peer opens nothing new here; streams in progress go on."""
        if self._conn.state is ConnectionState.CLOSED:
            return
        self._conn.goaway(error_code, debug)
        self.wake_writer()

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
                self.wake_writer()
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
        beat = self._beat
        while True:
            try:
                message = await self._transport.receive()
                now = trio.current_time()
                beat.last_received = now
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
                    stream.data_received(event.data)
                    self._buffered_total += len(event.data)
                else:
                    self._dispatch(event)
            if conn.has_data_to_send:
                self.wake_writer()

    def _dispatch(self, event: object) -> None:
        streams = self._streams
        if isinstance(event, StreamEnded):
            stream = streams.get(event.stream_id)
            if stream is not None:
                stream.end_received()
        elif isinstance(event, ReplyReceived):
            stream = streams.get(event.stream_id)
            if stream is not None and not stream.reply_received(event.head):
                # Interim heads are not flow-controlled: a peer must not pile them up without limit.
                stream.abort(ErrorCode.ENHANCE_YOUR_CALM)
        elif isinstance(event, StreamOpened):
            self._on_stream_opened(event)
        elif isinstance(event, TrailersReceived):
            stream = streams.get(event.stream_id)
            if stream is not None:
                stream.trailers_received(event.headers)
        elif isinstance(event, StreamResetEvent):
            # The stream stays until its owner releases it: its task is still finishing the exchange.
            stream = streams.get(event.stream_id)
            if stream is not None:
                retryable = event.error_code is ErrorCode.REFUSED_STREAM and event.remote
                stream.fail(StreamReset(event.error_code, remote=event.remote, retryable=retryable))
                self._stream_slot.set()  # the core's slot is free: open_stream may go on
        elif isinstance(event, PingAcknowledged):
            self._beat.acknowledged(event.data)
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
                    stream.window_granted()
            elif (stream := streams.get(event.stream_id)) is not None:
                stream.window_granted()
        # PingReceived needs nothing beyond waking the writer, done by the reader.

    def _on_stream_opened(self, event: StreamOpened) -> None:
        stream = MuxStream(self, self._conn, event.stream_id, event.head)
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
        """Sends what the streams' own tasks could not write at once (see wake_writer)."""
        conn = self._conn
        send = self._transport.send
        direct = self._direct
        beat = self._beat
        while True:
            await self._writer_wakeup.wait()
            self._writer_wakeup = trio.Event()
            self._writer_busy = True
            try:
                if direct is not None and direct.send_pending:
                    beat.send_started = trio.current_time()
                    await direct.flush()
                    beat.send_started = None
                    self._sent(self._held_open_id)
                while True:
                    data = conn.data_to_send(MAX_MESSAGE)
                    if not data:
                        break
                    opened = conn.highest_emitted_local_stream_id
                    beat.send_started = trio.current_time()
                    await send(data)
                    beat.send_started = None
                    self._sent(opened)
            finally:
                self._writer_busy = False

    async def _heartbeat(self) -> None:
        try:
            await self._beat.run(self._ping, self._reap_stalled)
        except LinkDead as exc:
            self.close_reason = str(exc)
            raise

    def _ping(self, opaque: bytes) -> bool:
        if self._conn.state is not ConnectionState.OPEN:
            return False
        self._conn.ping(opaque)
        self.wake_writer()
        return True

    def _reap_stalled(self, now: float, timeout: float) -> None:
        """Reset streams whose queued data found no window since `timeout` (checked at heartbeat pace)."""
        for stream in list(self._streams.values()):
            stalled = stream.stalled_for(now)
            if stalled is not None and stalled >= timeout:
                log.warning(
                    "%s: stream %d reset: the peer granted no window for %.0f s",
                    self.name or "connection",
                    stream.stream_id,
                    stalled,
                )
                stream.abort(ErrorCode.CANCEL)  # its owner still releases it

    # -- stream side: what a MuxStream asks of its multiplexer (stream.StreamHost) -----------------

    def block_writer(self, stream: MuxStream, *, new_stall: bool) -> None:
        if new_stall:
            self.send_stalls += 1
        self._blocked_writers.add(stream)

    def consumed(self, size: int) -> None:
        self._buffered_total -= size

    def reset_after_flush(self, stream_id: int) -> None:
        self._reset_after_flush.append(stream_id)

    def release(self, stream: MuxStream, buffered: int) -> None:
        self._buffered_total -= buffered
        self._blocked_writers.discard(stream)
        if self._streams.pop(stream.stream_id, None) is not None:
            self._stream_slot.set()

    # -- helpers -----------------------------------------------------------------------------------

    def wake_writer(self) -> None:
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
            stream.room_made()

    def _reset_flushed(self) -> None:
        conn = self._conn
        still_waiting = []
        for stream_id in self._reset_after_flush:
            state = conn.stream_state(stream_id)
            if state is StreamState.HALF_CLOSED_LOCAL:
                conn.reset_stream(stream_id, ErrorCode.NO_ERROR)
                self.wake_writer()
            elif state is not StreamState.CLOSED:
                still_waiting.append(stream_id)
        self._reset_after_flush = still_waiting

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
            stream.lost(
                StreamReset(ErrorCode.CANCEL, remote=False, retryable=never_written, reason=self.close_reason)
            )
        self._streams.clear()
        self._buffered_total = 0
        self._blocked_writers.clear()
        self._ready.set()
        self._stream_slot.set()
