"""The agent's upstream I/O for one exchange: the request out on an upstream connection, the response back on
the stream, and one retry on a fresh connection when a kept-alive one turns out to be dead (SPEC.md 5.4).

Every upstream failure maps to a status the client can act on:

* no connection (refused, DNS, unreachable): 502; connect timeout or no response head in time: 504;
* the upstream broke before the final REPLY was sent: 502 with the reason as a text/plain body (right after
  its response head too, when its failure had already arrived: see _received_body);
* the upstream broke after the final REPLY was sent: RESET(INTERNAL_ERROR), so the truncated body can never
  look complete.

The request body and the response run concurrently, because an upstream may answer (e.g. 413, 401, or an
echo) before it has read the whole body; sending the body first could then deadlock. Both tasks record what
happened on the attempt's `Attempt` (how far it got, the first failure) and never raise; `_settle` then acts on
it once both are done.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import math
from typing import TYPE_CHECKING, Final

import h11
import trio

from protocol import ErrorCode, LocalProtocolError, ResponseHead

from ..http.bridge import READ_SIZE, bodiless, end_body, without_content_length
from ..http.passthrough import pump
from ..http.proxyheaders import Header, response_headers_for_client, strip_hop_by_hop
from ..http.replay import IDEMPOTENT, ReplayBuffer
from ..link.mux import MuxStream, StreamReset
from .upstream import UpstreamBroken, UpstreamConnectError, UpstreamConnection, UpstreamStalled

if TYPE_CHECKING:
    from .exchange import Exchange

__all__ = ["Attempt", "Cause", "Failure", "Phase", "RequestBody", "forward"]

log = logging.getLogger("rtunnel.agent")

_MAX_REASON: Final = 255
# The relay holds at most 64 unread interim heads per stream (mux.MAX_PENDING_REPLIES); stay below it.
MAX_INTERIM_RESPONSES: Final = 32


class RequestBody:
    """The request body as read from the stream, with the first REPLAY_LIMIT bytes kept for a retry
    (http/replay.py), and its framing toward the upstream.

    Each attempt reads it from index 0: held chunks first, then fresh ones from the relay.
    """

    __slots__ = ("_replay", "_stream", "_taken", "chunked", "content_length")

    def __init__(self, stream: MuxStream, content_length: int | None) -> None:
        self._stream = stream
        self._replay = ReplayBuffer()
        self._replay.complete = stream.at_eof
        self._taken = 0  # chunks taken from the relay
        self.content_length = content_length  # as declared
        self.chunked = content_length is None  # its length is unknown: it goes upstream chunked

    @property
    def replayable(self) -> bool:
        return not self._replay.overflow

    @property
    def trailers(self) -> list[Header]:
        return list(self._stream.trailers or ())

    async def read(self, index: int) -> bytes:
        held = self._replay.chunks
        if index < len(held):
            return held[index]
        # Only a replayable body is ever read again from index 0 (a retry requires it).
        assert index == self._taken, "request body is not replayable"
        if self._replay.complete:
            return b""
        chunk = await self._stream.receive_data(READ_SIZE)
        if not chunk:
            self._replay.complete = True
            return b""
        # The relay's body arrives in frames (16 KiB by default): what already arrived goes to the upstream in
        # one send, not one send (and one h11 event, one stall scope) per frame.
        more = self._stream.receive_data_nowait(READ_SIZE - len(chunk)) if len(chunk) < READ_SIZE else None
        if more:
            pieces = [chunk, more]
            size = len(chunk) + len(more)
            while size < READ_SIZE and (more := self._stream.receive_data_nowait(READ_SIZE - size)):
                pieces.append(more)
                size += len(more)
            chunk = b"".join(pieces)
        self._taken += 1
        self._replay.hold(chunk)
        return chunk


class Phase(enum.IntEnum):
    """How far an attempt got; it only moves forward."""

    WAITING = 0  # nothing of the response went to the relay: a failure is answered (502/504), or retried
    INTERIM = 1  # an interim head went to the relay: a failure is still answered, but never retried
    RESPONDED = 2  # the upstream's final head arrived: a stalled request body no longer matters
    FORWARDED = 3  # the final head went to the relay: a failure can only cut the response (RESET)
    COMPLETE = 4  # the whole response went to the relay: the connection may be reused
    SWITCHED = 5  # a 101 went to the relay: raw bytes both ways from here on


class Cause(enum.Enum):
    UPSTREAM = "upstream"  # the connection broke, or the upstream broke HTTP
    TIMEOUT = "timeout"  # a send that stalled, or no response head in time
    RELAY = "relay"  # the relay's request body did not match its own framing


@dataclasses.dataclass(frozen=True, slots=True)
class Failure:
    cause: Cause
    reason: str


class Attempt:
    """One try of the exchange on one upstream connection: how far it got (`phase`, set by the response's task
    only) and the first failure (`fail`, by either task)."""

    __slots__ = ("conn", "failure", "head_scope", "phase", "response_timeout")

    def __init__(self, conn: UpstreamConnection, response_timeout: float) -> None:
        self.conn = conn
        self.response_timeout = response_timeout
        # Covers the wait for the final response head; its deadline is set once the request is fully sent
        # (an upload may legitimately take longer than response_timeout).
        self.head_scope = trio.CancelScope()
        self.phase = Phase.WAITING
        self.failure: Failure | None = None

    def fail(self, cause: Cause, reason: str) -> None:
        """Record a failure; the first one is the attempt's (what follows is its consequence)."""
        if self.failure is None:
            self.failure = Failure(cause, reason)

    def request_sent(self) -> None:
        if self.head_scope.deadline == math.inf:
            self.head_scope.deadline = trio.current_time() + self.response_timeout


