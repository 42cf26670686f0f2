"""Helpers for test code that runs its own trio nurseries."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


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
