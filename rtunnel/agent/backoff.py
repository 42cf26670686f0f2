"""Reconnect delays: exponential backoff with full jitter (delay drawn uniformly from 0..min(cap, base*2^n))."""

from __future__ import annotations

import random


class Backoff:
    def __init__(self, initial: float = 0.5, cap: float = 30.0, rng: random.Random | None = None) -> None:
        if initial <= 0 or cap < initial:
            raise ValueError("backoff needs 0 < initial <= cap")
        self.initial = initial
        self.cap = cap
        self.attempts = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        ceiling = min(self.cap, self.initial * 2**self.attempts)
        self.attempts = min(self.attempts + 1, 64)
        # Full jitter spreads a fleet of agents that lost the same relay at the same moment.
        return self._rng.uniform(0, ceiling)

    def reset(self) -> None:
        self.attempts = 0
