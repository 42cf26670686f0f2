"""`send_all` without a trip through trio's scheduler when the kernel takes every byte at once.

trio's SocketStream.send_all ends every successful send with a checkpoint that reschedules the task: one more
pass of the run loop (an epoll_wait and the loop's bookkeeping) per write. Under one request at a time that
pass is most of what a write costs; an exchange makes four such writes (client, WebSocket both ways, upstream),
and strace showed ~7 run-loop passes per request on each end. Here a write is first tried directly on the
non-blocking socket; only what the kernel does not take at once (a full socket buffer, an error) goes through
trio's send_all, which then waits for the socket, and raises trio's own exceptions.

A write never interleaves with another one: a stream whose bytes are partly through the slow path takes every
later write through it too (trio's send_all then refuses concurrent senders with BusyResourceError as before).
Only plain TCP streams take the fast path (TLS writes go through the SSL object), and only on POSIX, where
write(2) on a socket is send(2). `direct_fd` says which streams those are, for a read that must not wait too
(the agent's look behind an upstream's response head).
"""

from __future__ import annotations

import os
from typing import Final

import trio

__all__ = ["DIRECT", "direct_fd", "send_all", "send_nowait", "send_rest"]

_POSIX: Final = os.name == "posix"
DIRECT: Final = _POSIX  # send_nowait can write plain TCP streams here (elsewhere it never writes)
_slow: set[int] = set()  # id() of streams with a write in trio's send_all right now


def direct_fd(stream: trio.abc.Stream | trio.abc.SendStream) -> int | None:
    """The file descriptor of a plain TCP stream that read(2) and write(2) may use directly here (POSIX), or
    None: not such a stream, or closed (-1 then: never a number another socket may have reused)."""
    if not _POSIX or type(stream) is not trio.SocketStream:
        return None
    fd = stream.socket.fileno()
    return fd if fd >= 0 else None


def send_nowait(
    stream: trio.abc.SendStream, data: bytes | bytearray | memoryview
) -> bytes | bytearray | memoryview:
    """Write what the kernel takes of `data` right now; what is left (empty: all of it went). A stream this
    module cannot write directly, or one with a write waiting in send_all, takes nothing here."""
    if id(stream) in _slow or not data or (fd := direct_fd(stream)) is None:
        return data
    try:
        sent = os.write(fd, data)
    except OSError:
        return data  # EAGAIN, or an error that send_all reports in trio's terms
    return memoryview(data)[sent:] if sent < len(data) else b""


async def send_all(stream: trio.abc.SendStream, data: bytes | bytearray | memoryview) -> None:
    """Like `stream.send_all(data)`; a checkpoint only if the write had to wait (or failed)."""
    left = send_nowait(stream, data)
    if not left and data:
        return
    await send_rest(stream, left)


async def send_rest(stream: trio.abc.SendStream, left: bytes | bytearray | memoryview) -> None:
    """What send_nowait left of a write, through trio's send_all (which waits for the socket); direct writes
    to the stream wait until it is done. send_all is send_nowait and then this; a caller that puts a deadline
    on the wait calls the two itself."""
    key = id(stream)
    if key in _slow or type(stream) is not trio.SocketStream:
        await stream.send_all(left)  # a second sender meanwhile: trio refuses it, as without this module
        return
    _slow.add(key)
    try:
        await stream.send_all(left)
    finally:
        _slow.discard(key)