async def forward(exchange: Exchange, request: h11.Request, body: RequestBody | None) -> None:
    """Run the exchange on an upstream connection; once more on a fresh one if a kept-alive connection turns
    out to have been closed by the upstream."""
    pool = exchange.handler.pool
    for attempt in (1, 2):
        try:
            # The retry takes a new connection: another idle one may be just as stale.
            conn = await pool.acquire(fresh=attempt == 2)
        except UpstreamConnectError as exc:
            exchange.note = "connect failed"
            log.warning("%s", exc.reason)
            await exchange.reply_error(exc.status, f"rtunnel agent: {exc.reason}\n")
            return
        if not await _attempt(exchange, conn, request, body, may_retry=attempt == 1):
            return
        exchange.note = "retried"
        log.info("upstream closed a kept-alive connection; retrying %s on a new one", exchange.log_path)


async def _attempt(
    exchange: Exchange,
    conn: UpstreamConnection,
    request: h11.Request,
    body: RequestBody | None,
    *,
    may_retry: bool,
) -> bool:
    """Run the exchange on `conn`; True if it should be retried on a fresh connection."""
    pool = exchange.handler.pool
    att = Attempt(conn, exchange.handler.response_timeout)
    released = False
    try:
        await _run(exchange, att, request, body)
        if exchange.relay_reset is not None:
            raise exchange.relay_reset
        if att.phase is Phase.SWITCHED:
            await _passthrough(exchange, conn)
            return False
        if att.phase is Phase.COMPLETE:
            pool.release(conn)
            released = True
            return False
        return await _settle(exchange, att, body, may_retry=may_retry)
    finally:
        if not released:
            pool.discard(conn)


async def _run(exchange: Exchange, att: Attempt, request: h11.Request, body: RequestBody | None) -> None:
    """The request head, then the body and the response at once; what happens is recorded on `att`."""
    conn = att.conn
    try:
        if body is None:  # head and end in one write
            await conn.send(request, h11.EndOfMessage(), stall_timeout=att.response_timeout)
        else:
            await conn.send(request, stall_timeout=att.response_timeout)
    except UpstreamBroken as exc:
        att.fail(Cause.UPSTREAM, exc.reason)
        return
    except UpstreamStalled as exc:
        att.fail(Cause.TIMEOUT, str(exc))
        return
    if body is None:
        att.request_sent()
        await _receive_response(exchange, att)
        return
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_send_body, exchange, att, body, nursery.cancel_scope)
        await _receive_response(exchange, att)
        # Response done or failed: a body still being sent is of no use any more.
        nursery.cancel_scope.cancel()


