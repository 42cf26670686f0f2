"""Abuse limits that span connections: per-address counters and the failed-authentication throttle.

Both are plain bookkeeping with the clock passed in (no I/O, no tasks), so the relay's HTTP listener, its
agent listener and the tests share one small, deterministic implementation.
"""

from __future__ import annotations

import logging
from collections import OrderedDict, deque

__all__ = ["AuthThrottle", "Counter"]

log = logging.getLogger("rtunnel.relay")


class Counter:
    """How many of something (connections, exchanges) are in use, in total and per key (client address).

    `acquire` refuses instead of waiting: a limit exists to shed the offender's load at once, never to queue
    it. Keys are forgotten when their count drops to zero, so memory follows what is in use right now.
    """

    def __init__(self, *, total: int | None = None, per_key: int | None = None) -> None:
        self.total_limit = total
        self.per_key_limit = per_key
        self.total = 0
        self._by_key: dict[str, int] = {}

    def acquire(self, key: str, *, limit_key: bool = True) -> str | None:
        """Take one slot for `key`; None when granted, else which limit refused it ("total" or "per key").
        Without `limit_key` only the total applies (a trusted proxy's connections carry many clients)."""
        if self.total_limit is not None and self.total >= self.total_limit:
            return "total"
        held = self._by_key.get(key, 0)
        if limit_key and self.per_key_limit is not None and held >= self.per_key_limit:
            return "per key"
        self._by_key[key] = held + 1
        self.total += 1
        return None

    def release(self, key: str) -> None:
        held = self._by_key.get(key, 0)
        if held <= 1:
            self._by_key.pop(key, None)
        else:
            self._by_key[key] = held - 1
        if held:
            self.total -= 1


class AuthThrottle:
    """Failed agent authentications per source address: after `max_failures` within `window` seconds the
    address is refused (429) until its oldest failure in the window has aged out.

    While an address is blocked its attempts are not even checked, so a guessing client learns nothing and
    costs one comparison-free rejection each. The block is logged once, when it starts. Memory is bounded by
    `max_addresses` (least recently failing addresses are forgotten first).
    """

    def __init__(
        self,
        max_failures: int = 5,
        window: float = 60.0,
        *,
        max_addresses: int = 10_000,
        what: str = "agent authentications",
    ) -> None:
        self.what = what  # for the log line
        self.max_failures = max_failures
        self.window = window
        self.max_addresses = max_addresses
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._logged: set[str] = set()

    @property
    def enabled(self) -> bool:
        return self.max_failures > 0

    def retry_after(self, address: str, now: float) -> float | None:
        """Seconds until `address` may try again, or None when it is not blocked."""
        if not self.enabled:
            return None
        times = self._recent(address, now)
        if times is None or len(times) < self.max_failures:
            return None
        return max(0.0, times[-self.max_failures] + self.window - now)

    def failed(self, address: str, now: float) -> None:
        """Record one failed attempt from `address`."""
        if not self.enabled:
            return
        times = self._recent(address, now)
        if times is None:
            times = self._failures[address] = deque(maxlen=self.max_failures)
            while len(self._failures) > self.max_addresses:
                old, _ = self._failures.popitem(last=False)
                self._logged.discard(old)
        self._failures.move_to_end(address)
        times.append(now)
        if len(times) >= self.max_failures and address not in self._logged:
            self._logged.add(address)
            log.warning(
                "%d failed %s from %s within %g s: refusing it with 429 for a while",
                len(times),
                self.what,
                address,
                self.window,
            )

    def _recent(self, address: str, now: float) -> deque[float] | None:
        times = self._failures.get(address)
        if times is None:
            return None
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times:
            del self._failures[address]
            self._logged.discard(address)
            return None
        return times
