"""Random bytes from the OS's CSPRNG, drawn POOL bytes at a time.

Each exchange takes a few random bytes (its request id, the masking key of each WebSocket message an agent
sends): one getrandom call per exchange or message showed in syscall counts (15 per MiB of a bulk download).
Bytes taken from a pool os.urandom filled are just as unpredictable, and none is ever handed out twice.
"""

from __future__ import annotations

import os
from typing import Final

__all__ = ["random_bytes"]

POOL: Final = 4096
_pool = memoryview(b"")


def random_bytes(size: int) -> bytes:
    """`size` (at most POOL) bytes from the OS's CSPRNG."""
    global _pool
    if len(_pool) < size:
        _pool = memoryview(os.urandom(POOL))
    taken, _pool = _pool[:size], _pool[size:]
    return bytes(taken)
