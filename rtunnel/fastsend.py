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
write(2) on a socket is send(2).
"""

from __future__ import annotations

import os
from typing import Final

import trio

__all__ = ["send_all"]

_POSIX: Final = os.name == "posix"
_slow: set[int] = set()  # id() of streams with a write in trio's send_all right now


async def send_all(stream: trio.abc.SendStream, data: bytes | bytearray | memoryview) -> None:
    """Like `stream.send_all(data)`; a checkpoint only if the write had to wait (or failed)."""
    key = id(stream)
    if not _POSIX or type(stream) is not trio.SocketStream or key in _slow:
        await stream.send_all(data)  # a second sender meanwhile: trio refuses it, as without this module
        return
    fd = stream.socket.fileno()  # -1 once closed: never a number another socket may have reused
    if fd >= 0 and data:
        try:
            sent = os.write(fd, data)
        except OSError:
            sent = 0  # EAGAIN, or an error that send_all below reports in trio's terms
        if sent == len(data):
            return
        data = memoryview(data)[sent:]
    _slow.add(key)
    try:
        await stream.send_all(data)
    finally:
        _slow.discard(key)
