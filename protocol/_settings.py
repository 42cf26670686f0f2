"""Settings carried by HELLO (SPEC.md 4.1) and local abuse limits (SPEC.md 11)."""

from __future__ import annotations

import dataclasses
import enum

MAX_WINDOW = 2**31 - 1
MAX_STREAM_ID = 2**31 - 1


class SettingId(enum.IntEnum):
    MAX_FRAME_SIZE = 1
    MAX_HEAD_SIZE = 2
    MAX_CONCURRENT_STREAMS = 3
    INITIAL_STREAM_WINDOW = 4
    CONNECTION_WINDOW = 5


# (field name, allowed minimum, allowed maximum), in setting-id order.
_RANGES: dict[int, tuple[str, int, int]] = {
    SettingId.MAX_FRAME_SIZE: ("max_frame_size", 1024, 2**24 - 1),
    SettingId.MAX_HEAD_SIZE: ("max_head_size", 1024, 2**24 - 1),
    SettingId.MAX_CONCURRENT_STREAMS: ("max_concurrent_streams", 0, MAX_WINDOW),
    SettingId.INITIAL_STREAM_WINDOW: ("initial_stream_window", 0, MAX_WINDOW),
    SettingId.CONNECTION_WINDOW: ("connection_window", 0, MAX_WINDOW),
}


@dataclasses.dataclass(frozen=True, slots=True)
class Settings:
    """What an endpoint accepts and grants; sent once in its HELLO and fixed for the connection."""

    max_frame_size: int = 16384
    max_head_size: int = 65536
    max_concurrent_streams: int = 256
    initial_stream_window: int = 262144
    connection_window: int = 16 * 1024 * 1024

    def __post_init__(self) -> None:
        for name, low, high in _RANGES.values():
            value = getattr(self, name)
            if not isinstance(value, int) or not low <= value <= high:
                raise ValueError(f"setting {name}={value!r} is outside {low}..{high}")

    def to_pairs(self) -> list[tuple[int, int]]:
        return [(int(sid), getattr(self, name)) for sid, (name, _, _) in _RANGES.items()]

    @classmethod
    def from_pairs(cls, pairs: list[tuple[int, int]]) -> Settings:
        """Build from wire pairs; unknown ids are ignored, the last of a repeated id wins (SPEC 4.1).

        Raises ValueError when a known value is out of range.
        """
        values: dict[str, int] = {}
        for sid, value in pairs:
            known = _RANGES.get(sid)
            if known is not None:
                values[known[0]] = value
        return cls(**values)


@dataclasses.dataclass(frozen=True, slots=True)
class Limits:
    """Receiver-side abuse limits (SPEC.md 11). Not negotiated; rates are per second of the caller's clock."""

    max_control_queue: int = 10_000
    ping_burst: int = 50
    ping_rate: float = 10.0
    reset_burst: int = 1000
    reset_rate: float = 200.0
    empty_frame_burst: int = 1000
    empty_frame_rate: float = 200.0
    window_update_burst: int = 40_000
    window_update_rate: float = 20_000.0


class TokenBucket:
    """A classic token bucket. The clock is the caller's: the core never reads time itself."""

    __slots__ = ("_burst", "_last", "_rate", "_tokens")

    def __init__(self, burst: int, rate: float) -> None:
        self._burst = float(burst)
        self._rate = rate
        self._tokens = float(burst)
        self._last: float | None = None

    def take(self, now: float) -> bool:
        if self._last is not None and now > self._last:
            self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
        if self._last is None or now > self._last:
            self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False
