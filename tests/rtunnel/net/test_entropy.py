"""random_bytes: pooled CSPRNG bytes, each handed out once."""

from __future__ import annotations

from rtunnel.net import entropy


def test_random_bytes_are_never_handed_out_twice_across_refills() -> None:
    taken = [entropy.random_bytes(16) for _ in range(3 * entropy.POOL // 16 + 7)]
    assert all(len(t) == 16 for t in taken)
    assert len(set(taken)) == len(taken)


def test_a_request_larger_than_what_is_left_refills_the_pool() -> None:
    entropy.random_bytes(entropy.POOL - 2)  # leaves at most 2 bytes in this pool
    assert len(entropy.random_bytes(4)) == 4
    assert len(entropy.random_bytes(entropy.POOL)) == entropy.POOL