async def _settle(exchange: Exchange, att: Attempt, body: RequestBody | None, *, may_retry: bool) -> bool:
    """Answer for an attempt that failed (True: retry it on a fresh connection)."""
    failure = att.failure
    assert failure is not None, f"attempt ended {att.phase.name} without a failure"
    method = exchange.method
    if failure.cause is Cause.RELAY:
        # The relay's body did not match its own Content-Length: the relay broke the protocol.
        exchange.note = f"bad request body: {failure.reason}"
        exchange.reset(ErrorCode.PROTOCOL_ERROR)
        return False
    if att.phase >= Phase.FORWARDED:
        exchange.note = f"upstream failed mid-body: {failure.reason}"
        log.warning("%s %s: %s", method.decode("latin-1"), exchange.log_path, exchange.note)
        exchange.reset(ErrorCode.INTERNAL_ERROR)
        return False
    if failure.cause is Cause.TIMEOUT:
        exchange.note = "upstream timeout"
        await exchange.reply_error(504, f"rtunnel agent: {failure.reason}\n")
        return False
    conn = att.conn
    # A kept-alive connection the upstream had closed: an idempotent request goes again on a new one.
    if (
        may_retry
        and conn.reused
        and conn.bytes_received == 0
        and att.phase is Phase.WAITING
        and method in IDEMPOTENT
        and (body is None or body.replayable)
    ):
        return True
    exchange.note = "upstream failed"
    log.warning("%s %s: %s", method.decode("latin-1"), exchange.log_path, failure.reason)
    await exchange.reply_error(502, f"rtunnel agent: {failure.reason}\n")
    return False


async def _send_body(exchange: Exchange, att: Attempt, body: RequestBody, scope: trio.CancelScope) -> None:
    """Stream the request body to the upstream; failures are recorded on `att`, never raised."""
    conn = att.conn
    stall = att.response_timeout
    remaining = body.content_length
    try:
        index = 0
        while remaining != 0:
            chunk = await body.read(index)
            if not chunk:
                break  # too short for a Content-Length: h11 refuses the EndOfMessage below
            index += 1
            if remaining is not None:
                remaining -= len(chunk)  # too long: h11 refuses the Data
            await conn.send(h11.Data(data=chunk), stall_timeout=stall)
        # HTTP/1.1 carries trailers only in chunked framing.
        trailers = strip_hop_by_hop(body.trailers) if body.chunked else []
        await conn.send(h11.EndOfMessage(headers=trailers), stall_timeout=stall)
        att.request_sent()
        if remaining == 0 and await body.read(index):
            # The whole declared length went out at once (so the upstream's answer need not wait for the
            # relay's END); anything beyond it means the relay framed the body wrongly.
            att.fail(Cause.RELAY, "request body longer than its Content-Length")
            scope.cancel()
    except StreamReset as exc:
        exchange.relay_reset = exc
        scope.cancel()
    except h11.LocalProtocolError as exc:
        att.fail(Cause.RELAY, str(exc))
        scope.cancel()
    except UpstreamStalled as exc:
        # Once the upstream has answered, it may ignore the rest of the body: only the response matters.
        if att.phase < Phase.RESPONDED:
            att.fail(Cause.TIMEOUT, f"{exc} and sent no response")
            scope.cancel()
    except UpstreamBroken:
        # The upstream stopped reading (it may have answered early and closed): the response reader
        # sees what it sent, or the failure.
        pass
    finally:
        att.request_sent()


async def _receive_response(exchange: Exchange, att: Attempt) -> None:
    """Forward the upstream's response; failures are recorded on `att`, never raised."""
    try:
        response = await _final_head(exchange, att)
        if response is not None:
            await _forward_response(exchange, att, response)
    except StreamReset as exc:
        exchange.relay_reset = exc
    except UpstreamBroken as exc:
        att.fail(Cause.UPSTREAM, exc.reason)


async def _final_head(exchange: Exchange, att: Attempt) -> h11.Response | None:
    """Wait for the final response head, forwarding interim ones; None if there is none to forward (a 101,
    which switches protocols, or a timeout, recorded on `att`)."""
    conn = att.conn
    interims = 0
    with att.head_scope:
        while True:
            event = await conn.next_event()
            if isinstance(event, h11.Response):
                att.phase = Phase.RESPONDED
                return event
            if not isinstance(event, h11.InformationalResponse):
                raise UpstreamBroken(f"upstream sent {type(event).__name__} before a response head")
            if event.status_code == 101:
                await _switch(exchange, att, event)
                return None
            interims += 1
            if interims > MAX_INTERIM_RESPONSES:
                # Interim heads are not flow-controlled: the relay resets a stream that piles them up.
                raise UpstreamBroken(f"upstream sent more than {MAX_INTERIM_RESPONSES} interim responses")
            interim = tuple(strip_hop_by_hop(event.headers.raw_items()))
            await exchange.send_head(ResponseHead(event.status_code, event.reason[:_MAX_REASON], interim))
            att.phase = Phase.INTERIM
    att.fail(Cause.TIMEOUT, f"upstream sent no response within {att.response_timeout:g} s")
    return None


