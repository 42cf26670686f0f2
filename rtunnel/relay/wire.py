"""The client's side of one relay connection as h11 sees it: bytes read and fed to h11 (in small slices where
a limit must trip early), the strict checks on each raw head, and writes (several h11 outputs in one).

It knows nothing of agents or exchanges: the connection loop (connection.py) reads heads through it, the
pumps (pumps.py) read bodies and write responses through it.
"""

from __future__ import annotations

import logging
import math

import h11
import trio

from ..http.bridge import READ_SIZE
from ..http.strict import HeadChecker
from ..net import fastsend

log = logging.getLogger("rtunnel.relay")

__all__ = ["FEED_SIZE", "MAX_CHUNK_LINE", "ClientGone", "ClientWire"]

# The client's bytes are handed to h11 in slices of at most this size while a head or a chunk-size line is
# being read, so that h11's incomplete-event limit (and ours on chunk lines) trips within one slice of the
# limit instead of after a whole 64 KiB read.
FEED_SIZE = 4096
# A chunk-size line (size + chunk extensions) or trailer section longer than this is refused with 400
# (RFC 9112 7.1.1: a server ought to limit chunk extensions). Extensions are never forwarded anyway.
MAX_CHUNK_LINE = 8192

# Held between reads, so that an exchange in progress (a held long poll) keeps neither the bytes its request
# arrived in (a memoryview's slice, even empty, keeps them) nor the checker of its judged head.
_NOTHING = memoryview(b"")
_JUDGED = HeadChecker()
_JUDGED.complete = True  # takes no more bytes (a fresh checker is made for each head)


class ClientGone(Exception):
    """The client closed or broke its connection."""


class ClientWire:
    """One client connection's bytes and its h11 state machine (server role)."""

    # Slots: one of these lives as long as its connection, a held long poll's too.
    __slots__ = ("_head_checker", "_send_timeout", "_unfed", "chunked", "h11", "stream")

    def __init__(self, stream: trio.abc.Stream, max_head_size: int, send_timeout: float = math.inf) -> None:
        self.stream = stream
        self._send_timeout = send_timeout  # for one write the client does not take (HttpLimits.send_timeout)
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=max_head_size)
        self._unfed = _NOTHING  # read from the client, not yet given to h11 (see FEED_SIZE)
        self.chunked = False  # the current request's body is chunked
        self._head_checker = HeadChecker()  # strict checks on the raw head being received (http/strict.py)

    # -- reading -----------------------------------------------------------------------------------

    async def receive_more(self) -> None:
        if not self._unfed:
            try:
                data = await self.stream.receive_some(READ_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                raise ClientGone from None
            if not data:
                raise ClientGone  # a client that closes before its exchange is done has abandoned it
            self._unfed = memoryview(data)
        state = self.h11.their_state
        careful = state is h11.IDLE or (state is h11.SEND_BODY and self.chunked)
        size = FEED_SIZE if careful else len(self._unfed)
        piece = bytes(self._unfed[:size])
        self._unfed = self._unfed[size:] if size < len(self._unfed) else _NOTHING
        if state is h11.IDLE:
            self._head_checker.feed(piece)
        self.h11.receive_data(piece)

    async def next_event(self) -> h11.Event | type[h11.PAUSED]:
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                if (
                    self.chunked
                    and self.h11.their_state is h11.SEND_BODY
                    and len(self.h11.trailing_data[0]) > MAX_CHUNK_LINE
                ):
                    # Waiting in a chunked body with this much unparsed means one endless chunk-size line
                    # (extensions) or trailer section: data chunks are taken out as they arrive.
                    raise h11.RemoteProtocolError("chunk-size line or trailers too long", 400)
                await self.receive_more()
                continue
            return event  # type: ignore[return-value]

    def has_pending_input(self) -> bool:
        return bool(self._unfed) or bool(self.h11.trailing_data[0])

    def buffered(self) -> int:
        """Bytes given to h11 and not parsed yet (pipelined behind the request in progress)."""
        return len(self.h11.trailing_data[0])

    def begin_head(self) -> None:
        """Get ready for the next request head (a pipelined one may already be here)."""
        self.chunked = False
        self._head_checker = HeadChecker()
        self._head_checker.feed(self.h11.trailing_data[0])

    def head_judged(self) -> None:
        """The head is parsed and checked: its checker is no longer needed."""
        self._head_checker = _JUDGED

    def head_event_nowait(self) -> h11.Event | type[h11.PAUSED] | type[h11.NEED_DATA]:
        """What h11 makes of the head received so far (after the strict checks), without waiting."""
        problem = self._head_checker.problem
        if problem is not None:
            raise h11.RemoteProtocolError(problem[1], problem[0])
        return self.h11.next_event()

    async def next_head_event(self) -> h11.Event | type[h11.PAUSED]:
        """Like next_event, with the strict raw-head checks (http/strict.py) run before h11 parses the head."""
        while True:
            problem = self._head_checker.problem
            if problem is not None:
                raise h11.RemoteProtocolError(problem[1], problem[0])
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                await self.receive_more()
                continue
            return event  # type: ignore[return-value]

    def take_unparsed(self) -> bytes:
        """After a protocol switch: the bytes behind the request head, which belong to the new protocol (h11
        holds those it was given, the rest were read but not given to it yet)."""
        data, _ = self.h11.trailing_data
        initial = data + bytes(self._unfed)
        self._unfed = _NOTHING
        return initial

    # -- writing -----------------------------------------------------------------------------------

    async def send(self, event: h11.Event) -> None:
        data = self.h11.send(event)
        if data:
            await self.send_bytes([data])

    async def send_bytes(self, pieces: list[bytes | None]) -> None:
        data = (
            b"".join(piece for piece in pieces if piece) if len(pieces) > 1 else pieces[0] if pieces else None
        )
        if not data:
            return
        left = fastsend.send_nowait(self.stream, data)
        if not left:
            return  # the kernel took it all: no deadline needed, and no checkpoint
        try:
            # The deadline lives only in the slow path: it is the client's reading that stopped, which no
            # stream reset or flow-control timeout on the tunnel side would ever interrupt.
            with trio.move_on_after(self._send_timeout):
                await fastsend.send_rest(self.stream, left)
                return
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            raise ClientGone from None
        log.info("client took no response bytes for %g s: connection dropped", self._send_timeout)
        raise ClientGone

    def start_next_cycle(self) -> bool:
        conn = self.h11
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            try:
                conn.start_next_cycle()
            except h11.LocalProtocolError:
                return False
            return True
        return False
