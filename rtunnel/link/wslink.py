"""One established WebSocket link: whole binary messages in and out over a socket we own.

The handshakes are in wsclient.py (connect) and wsserver.py (serve); transport.py is the module the rest of
rtunnel imports. What they use of this one: the Transport they build (with the bytes read behind the
handshake) and `Transport.running` for the link's lifetime; the names all three share are in wsterms.py.
I/O design (one link = one socket):
- Reading: `receive()` itself is the reader (no reader task, no queue hop): it reads 64 KiB at a
  time under a read lock, cuts whole binary messages out of the reads (wsframes.IncomingFrames;
  every other frame goes to the protocol object) and hands them out. The mux has one task looping
  on receive() that never blocks on anything else, so pings and Close frames are seen.
- Writing: `send()` takes the send lock, builds the frame and writes it with a single send_all
  (wsframes.py says why we frame data ourselves). Control frames the reader produces (pong,
  Close reply) go to a small buffer that the next sender writes in front of its frame, or that one
  writer task per link writes under the same lock. So the reader never waits for the socket: with
  both ends writing and neither reading, waiting there would deadlock the link. Our mux pings at its
  own protocol level; WebSocket pings only come from third-party peers. Each one is reported to
  `on_ping` (the mux charges it to the protocol's PING budget), and a peer that pings faster than we
  can write loses the link.
- Writing without waiting: on plain TCP, `send_nowait()` writes a whole message from the caller's own
  task when no write is in progress; the part the kernel does not take at once is held and goes out
  first, through `flush()` (or the next send), so frames never interleave or get cut. Through TLS every
  write goes through the SSL object and trio's SSLStream, so it is always `send()`.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from typing import NoReturn

import trio
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import Side, State
from websockets.server import ServerProtocol

from ..net import fastsend
from .wsframes import IncomingFrames, OutgoingFrames
from .wsterms import (
    CLOSE_NORMAL,
    CLOSE_UNSUPPORTED_DATA,
    RECEIVE_SIZE,
    SocketOrTLS,
    TextMessage,
    TransportClosed,
    describe_close,
    describe_stream_error,
)

# Control frames (pongs) not yet written because a send is stuck. Each is at most 131 bytes; a
# peer that keeps pinging while not reading what we send is broken or hostile.
_MAX_PENDING_CONTROL = 64 * 1024

# --------------------------------------------------------------------------------------------
# Transport


async def _acquire(lock: trio.Lock | trio.StrictFIFOLock) -> None:
    """Take a lock; when it is free, without a scheduler pass. The socket call that follows is
    the checkpoint, so a small message costs one pass instead of two (~6 us each)."""
    try:
        lock.acquire_nowait()  # fails while others wait too, so FIFO order holds
    except trio.WouldBlock:
        await lock.acquire()


class Transport:
    """One established WebSocket carrying binary messages. Built by connect() and serve()."""

    def __init__(
        self,
        stream: SocketOrTLS,
        proto: ClientProtocol | ServerProtocol,
        remote: str,
        close_timeout: float,
        *,
        behind: bytes | bytearray = b"",
    ) -> None:
        """`proto` has completed its handshake, parsing no byte past its HTTP head; `behind`: the bytes read past
        it (wsframes.HeadEnd)."""
        self.remote = remote  # "host:port" of the peer, for logs
        # What the server's authenticate() returned for this link (e.g. the token group), None on clients.
        self.principal: object = None
        # Called for each WebSocket ping as it is read, before its pong is queued; an exception it raises
        # ends that receive() (the caller is failing the link: nothing else read with the ping counts).
        self.on_ping: Callable[[], None] | None = None
        self._stream = stream
        self._socket = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
        self._proto = proto
        self._close_timeout = close_timeout
        self._send_lock = trio.StrictFIFOLock()
        self._read_lock = trio.Lock()
        self._messages: collections.deque[bytes | bytearray] = collections.deque()
        self._fragments: list[bytes | bytearray | memoryview] | None = None  # a fragmented message
        self._control = bytearray()  # pongs / Close replies from the reader, not yet written
        self._outgoing = OutgoingFrames(masked=proto.side is Side.CLIENT)
        self._control_ready = trio.Event()
        self._text = False  # the peer sent a text message (a protocol violation for us)
        self._eof = False  # the peer closed its direction of the TCP connection
        self._error: str | None = None  # first socket failure
        self._end: str | None = None  # how the WebSocket ended, if the peer (or its data) ended it
        self._local_reason: str | None = None  # set once we close or abort
        self._aborted = False
        # send_nowait writes straight to a plain TCP socket (fastsend); through TLS every write is awaited.
        self._direct = type(stream) is trio.SocketStream and fastsend.DIRECT
        self._unsent: bytes | bytearray | memoryview | None = None  # a message's tail send_nowait left
        # The link takes a message itself only within the protocol object's limits (none set: it takes none).
        limits = [limit for limit in (proto.max_message_size, proto.max_fragment_size) if limit is not None]
        self._incoming = IncomingFrames(
            masked=proto.side is Side.SERVER,
            max_size=min(limits, default=-1),
            on_message=self._messages.append,
            fast_ok=self._fast_ok,
            to_protocol=self._to_protocol,
        )
        if behind:
            self._incoming.feed(behind)

    @property
    def closed(self) -> bool:
        """True once the link is unusable (closed, aborted, or its socket failed)."""
        return self._local_reason is not None or self._end is not None or self._error is not None

    async def send(self, message: bytes | bytearray | memoryview) -> None:
        """Send one binary message. Blocks until the kernel took it (backpressure).

        Cancelling a send that already started writing kills the link (the frame is cut)."""
        if self.closed:
            await trio.lowlevel.checkpoint()
            raise TransportClosed(self._reason())
        await trio.lowlevel.checkpoint_if_cancelled()  # before we own the lock, nothing is cut
        await _acquire(self._send_lock)
        try:
            proto = self._proto
            if self.closed or proto.state is not State.OPEN or not await self._send_unsent():
                raise TransportClosed(self._reason())
            data = self._outgoing.frame(message)
            if self._control:
                data = b"".join((self._control, data))
                self._control.clear()
            if not await self._send_all(data):
                raise TransportClosed(self._reason())
        finally:
            self._send_lock.release()

    @property
    def can_send_nowait(self) -> bool:
        """send_nowait would take a message now: a plain TCP link, open, with no write in progress or held."""
        return (
            self._direct
            and self._unsent is None
            and not self._send_lock.locked()
            and not self.closed
            and self._proto.state is State.OPEN
        )

    def send_nowait(self, message: bytes | bytearray | memoryview) -> None:
        """Write one binary message without waiting (only when `can_send_nowait`): what the kernel does not
        take at once is held, whole frames only, and written by `flush` before any other byte.

        Lets a stream's own task put its frames on the wire when the link is idle, instead of waking a
        writer task for it: a scheduler pass saved per message. Never a checkpoint, so never cancelled
        partway."""
        assert self.can_send_nowait
        data = self._outgoing.frame(message)
        if self._control:
            data = b"".join((self._control, data))
            self._control.clear()
        left = fastsend.send_nowait(self._stream, data)
        if left:
            # It may be a view of the framing buffer: nothing is framed again before it is out.
            self._unsent = left

    @property
    def send_pending(self) -> bool:
        """Bytes that send_nowait could not write at once wait for `flush`."""
        return self._unsent is not None

    async def flush(self) -> None:
        """Write what send_nowait held back; blocks like send. Raises TransportClosed if the link is gone."""
        await _acquire(self._send_lock)
        try:
            if not await self._send_unsent():
                raise TransportClosed(self._reason())
        finally:
            self._send_lock.release()

    async def receive(self) -> bytes | bytearray:
        """Next binary message (cancel-safe). Raises TransportClosed when the link is gone."""
        while True:
            if self._local_reason is not None:
                await trio.lowlevel.checkpoint()
                raise TransportClosed(self._local_reason)
            if self._messages:
                # Already parsed from an earlier read: still a checkpoint, as trio expects.
                await trio.lowlevel.checkpoint()
                if self._messages and self._local_reason is None:
                    return self._messages.popleft()
                continue
            if self._text:
                await trio.lowlevel.checkpoint()
                raise TextMessage("peer sent a text message (rtunnel.v1 uses binary messages only)")
            if self.closed:
                await trio.lowlevel.checkpoint()
                raise TransportClosed(self._reason())
            await _acquire(self._read_lock)
            try:
                if not (self._messages or self._text or self.closed):
                    await self._read()
                    # The read was this call's checkpoint: hand out what it brought at once (one pass per
                    # message read instead of two).
                    if self._messages and self._local_reason is None:
                        return self._messages.popleft()
            finally:
                self._read_lock.release()

    async def send_text(self, text: str) -> None:
        """Send a text message, which rtunnel.v1 forbids: only the conformance runner's scripted peers do."""
        async with self._send_lock:
            if self.closed or self._proto.state is not State.OPEN or not await self._send_unsent():
                raise TransportClosed(self._reason())
            self._proto.send_text(text.encode())
            if not await self._send_all(b"".join(self._proto.data_to_send())):
                raise TransportClosed(self._reason())

    @property
    def peer_close(self) -> tuple[int, str] | None:
        """Code and reason of the peer's Close frame; None while none arrived (or the TCP connection was just
        dropped, which a WebSocket API reports as 1006)."""
        received = self._proto.close_rcvd
        return None if received is None else (received.code, received.reason)

    async def aclose(self, code: int = CLOSE_NORMAL, reason: str = "") -> None:
        """Graceful close (Close handshake with `code`), bounded by close_timeout; idempotent (the first
        close decides the code). After a text message the code is always 1003."""
        await self._close(code, reason, "closed locally")

    def abort(self) -> None:
        """Close the socket now, without a Close frame (which could wait behind a stuck send)."""
        if self._local_reason is None:
            self._local_reason = "aborted locally"
        self._aborted = True
        self._close_now("aborted locally")

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Transport]:
        """Use the link in the block, its control-frame writer running meanwhile. Leaving the block normally
        closes the link gracefully (bounded by close_timeout); leaving it with an exception (or cancelled)
        aborts it first: the link may be stuck, and a Close would wait behind it. The block's exception
        comes out as it was raised, not in a group."""
        body_exc: BaseException | None = None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._write_control)
                try:
                    yield self
                except BaseException as exc:
                    body_exc = exc
                    self.abort()
                    raise
                finally:
                    await self.aclose()
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            others = [e for e in group.exceptions if e is not body_exc]
            if body_exc is not None and all(isinstance(e, trio.Cancelled) for e in others):
                _reraise(body_exc)
            raise
        finally:
            self.abort()  # no-op after aclose(); releases the socket on any other exit

    def __repr__(self) -> str:
        return f"<Transport remote={self.remote} closed={self.closed}>"

    # -- socket --------------------------------------------------------------------------------

    def _fail(self, reason: str) -> None:
        if self._error is None:
            self._error = reason

    def _close_now(self, reason: str) -> None:
        """Close the socket without any I/O; blocked senders and receivers wake with an error."""
        self._fail(reason)
        self._socket.socket.close()

    def _reason(self) -> str:
        if self._local_reason is not None:
            return self._local_reason
        if self._end is not None:
            return self._end
        return f"connection lost: {self._error or 'no WebSocket close'}"

    async def _send_unsent(self) -> bool:
        """Write the tail send_nowait held back (send lock held), before anything else; False if it failed."""
        unsent = self._unsent
        if unsent is None:
            return True
        ok = await self._send_all(unsent)
        self._unsent = None
        return ok

    async def _send_all(self, data: bytes | bytearray | memoryview) -> bool:
        """Write with the send lock held; False (reason recorded) if the socket failed."""
        try:
            await fastsend.send_all(self._stream, data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._fail(describe_stream_error(exc))
            return False
        except BaseException:
            # Cancelled (or worse) partway through a frame: the peer's parser would wait forever
            # for the rest of it, so the link cannot be used again.
            self._close_now("a send was interrupted partway")
            raise
        return True

    async def _read(self) -> None:
        """One read from the socket into the protocol (read lock held)."""
        try:
            data = await self._stream.receive_some(RECEIVE_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._fail(describe_stream_error(exc))
            return
        if data:
            self._incoming.feed(data)
        else:
            self._eof = True
            self._fail("peer closed the TCP connection")
            self._proto.receive_eof()
            self._handle(self._proto.events_received())

    def _fast_ok(self) -> bool:
        """A final binary frame would be a message of its own to the protocol object now (see wsframes)."""
        return self._proto.state is State.OPEN and self._proto.current_size is None and not self._text

    def _to_protocol(self, data: bytes) -> None:
        proto = self._proto
        proto.receive_data(data)
        self._handle(proto.events_received())

    # -- protocol events -------------------------------------------------------------------------

    def _handle(self, events: Sequence[Request | Response | Frame]) -> None:
        """Turn parsed frames into messages and queue what the protocol wants written."""
        messages = self._messages
        for frame in events:
            assert isinstance(frame, Frame)  # the handshake is over
            opcode = frame.opcode
            if opcode is Opcode.BINARY:
                if self._text:
                    continue  # the link is being closed; nothing after the text message counts
                if frame.fin:
                    data = frame.data
                    messages.append(data if type(data) is bytes else bytes(data))
                else:
                    self._fragments = [frame.data]
            elif opcode is Opcode.CONT:
                if self._fragments is not None:  # else: continuing a text message
                    self._fragments.append(frame.data)
                    if frame.fin:
                        if not self._text:
                            messages.append(b"".join(self._fragments))
                        self._fragments = None
            elif opcode is Opcode.TEXT:
                self._text = True
            elif opcode is Opcode.PING and self.on_ping is not None:
                self.on_ping()
            elif opcode is Opcode.CLOSE and self._end is None and self._proto.close_rcvd is not None:
                self._end = describe_close(self._proto.close_rcvd)
            # PING: the protocol queued the Pong already (written below unless on_ping raised); PONG: nothing.
        proto = self._proto
        if self._end is None and proto.parser_exc is not None and not isinstance(proto.parser_exc, EOFError):
            # Protocol violation or message over max_size: the protocol sent Close (1002/1009).
            sent = proto.close_sent
            self._end = describe_close(sent) if sent is not None else f"protocol error: {proto.parser_exc}"
        writes = proto.data_to_send()
        if writes:
            for chunk in writes:
                # SEND_EOF (b"") asks us to close the TCP connection: aclose() does that.
                self._control += chunk
            if len(self._control) > _MAX_PENDING_CONTROL:
                self._close_now("peer sent control frames faster than we could write them")
            elif self._control:
                self._control_ready.set()

    async def _write_control(self) -> None:
        """Background task (one per link): write what the reader queued, so it never waits."""
        while True:
            await self._control_ready.wait()
            self._control_ready = trio.Event()
            async with self._send_lock:
                if self._control and self._error is None:
                    if not await self._send_unsent():
                        return
                    data = bytes(self._control)
                    self._control.clear()
                    if not await self._send_all(data):
                        return

    # -- closing ---------------------------------------------------------------------------------

    async def _close(self, code: int, ws_reason: str, local_reason: str) -> None:
        if self._text:
            code, ws_reason = CLOSE_UNSUPPORTED_DATA, "binary messages only"
        if self._local_reason is None:
            self._local_reason = local_reason
        try:
            if not self._aborted and self._error is None:
                with trio.move_on_after(self._close_timeout):
                    await self._close_handshake(code, ws_reason)
        finally:
            self._close_now(self._error or "closed locally")

    async def _close_handshake(self, code: int, ws_reason: str) -> None:
        proto = self._proto
        async with self._send_lock:
            if proto.state is State.OPEN:
                proto.send_close(code, ws_reason)
            self._control += b"".join(proto.data_to_send())
            if self._control and self._error is None:
                if not await self._send_unsent():
                    return
                data = bytes(self._control)
                self._control.clear()
                if not await self._send_all(data):
                    return
        # Wait for the peer's Close. A server then closes the TCP connection at once; a client
        # waits for the server to do so (RFC 6455 7.1.1), so the TIME_WAIT lands on the server.
        async with self._read_lock:
            while not self._eof and self._error is None:
                if proto.close_rcvd is not None and (
                    proto.side is Side.SERVER or proto.state is State.CLOSED
                ):
                    return
                await self._read()


def _reraise(exc: BaseException) -> NoReturn:
    """Raise exc without chaining it to the group that is being handled (which contains it)."""
    context = exc.__context__
    try:
        raise exc
    finally:
        exc.__context__ = context
        del exc, context