async def _switch(exchange: Exchange, att: Attempt, event: h11.InformationalResponse) -> None:
    """Forward a 101; h11 accepts one only in answer to our Upgrade: it ends HTTP on this connection."""
    kept = tuple(response_headers_for_client(event.headers.raw_items(), keep_upgrade=True))
    try:
        await exchange.stream.send_reply(ResponseHead(101, event.reason[:_MAX_REASON], kept))
    except LocalProtocolError as exc:
        raise UpstreamBroken(f"upstream 101 head cannot be forwarded: {exc}") from None
    att.phase = Phase.SWITCHED
    exchange.status = 101


async def _forward_response(exchange: Exchange, att: Attempt, response: h11.Response) -> None:
    conn = att.conn
    stream = exchange.stream
    headers = response_headers_for_client(list(response.headers.raw_items()))
    length: int | None = None
    if any(name == b"transfer-encoding" for name, _ in response.headers):
        # Transfer-Encoding overrides Content-Length: the relay must not frame by a stale length.
        headers = without_content_length(headers)
    else:
        lengths = [value for name, value in response.headers if name == b"content-length"]
        length = int(lengths[0]) if lengths else None  # h11 validated and merged it
    status = response.status_code
    no_body = length == 0 or bodiless(exchange.method, status)
    head = ResponseHead(status, response.reason[:_MAX_REASON], tuple(headers))
    # The body bytes that arrived with the head go with it: a small response is then one message.
    data, end = (b"", None) if no_body else _received_body(conn)
    trailers = strip_hop_by_hop(end.headers.raw_items()) if end is not None else []
    try:
        await stream.send_reply(head, data=data, end_stream=no_body or (end is not None and not trailers))
    except LocalProtocolError as exc:
        # Not forwardable (e.g. a head over the tunnel's MAX_HEAD_SIZE): still nothing sent, so 502.
        raise UpstreamBroken(f"upstream response head cannot be forwarded: {exc}") from None
    att.phase = Phase.FORWARDED
    exchange.status = status
    if end is not None:
        if trailers:
            await stream.send_trailers(trailers)
        exchange.finished = True
        att.phase = Phase.COMPLETE
        return
    while True:
        event = await conn.next_event()
        if isinstance(event, h11.Data):
            if not no_body:  # h11 frames HEAD/204/304 as empty; Content-Length 0 gives no Data either
                await stream.send_data(event.data)
        elif isinstance(event, h11.EndOfMessage):
            if not no_body:
                await end_body(stream, strip_hop_by_hop(event.headers.raw_items()))
            exchange.finished = True
            att.phase = Phase.COMPLETE
            return
        else:
            raise UpstreamBroken(f"upstream sent {type(event).__name__} inside a response body")


def _received_body(conn: UpstreamConnection) -> tuple[bytes, h11.EndOfMessage | None]:
    """The response body bytes already received (up to READ_SIZE, without waiting) and its end if that
    arrived too.

    When no body byte came with the head, the socket is read once more without waiting: an upstream that
    closed right after its head (its EOF already here) is then a 502 from us, where a REPLY already sent
    could only be followed by a RESET, and the relay would have to cut a response its client never saw
    start. An upstream slow to start its body (server-sent events) costs one read that finds nothing."""
    pieces: list[bytes] = []
    size = 0
    looked = False
    while size < READ_SIZE:
        event = conn.next_event_nowait()
        if event is None:
            if pieces or looked or not conn.receive_nowait():
                break
            looked = True
            continue
        if isinstance(event, h11.EndOfMessage):
            return b"".join(pieces), event
        if not isinstance(event, h11.Data):
            raise UpstreamBroken(f"upstream sent {type(event).__name__} inside a response body")
        pieces.append(event.data)
        size += len(event.data)
    return b"".join(pieces), None


async def _passthrough(exchange: Exchange, conn: UpstreamConnection) -> None:
    """After a 101: copy raw bytes between the stream and the upstream until both have closed.

    No timeout applies (response_timeout covered the wait for the 101 only): an idle WebSocket lives as
    long as its two ends want. A RESET from the relay, or a broken upstream connection, aborts both."""
    data, _ = conn.h11.trailing_data  # the upstream's first bytes, read together with its 101
    pumped = await pump(exchange.stream, conn.stream, initial=data, what="upstream")
    exchange.finished = True
    if pumped.error is not None:
        exchange.note = f"switched protocol ended abnormally: {pumped.error}"
    else:
        exchange.note = "switched protocols"
