"""Dead-link detection for one multiplexed connection: the clocks, the pings, the round-trip time.

The heartbeat never waits behind data: it only reads clocks the multiplexer's reader and writer set (the last
message received, the start of a send still in progress). It pings an idle link and declares the peer dead when
nothing at all has arrived for `dead_timeout`, or when one send has been stuck that long. At the same pace it
has the multiplexer reap stalled streams (see Multiplexer._reap_stalled).
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Callable

import trio

_PING = struct.Struct(">Q")
# Unanswered pings kept for the round-trip time: past this many, the RTT is moot anyway.
_MAX_PINGS_OUT = 16


class LinkDead(Exception):
    """Nothing arrived from the peer for too long, or a send was stuck too long."""


class Heartbeat:
    def __init__(self, ping_interval: float, dead_timeout: float, stall_timeout: float | None) -> None:
        self.ping_interval = ping_interval
        self.dead_timeout = dead_timeout
        self.stall_timeout = stall_timeout  # None: never reap stalled streams
        self.last_received = trio.current_time()  # set by the reader for every message
        self.send_started: float | None = None  # set by the writer while a send is in progress
        self.rtt: float | None = None
        self._ping_ids = itertools.count(1)
        self._pings_sent: dict[bytes, float] = {}

    def acknowledged(self, opaque: bytes) -> None:
        """The peer answered one of our pings."""
        sent = self._pings_sent.pop(opaque, None)
        if sent is not None:
            self.rtt = trio.current_time() - sent

    async def run(self, ping: Callable[[bytes], bool], reap: Callable[[float, float], None]) -> None:
        """Until the link is dead (raises LinkDead). `ping(opaque)` sends a ping if the connection is open
        (returns whether it did); `reap(now, stall_timeout)` resets the streams stalled that long."""
        interval = min(self.ping_interval, self.dead_timeout / 4)
        if self.stall_timeout is not None:
            interval = min(interval, self.stall_timeout / 4)
        while True:
            await trio.sleep(interval)
            now = trio.current_time()
            silent = now - self.last_received
            if silent >= self.dead_timeout:
                raise LinkDead(f"no data from the peer for {silent:.1f} s")
            started = self.send_started
            if started is not None and now - started >= self.dead_timeout:
                raise LinkDead(f"a send has been stuck for {now - started:.1f} s")
            if silent >= self.ping_interval:
                opaque = _PING.pack(next(self._ping_ids))
                if ping(opaque):
                    if len(self._pings_sent) > _MAX_PINGS_OUT:
                        self._pings_sent.clear()
                    self._pings_sent[opaque] = now
            if self.stall_timeout is not None:
                reap(now, self.stall_timeout)
