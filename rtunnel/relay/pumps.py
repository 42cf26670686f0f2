"""The bytes of one attempt of an exchange: the request body from the client to the agent's stream (under the
body limits), the response body from the stream to the client (batched into few writes), and the raw bytes
both ways after a protocol switch.

The two directions run at once (the request side in a task of its own when there is a body to send) and
share one `Attempt`: each side writes its own fields, and the exchange (exchange.py) reads them when both are
done.
"""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Final

import h11
import trio

from protocol import ErrorCode

from ..http.bridge import READ_SIZE, end_body
from ..http.passthrough import pump
from ..http.replay import ReplayBuffer
from ..http.strict import MAX_CHUNK_SIZE, chunk_left
from ..link.mux import MuxStream, StreamReset
from .limits import HttpLimits
from .outcome import ErrorReply
from .wire import ClientGone, ClientWire

__all__ = [
    "CLIENT_LEFT",
    "YIELD_EVERY",
    "Attempt",
    "Stage",
    "pump_response_body",
    "trailers_carried",
    "pump_switched",
    "request_side",
    "take_arrived",
]

log = logging.getLogger("rtunnel.relay")

# A request body's pump gives way to other tasks after this many chunks parsed from data already read.
YIELD_EVERY = 16
# The request side's failure when the client closed or broke its connection: never sent, there is no one to
# send it to (the access line says 499 unless a response head already went out).
CLIENT_LEFT: Final = ErrorReply(499, "the client left")

Receive = Callable[[Callable[[], Awaitable[bytes]]], Awaitable[bytes]]


class Stage(enum.IntEnum):
    """How far the response of an attempt got (the response side's to set)."""

    WAITING = 0  # no response head went out: the relay may still answer itself, or send the request again
    # The final response head arrived and is held (take_arrived): the relay may still answer itself, but a
    # refusal is no longer believed, so the request is not sent again for one.
    REPLIED = 1
    SWITCHING = 2  # a 101 is on its way: from here on, the client's EOF ends its direction, it is no leave
    HEAD_SENT = 3  # a response head went out: a failure can only be signalled by breaking the connection
    SWITCHED = 4  # the 101 went out: the connection carries raw bytes from here on


class Attempt:
    """What one attempt has done so far. The request side writes bytes_in and failed, the response side
    stage, status and bytes_out."""

    __slots__ = ("bytes_in", "bytes_out", "failed", "stage", "status")

    def __init__(self) -> None:
        self.bytes_in = 0
        self.bytes_out = 0
        self.status = 502
        self.stage = Stage.WAITING
        # Why the request side reset the stream: the client's body was refused (the answer it gets if no
        # response head went out yet), or CLIENT_LEFT.
        self.failed: ErrorReply | None = None


# -- client to agent -------------------------------------------------------------------------------


async def request_side(
    wire: ClientWire,
    stream: MuxStream,
    attempt: Attempt,
    body: bool,
    replay: ReplayBuffer,
    limits: HttpLimits,
) -> None:
    if body:
        await _pump_request_body(wire, stream, attempt, replay, limits)
    if attempt.failed is not None:
        return
    # Keep reading while the response is awaited, only to notice a client that goes away (a long poll
    # whose client left must not keep the upstream busy). Pipelined bytes go to h11's buffer, up to a
    # bound, and are parsed in the next cycle.
    try:
        while wire.buffered() <= limits.max_head_size:
            await wire.receive_more()
    except ClientGone:
        if attempt.stage is Stage.SWITCHING or attempt.stage is Stage.SWITCHED:
            return  # a client that half-closed right after the 101: the byte pump sees the EOF again
        attempt.failed = CLIENT_LEFT
        stream.reset(ErrorCode.CANCEL)
        return
    await trio.sleep_forever()


async def _pump_request_body(
    wire: ClientWire, stream: MuxStream, attempt: Attempt, replay: ReplayBuffer, limits: HttpLimits
) -> None:
    try:
        if replay.size or replay.complete:
            # A retry: first what the earlier attempt had already read from the client, in one piece.
            attempt.bytes_in = replay.size
            if replay.size:
                await stream.send_data(b"".join(replay.chunks))
            if replay.complete:
                await end_body(stream, replay.trailers or [])
                return
        with trio.CancelScope() as stall:
            await _pump_client_body(wire, stream, attempt, replay, stall, limits)
        if stall.cancelled_caught:
            attempt.failed = ErrorReply(408, f"request body stalled for {limits.body_timeout:g} s")
            stream.reset(ErrorCode.CANCEL)
    except ClientGone:
        attempt.failed = CLIENT_LEFT
        stream.reset(ErrorCode.CANCEL)
    except StreamReset:
        return  # the response side reports it; the agent may have answered without the body


