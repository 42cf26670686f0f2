"""Reconnect delays: exponential backoff with full jitter, capped, resettable."""

from __future__ import annotations

import random

import pytest

from rtunnel.agent.backoff import Backoff


def ceilings(initial: float, cap: float, n: int) -> list[float]:
    return [min(cap, initial * 2**i) for i in range(n)]


def test_each_delay_is_drawn_below_a_ceiling_that_doubles_up_to_the_cap() -> None:
    backoff = Backoff(0.5, 30.0, rng=random.Random(1))
    delays = [backoff.next_delay() for _ in range(12)]
    for delay, ceiling in zip(delays, ceilings(0.5, 30.0, 12), strict=True):
        assert 0 <= delay <= ceiling
    assert max(delays) <= 30.0


def test_full_jitter_spreads_a_fleet_over_the_whole_range() -> None:
    # Many agents that lost the relay at the same moment: their n-th delays cover 0..ceiling, not one value.
    fleet = [Backoff(1.0, 8.0, rng=random.Random(seed)) for seed in range(200)]
    for ceiling in ceilings(1.0, 8.0, 6):
        delays = [backoff.next_delay() for backoff in fleet]
        assert all(0 <= d <= ceiling for d in delays)
        assert min(delays) < ceiling / 4 and max(delays) > ceiling * 3 / 4


def test_the_ceiling_stays_at_the_cap_however_many_attempts() -> None:
    # A uniform draw whose upper bound is always returned shows the ceiling itself.
    class Top(random.Random):
        def uniform(self, a: float, b: float) -> float:
            return b

    backoff = Backoff(0.5, 30.0, rng=Top())
    seen = [backoff.next_delay() for _ in range(200)]
    assert seen[:7] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0]
    assert set(seen[6:]) == {30.0}


def test_reset_starts_again_from_the_initial_ceiling() -> None:
    class Top(random.Random):
        def uniform(self, a: float, b: float) -> float:
            return b

    backoff = Backoff(0.25, 4.0, rng=Top())
    assert [backoff.next_delay() for _ in range(4)] == [0.25, 0.5, 1.0, 2.0]
    backoff.reset()
    assert backoff.attempts == 0
    assert backoff.next_delay() == 0.25


def test_same_seed_same_delays() -> None:
    a = Backoff(0.5, 30.0, rng=random.Random(7))
    b = Backoff(0.5, 30.0, rng=random.Random(7))
    assert [a.next_delay() for _ in range(10)] == [b.next_delay() for _ in range(10)]


@pytest.mark.parametrize(("initial", "cap"), [(0, 1), (-1, 1), (2, 1)])
def test_bad_parameters_are_refused(initial: float, cap: float) -> None:
    with pytest.raises(ValueError, match="backoff"):
        Backoff(initial, cap)
