"""What the dashboard charts and lists: exchange rates over the last 10 minutes, the last errors, and (agent)
the last refusals. Always on, so it must stay cheap: a few integer additions per exchange into 5-second
buckets, a bounded deque for the rare error. Memory is fixed (BUCKETS buckets, MAX_EVENTS events each).
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any, Final

from .logs import Access

__all__ = ["BUCKET_SECONDS", "BUCKETS", "Activity"]

BUCKET_SECONDS: Final = 5
BUCKETS: Final = 120  # 10 minutes
MAX_EVENTS: Final = 50
# The agent's own refusals (its access note says so): the allowlist, or a request it would not forward.
_REFUSAL_NOTES: Final = ("denied", "bad request")


class Activity:
    def __init__(self, role: str) -> None:
        self.role = role
        # Bucket number (monotonic seconds // BUCKET_SECONDS) -> [requests, errors, bytes]
        self._buckets: dict[int, list[int]] = {}
        self._current = -1
        self._counts: list[int] = [0, 0, 0]
        self.errors: deque[dict[str, Any]] = deque(maxlen=MAX_EVENTS)
        self.refusals: deque[dict[str, Any]] = deque(maxlen=MAX_EVENTS)
        self.events = 0  # errors and refusals ever recorded: lets a reader ask for what is new

    def record(self, access: Access) -> None:
        bucket = int(time.monotonic()) // BUCKET_SECONDS
        if bucket != self._current:
            self._roll(bucket)
        counts = self._counts
        counts[0] += 1
        counts[2] += access.bytes_in + access.bytes_out
        status = access.status
        if status is None or status >= 500 or (access.note is not None and self.role == "relay"):
            counts[1] += 1
            self._event(self.errors, access)
        elif access.note is not None and access.note.startswith(_REFUSAL_NOTES):
            self._event(self.refusals, access)

    def _roll(self, bucket: int) -> None:
        self._current = bucket
        self._counts = self._buckets.setdefault(bucket, [0, 0, 0])
        oldest = bucket - BUCKETS
        for stale in [b for b in self._buckets if b <= oldest]:
            del self._buckets[stale]

    def _event(self, events: deque[dict[str, Any]], access: Access) -> None:
        self.events += 1
        events.append(
            {
                "seq": self.events,
                "time": time.time(),
                "method": access.method,
                "path": access.path,
                "status": access.status,
                "reason": access.note or _unexplained(self.role, access.status),
                "request_id": access.request_id,
            }
        )

    def current(self) -> tuple[int, ...]:
        """The newest bucket and its counts: changes whenever an exchange is recorded."""
        return (self._current, *self._counts)

    def series(self, since: int | None = None) -> dict[str, Any]:
        """The buckets of the last 10 minutes (or from bucket `since` on), oldest first, gaps as zeros:
        {"step": seconds, "last": newest bucket number, "points": [[bucket, requests, errors, bytes], ...]}."""
        now = int(time.monotonic()) // BUCKET_SECONDS
        first = now - BUCKETS + 1 if since is None else max(since, now - BUCKETS + 1)
        points = [[b, *self._buckets.get(b, (0, 0, 0))] for b in range(first, now + 1)]
        return {"step": BUCKET_SECONDS, "last": now, "points": points}

    def events_since(self, seq: int) -> dict[str, list[dict[str, Any]]]:
        return {
            "errors": [e for e in self.errors if e["seq"] > seq],
            "refusals": [e for e in self.refusals if e["seq"] > seq],
        }


def _unexplained(role: str, status: int | None) -> str:
    """What is known of an error this end did not make itself."""
    if status is None:
        return "reset before a response"
    return f"the {'agent' if role == 'relay' else 'upstream'} answered {status}"
