"""What the multiplexer asks of the link under it (TransportLike; DirectTransport and PingingTransport where the
link offers more), and what it tells its users when the link ends (MuxClosed, close_code)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

from protocol import ErrorCode, RemoteProtocolError

from .wsterms import CLOSE_NORMAL, CLOSE_POLICY_VIOLATION, CLOSE_PROTOCOL_ERROR


class TransportLike(Protocol):
    async def send(self, message: bytes) -> None: ...

    async def receive(self) -> bytes | bytearray: ...


@runtime_checkable
class DirectTransport(Protocol):
    """A transport that can also write a message without waiting (wslink.Transport on plain TCP)."""

    @property
    def can_send_nowait(self) -> bool: ...

    def send_nowait(self, message: bytes) -> None: ...

    @property
    def send_pending(self) -> bool: ...

    async def flush(self) -> None: ...


@runtime_checkable
class PingingTransport(Protocol):
    """A transport that answers pings of its own (WebSocket) and reports each to `on_ping`."""

    on_ping: Callable[[], None] | None


def close_code(error: BaseException) -> int:
    """The WebSocket close code that ends a connection after `error` (SPEC 2): 1002 after a GOAWAY for a
    connection error, 1008 for ENHANCE_YOUR_CALM (the transport turns it into 1003 after a text message)."""
    if isinstance(error, RemoteProtocolError):
        if error.error_code is ErrorCode.ENHANCE_YOUR_CALM:
            return CLOSE_POLICY_VIOLATION
        return CLOSE_PROTOCOL_ERROR
    return CLOSE_NORMAL


class MuxClosed(Exception):
    """The connection is gone or draining: no new stream can be opened on it."""
