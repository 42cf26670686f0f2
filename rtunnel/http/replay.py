"""What both ends may send twice (RFC 9110 9.2.2): the idempotent methods, and the request body held so that a
request can be resent after its first try failed before it could have been processed."""

from __future__ import annotations

from typing import Final

from .proxyheaders import Header

__all__ = ["IDEMPOTENT", "REPLAY_LIMIT", "ReplayBuffer"]

# Methods whose request may be sent twice: the effect of two is that of one.
IDEMPOTENT: Final = frozenset([b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"])
# Request body bytes held for a resend; a longer body makes its request one that cannot be sent again.
REPLAY_LIMIT: Final = 64 * 1024


class ReplayBuffer:
    """The request body read so far, chunk by chunk as it was read, while it is no longer than REPLAY_LIMIT.

    Past the limit it holds nothing (`overflow`): a body that cannot be resent whole is not resent at all."""

    __slots__ = ("chunks", "complete", "overflow", "size", "trailers")

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.size = 0  # bytes in `chunks`
        self.overflow = False  # more was read than is held: the body cannot be replayed
        self.complete = False  # the whole body was read (the end of the message, with its trailers)
        self.trailers: list[Header] | None = None  # for an end whose source does not keep them

    def hold(self, data: bytes) -> None:
        if self.overflow:
            return
        if self.size + len(data) > REPLAY_LIMIT:
            self.overflow = True
            self.chunks = []
            self.size = 0
        else:
            self.chunks.append(data)
            self.size += len(data)
