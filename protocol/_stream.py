"""Per-stream state (SPEC.md section 7).

Each stream has two sides: ours (what we send, a `Side`) and the peer's (what we receive, a `Recv`); the
transitions between their states are the tables in _state.py. RESET removes the stream outright, so there is
no "reset" state: a stream absent from the table is closed (or idle), which its id tells.
"""

from __future__ import annotations

import enum
from collections import deque

from ._credit import Windows
from ._state import ENDED, Recv, Side


class StreamState(enum.Enum):
    """The HTTP/2-style name of a stream's state, as seen by one endpoint."""

    IDLE = "idle"
    OPEN = "open"
    HALF_CLOSED_LOCAL = "half-closed (local)"
    HALF_CLOSED_REMOTE = "half-closed (remote)"
    CLOSED = "closed"


class Stream(Windows):
    __slots__ = (
        "active",
        "end_pending",
        "local_initiated",
        "outbound",
        "outbound_bytes",
        "queued",
        "recv",
        "recv_unacked",
        "send_side",
        "trailers_pending",
    )

    def __init__(self, stream_id: int, *, local_initiated: bool, send_window: int, recv_window: int) -> None:
        super().__init__(stream_id, send_window=send_window, recv_window=recv_window)
        self.local_initiated = local_initiated
        # The initiator's side carries the request (already OPEN once the OPEN frame exists); the responder's
        # side must start with a final REPLY.
        self.send_side = Side.OPEN if local_initiated else Side.AWAITING_REPLY
        self.recv = Recv.AWAITING_REPLY if local_initiated else Recv.REQUEST
        # Received, delivered, not yet acknowledged by the application: still counted against both windows.
        self.recv_unacked = 0
        self.outbound: deque[memoryview] = deque()
        self.outbound_bytes = 0
        self.end_pending = False
        self.trailers_pending: bytes | None = None
        # In the connection's round-robin queue of streams with something to send.
        self.queued = False
        # Counts toward MAX_CONCURRENT_STREAMS until both END_STREAMs have crossed.
        self.active = True

    @property
    def has_pending_output(self) -> bool:
        return self.outbound_bytes > 0 or self.end_pending

    def take_into(self, size: int, out: list[bytes | memoryview]) -> None:
        """Move the first `size` queued octets to `out` without copying: whole buffers as they are, a view of
        the part of one that a frame splits off (once per DATA frame, so no list of its own)."""
        outbound = self.outbound
        self.outbound_bytes -= size
        while size:
            head = outbound[0]
            if len(head) <= size:
                out.append(outbound.popleft())
                size -= len(head)
            else:
                out.append(head[:size])
                outbound[0] = head[size:]
                return

    def state(self) -> StreamState:
        send_closed = self.send_side is Side.CLOSED and not self.end_pending
        recv_closed = self.recv in ENDED
        if send_closed and recv_closed:
            return StreamState.CLOSED
        if send_closed:
            return StreamState.HALF_CLOSED_LOCAL
        if recv_closed:
            return StreamState.HALF_CLOSED_REMOTE
        return StreamState.OPEN
