"""Flow-control windows (SPEC.md section 8): one policy for a stream's windows and for the connection's.

`Windows` holds the counters (a `Stream` is one, the connection keeps one with stream id 0); `Credit` is the
policy a receiver applies to them: charge arriving DATA, credit what the application consumed back in batches
of half the window, and check the increments the peer grants. Sending charges its window inline in the output
loop (_connection.py), which is the hottest code of the core.
"""

from __future__ import annotations

from collections import deque

from ._errors import ErrorCode
from ._frames import encode_window_update
from ._settings import MAX_WINDOW


class Windows:
    """The flow-control counters of one stream, or of the connection (stream id 0)."""

    __slots__ = ("recv_consumed", "recv_window", "send_window", "stream_id")

    def __init__(self, stream_id: int, *, send_window: int, recv_window: int) -> None:
        self.stream_id = stream_id
        self.send_window = send_window  # DATA octets the peer lets us send
        self.recv_window = recv_window  # DATA octets we let the peer send
        # Consumed by the application but not yet credited back by a WINDOW_UPDATE (we batch).
        self.recv_consumed = 0


class Credit:
    """How a receiver credits one kind of window: a stream's, or the connection's.

    WINDOW_UPDATE goes out once the consumed-but-not-credited amount reaches half the initial window, or, for
    the connection (`refill_below` = our MAX_FRAME_SIZE), as soon as the peer has less than one frame of window
    left: a stalled stream may hold most of the connection window, and then what its siblings consumed is all
    the peer can ever get back. Waiting until less than one frame is left keeps that batched too.
    """

    __slots__ = ("_control", "_low_water", "_threshold")

    def __init__(self, initial_window: int, control: deque[bytes], *, refill_below: int = 0) -> None:
        self._threshold = max(1, initial_window // 2)
        self._low_water = min(self._threshold, refill_below)
        self._control = control  # the connection's queue of control frames, where WINDOW_UPDATEs go

    def receive(self, windows: Windows, size: int) -> bool:
        """Charge `size` arriving DATA octets; False (and nothing charged) if they exceed the window."""
        window = windows.recv_window - size
        if window < 0:
            return False
        windows.recv_window = window
        if windows.recv_consumed and window < self._low_water:
            self._refill(windows, windows.recv_consumed)  # held back for batching; the peer needs it now
        return True

    def consume(self, windows: Windows, size: int) -> None:
        """The application consumed `size` octets: credit them back now or batch them."""
        consumed = windows.recv_consumed + size
        if consumed >= self._threshold or (consumed and windows.recv_window < self._low_water):
            self._refill(windows, consumed)
        else:
            windows.recv_consumed = consumed

    def _refill(self, windows: Windows, increment: int) -> None:
        self._control.append(encode_window_update(windows.stream_id, increment))
        windows.recv_window += increment
        windows.recv_consumed = 0

    @staticmethod
    def grant(windows: Windows, increment: int) -> ErrorCode | None:
        """Apply the peer's WINDOW_UPDATE to the send window, or return the error it is (SPEC 4.6)."""
        if increment == 0:
            return ErrorCode.PROTOCOL_ERROR
        window = windows.send_window + increment
        if window > MAX_WINDOW:
            return ErrorCode.FLOW_CONTROL_ERROR
        windows.send_window = window
        return None