async def _pump_client_body(
    wire: ClientWire,
    stream: MuxStream,
    attempt: Attempt,
    replay: ReplayBuffer,
    stall: trio.CancelScope,
    limits: HttpLimits,
) -> None:
    """The body from the client to the agent, under one deadline (`stall`): body_timeout past the last
    progress. Moving a deadline costs more than parsing a small chunk, so it moves only once progress
    has eaten 1/16 of it (a stall is caught within 15/16..1 of body_timeout), and not at all for a
    body that keeps arriving in tiny chunks. Time spent waiting for the agent's window is not the
    client's: the deadline is off meanwhile."""
    limit = limits.max_body_size
    timeout = limits.body_timeout
    moved = trio.current_time()
    stall.deadline = moved + timeout
    unyielded = 0  # events handled since this task last gave way to others
    while True:
        try:
            event = await wire.next_event()
        except h11.RemoteProtocolError as exc:
            attempt.failed = ErrorReply(400, f"malformed request body: {exc}")
            stream.reset(ErrorCode.CANCEL)
            return
        if isinstance(event, h11.Data):
            attempt.bytes_in += len(event.data)
            replay.hold(event.data)
            refused = _judge_chunk(wire, attempt.bytes_in, len(event.data), limit)
            if refused is not None:
                attempt.failed = refused
                stream.reset(ErrorCode.CANCEL)
                return
            if stream.send_would_wait:
                stall.deadline = math.inf
                await stream.send_data(event.data)
                stall.deadline = trio.current_time() + timeout
            else:
                await stream.send_data(event.data)
        elif isinstance(event, h11.EndOfMessage):
            replay.complete = True
            replay.trailers = list(event.headers.raw_items())
            await end_body(stream, list(event.headers.raw_items()))
            return
        else:
            attempt.failed = CLIENT_LEFT  # "client closed the connection mid-body"
            stream.reset(ErrorCode.CANCEL)
            return
        now = trio.current_time()
        if now - moved > timeout / 16:
            moved = now
            stall.deadline = now + timeout
        # Chunks already read are parsed without waiting for the network (one 64 KiB read holds
        # ~11,000 one-byte chunks): give way to other connections every few of them, or one body of
        # tiny chunks starves every other client of this relay.
        unyielded += 1
        if unyielded >= YIELD_EVERY:
            unyielded = 0
            await trio.lowlevel.checkpoint()


def _judge_chunk(wire: ClientWire, received: int, size: int, limit: int | None) -> ErrorReply | None:
    """A chunk is judged by its declared size, before it is forwarded: beyond what any body can be it is
    malformed (400), beyond --max-body-size the body is too large (413). (The first data of a chunk has its
    whole declared size in `size` + what is left.) `received`: the body so far, this data included."""
    left = chunk_left(wire.h11) if wire.chunked else 0
    if left + size > MAX_CHUNK_SIZE:
        return ErrorReply(400, "malformed request body: chunk size out of range")
    if limit is not None and received + left > limit:
        return ErrorReply(413, "request body too large")
    return None


# -- agent to client -------------------------------------------------------------------------------


def trailers_carried(
    method: bytes, status: int, headers: list[tuple[bytes, bytes]], client_version: bytes | None
) -> bool:
    """Whether the response goes out chunked, the one framing that carries trailers (h11 chunks a body of no
    declared length to an HTTP/1.1 client). Otherwise (an HTTP/1.0 client, a Content-Length) the agent's
    trailers are dropped, as RFC 9112 7.1.2 lets a recipient that removes the chunked coding: h11 would refuse
    them, and the head and body still batched in the same write would never go out."""
    if method == b"HEAD" or status in (204, 304) or client_version != b"1.1":
        return False
    return not any(name.lower() == b"content-length" for name, _ in headers)


def take_arrived(stream: MuxStream) -> list[bytes]:
    """The response body that arrived with its head, taken without waiting: up to one read's worth, with b""
    last if the body ended too. Raises StreamReset if the stream failed behind them.

    The caller holds the head out of h11 until this returns: an agent whose upstream died right after its
    head sends REPLY then RESET, and when both are here, nothing of the response has reached the client,
    which then gets the relay's 502 (SPEC 10.1) rather than a head and a cut. Only what already arrived
    counts: a head whose body is slow to start (server-sent events) still goes out at once."""
    arrived: list[bytes] = []
    size = 0
    while size < READ_SIZE and (chunk := stream.receive_data_nowait(READ_SIZE)) is not None:
        arrived.append(chunk)
        if not chunk:
            break
        size += len(chunk)
    return arrived


async def pump_response_body(
    wire: ClientWire,
    stream: MuxStream,
    attempt: Attempt,
    pending: list[bytes | None],
    arrived: list[bytes],
    receive: Receive,
    *,
    carries_trailers: Callable[[], bool],
) -> None:
    """The response body and its end, after its head (`pending`, not written yet) and what of the body
    arrived with it (`arrived`, from take_arrived). Whatever already arrived goes out in one write with the
    head: a small response (head, body, end in one WebSocket message) then costs one send instead of three.
    `receive` waits for the agent (see exchange.WATCH_AFTER). `carries_trailers` (see trailers_carried) is
    asked only when the agent sent trailers."""
    held = 0  # batched bytes are out of the mux's memory accounting: keep them to one read's worth
    taken = iter(arrived)
    while True:
        chunk = next(taken, None)
        if chunk is None:
            chunk = stream.receive_data_nowait(READ_SIZE) if held < READ_SIZE else None
        if chunk is None:
            await wire.send_bytes(pending)
            pending, held = [], 0
            chunk = await receive(_reader(stream))
        if not chunk:
            break
        attempt.bytes_out += len(chunk)
        held += len(chunk)
        pending.append(wire.h11.send(h11.Data(data=chunk)))
    trailers = list(stream.trailers) if stream.trailers and carries_trailers() else []
    pending.append(wire.h11.send(h11.EndOfMessage(headers=trailers)))
    await wire.send_bytes(pending)


def _reader(stream: MuxStream) -> Callable[[], Awaitable[bytes]]:
    return lambda: stream.receive_data(READ_SIZE)


async def pump_switched(wire: ClientWire, stream: MuxStream, attempt: Attempt) -> bool:
    """After a 101: raw bytes both ways until both sides closed (SPEC 5.5); False if it ended abnormally.

    No deadline applies: an idle WebSocket stays open as long as both of its ends keep it open."""
    # Bytes the client sent behind its request head already belong to the new protocol.
    pumped = await pump(stream, wire.stream, initial=wire.take_unparsed(), what="client")
    attempt.bytes_in, attempt.bytes_out = pumped.into_stream, pumped.out_of_stream
    if pumped.error is not None:
        log.info("protocol switch ended abnormally: %s", pumped.error)
        return False
    return True
