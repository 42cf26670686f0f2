"""Helpers for test code under trio."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import trio


@contextmanager
def unwrap_single() -> Iterator[None]:
    """Re-raise a lone exception out of the group that a trio nursery wraps it in, so that callers catch
    what the ``async with`` body raised (``pytest.raises``, ``except``) as if no nursery were involved."""
    try:
        yield
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise


async def wait_until(
    predicate: Callable[[], object], *, within: float = 10.0, interval: float = 0.01
) -> None:
    """Poll state owned by other tasks, processes or sockets, for which no event exists, until `predicate()`
    is true; TooSlowError after `within` seconds (a budget for a broken product, not a measurement)."""
    with trio.fail_after(within):
        while not predicate():  # noqa: ASYNC110  (polled: nothing signals it)
            await trio.sleep(interval)
