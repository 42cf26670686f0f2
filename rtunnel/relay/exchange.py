"""The relay's HTTP/1.1 side: one task per client connection, one stream per exchange.

Each request head is checked (version, framing, size), stripped of hop-by-hop headers, given X-Forwarded-* and
Via, and sent as an OPEN to the least-loaded agent. Its body and the response are then pumped concurrently in
both directions with flow control end to end: nothing is buffered whole, and a slow client only slows its own
stream. Pipelined requests are read one at a time (h11 pauses after each), so they are answered in order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http
import logging
import math
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

import h11
import trio

from protocol import ErrorCode, HeadNotEncodable, HeadPart, RequestHead, request_head_size

from ..http.passthrough import pump, upgrade_offer, with_upgrade
from ..http.proxyheaders import add_forwarding, strip_hop_by_hop
from ..http.strict import MAX_CHUNK_SIZE, HeadChecker, chunk_left
from ..link.mux import Multiplexer, MuxStream, StreamReset
from ..link.wslink import SUBPROTOCOL
from ..net import fastsend
from ..net.clientaddr import TrustedProxies
from ..net.limits import Counter
from ..ops.inspector import Capture, Inspector
from ..ops.logs import Access, AccessLog, pick_request_id, with_request_id
from .registry import AgentRegistry, NoAgentAvailable, NoRoute, Route, TunnelRouter
from .retry import MAX_ATTEMPTS, MAX_POSSIBLY_PROCESSED, on_reset
from .retry import Outcome as _Outcome
from .retry import Replay as _Replay

log = logging.getLogger("rtunnel.relay")
access_log = AccessLog("rtunnel.relay.access")

READ_SIZE = 65536
# A bodiless exchange runs in the connection's own task, without a second one watching the client: a nursery,
# a task and its cancellation cost about as much as the rest of a small exchange. One still running after this
# long (a long poll, a slow upstream, a streamed response) starts the watcher then, so a client that leaves is
# noticed at most this much later than with a watcher from the start.
WATCH_AFTER = 0.25

_T = TypeVar("_T")


# The client's bytes are handed to h11 in slices of at most this size while a head or a chunk-size line is
# being read, so that h11's incomplete-event limit (and ours on chunk lines) trips within one slice of the
# limit instead of after a whole 64 KiB read.
FEED_SIZE = 4096
# A chunk-size line (size + chunk extensions) or trailer section longer than this is refused with 400
# (RFC 9112 7.1.1: a server ought to limit chunk extensions). Extensions are never forwarded anyway.
MAX_CHUNK_LINE = 8192
# A request body's pump gives way to other tasks after this many chunks parsed from data already read.
YIELD_EVERY = 16
# The answer to an agent's WebSocket upgrade on the clients' listener (421 Misdirected Request).
MISDIRECTED_AGENT = 421

# Held by a connection between its reads, so that an exchange in progress (a held long poll) keeps neither the
# bytes its request arrived in (a memoryview's slice, even empty, keeps them) nor the checker of its judged head.
_NOTHING = memoryview(b"")
_JUDGED = HeadChecker()
_JUDGED.complete = True  # takes no more bytes (a fresh checker is made for each head)


@dataclasses.dataclass(frozen=True)
class HttpLimits:
    """The relay's limits on its HTTP side (README, "Security model", lists them with their defaults).

    None disables a limit."""

    max_head_size: int = 32 * 1024  # request line + headers (431)
    max_header_count: int = 200  # (431)
    head_timeout: float = 30.0  # time to receive a whole request head once it started (slowloris, 408)
    idle_timeout: float = 75.0  # keep-alive connection with no request in progress (closed quietly)
    body_timeout: float = 60.0  # a request body that stops arriving mid-way (408): slowloris on the body
    max_body_size: int | None = None  # None: unlimited (streamed, so no memory cost) (413)
    max_connections: int | None = 1024  # client connections on the HTTP listener, in total (503)
    # Per client address (the PROXY header's or X-Forwarded-For's behind a balancer). A quarter of the total:
    # one address can never shut the others out, while an office behind one NAT address gets ~40 browsers'
    # worth of connections at once (README, "Security model", has the reasoning).
    max_connections_per_ip: int | None = 256  # ... from one client address (503)
    # As many as connections: long-lived exchanges (SSE, WebSockets, long polls) of many users behind one
    # NAT are normal; behind a trusted proxy, whose connections are not limited per address, this is the
    # per-client bound.
    max_exchanges_per_ip: int | None = 256  # exchanges in progress from one client address (429)
    # Stream data buffered in the relay (received from agents and not yet written to clients, plus request
    # bodies queued toward agents), across all agents; above it new exchanges get 503 until it drains.
    max_buffered_bytes: int | None = 256 * 1024 * 1024


# The status for each part of a request head the tunnel cannot carry. A method longer than any the relay
# knows is one it does not implement (RFC 9110 15.6.2); the wire's limits come from protocol alone.
_UNENCODABLE: dict[HeadPart, tuple[int, str]] = {
    HeadPart.METHOD: (501, "method too long"),
    HeadPart.TARGET: (414, "request-target too long"),
    HeadPart.HEADER: (431, "request header field too large"),
    HeadPart.HEADER_COUNT: (431, "too many request headers"),
    HeadPart.SIZE: (431, "request head too large"),
}


class _ClientGone(Exception):
    """The client closed or broke its connection."""


class _Abort(Exception):
    """The response cannot be completed honestly: drop the client connection without finishing it."""


class ClientConnection:
    """One client TCP connection on the relay's HTTP listener."""

    # Slots: one of these lives as long as its connection, a held long poll's too.
    __slots__ = (
        "_capture",
        "_chunked",
        "_client",
        "_client_ip",
        "_error_note",
        "_exchanges",
        "_h11",
        "_head_checker",
        "_holds_slot",
        "_idle_scope",
        "_limits",
        "_nursery",
        "_on_exchange",
        "_request_id",
        "_router",
        "_scheme",
        "_stream",
        "_trusted",
        "_unfed",
        "_watch_at",
        "_watch_error",
        "_watcher",
        "busy",
        "draining",
        "idle_since",
        "inspector",
        "reclaimed",
    )

    def __init__(
        self,
        stream: trio.abc.Stream,
        registry: AgentRegistry | TunnelRouter,
        limits: HttpLimits,
        *,
        client_ip: str,
        trusted_proxies: TrustedProxies | None = None,
        scheme: str = "http",
        exchanges: Counter | None = None,
        on_exchange: Callable[[Access], None] | None = None,
        watchers: trio.Nursery | None = None,
    ) -> None:
        self._stream = stream
        self._on_exchange = on_exchange  # called with each exchange's access record (metrics)
        self._request_id: str | None = None  # X-Request-Id of the exchange in progress
        if isinstance(registry, AgentRegistry):  # one agent pool, no named tunnels (tests use this form)
            router = TunnelRouter(registry.agent_wait)
            router.registries[None] = registry
            registry = router
        self._router = registry
        self._limits = limits
        self._client_ip = client_ip  # the connection's client: its peer, or the one a PROXY header names
        # The connection comes from a trusted proxy: each request's client is read from its X-Forwarded-For.
        self._trusted = trusted_proxies
        self._client = client_ip  # the current request's client (limits, access log)
        self._scheme = scheme
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_head_size)
        # Exchanges in progress per client address, shared by all connections of one relay.
        self._exchanges = exchanges or Counter(per_key=limits.max_exchanges_per_ip)
        self._unfed = _NOTHING  # read from the client, not yet given to h11 (see FEED_SIZE)
        self._chunked = False  # the current request's body is chunked
        self._head_checker = HeadChecker()  # strict checks on the raw head being received (http/strict.py)
        self._holds_slot: str | None = None  # the key under which this exchange counts in self._exchanges
        self.busy = False  # an exchange is in progress (the relay's drain waits for those)
        self.draining = False  # set by the relay's drain: close once the current exchange is done
        # Where a late client watcher runs: the relay's handler nursery, given in `watchers`, as a nursery per
        # connection, held as long as the connection, costs each held long poll ~1.5 KiB; without one, serve
        # opens its own.
        self._nursery = watchers
        self._watch_error: Exception | None = None  # the watcher's unexpected failure, raised by the exchange
        self._watch_at: float | None = None  # a bodiless exchange's time to start watching the client
        self._watcher: tuple[trio.CancelScope, trio.Event] | None = None  # (its scope, set once it ended)
        self.inspector: Inspector | None = None  # --inspect: record each exchange (the one hook, _exchange)
        self._capture: Capture | None = None
        self._error_note: str | None = None  # why the relay answered with an error itself (dashboard)
        # Waiting for the first byte of a request since then (None: not idle). At its connection limit the
        # relay closes the longest idle connection to serve a new one (reclaim).
        self.idle_since: float | None = None
        self.reclaimed = False
        self._idle_scope: trio.CancelScope | None = None

    @property
    def client_ip(self) -> str:
        return self._client_ip

    def reclaim(self) -> bool:
        """Close this connection if it is idle between requests; False if it is not idle.

        Closed for good even if a request's first bytes arrive in the same instant: to its client this is
        the usual keep-alive race (a reused connection closed before any response), which clients handle."""
        if self._idle_scope is None:
            return False
        self._idle_scope.cancel()
        self._idle_scope = self.idle_since = None
        self.reclaimed = True
        return True

    async def serve(self) -> None:
        if self._nursery is not None:
            await self._serve()
            return
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                await self._serve()
            finally:
                self._nursery = None

    async def _serve(self) -> None:
        try:
            while True:
                request = await self._next_request()
                if request is None:
                    return
                self.busy = True
                try:
                    keep_going = await self._exchange(request)
                finally:
                    self.busy = False
                    self._release_exchange_slot()
                if not keep_going or self.draining or not self._start_next_cycle():
                    return
        except (_ClientGone, _Abort):
            return

    # -- reading -----------------------------------------------------------------------------------

    async def _receive_more(self) -> None:
        if not self._unfed:
            try:
                data = await self._stream.receive_some(READ_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                raise _ClientGone from None
            if not data:
                raise _ClientGone  # a client that closes before its exchange is done has abandoned it
            self._unfed = memoryview(data)
        state = self._h11.their_state
        careful = state is h11.IDLE or (state is h11.SEND_BODY and self._chunked)
        size = FEED_SIZE if careful else len(self._unfed)
        piece = bytes(self._unfed[:size])
        self._unfed = self._unfed[size:] if size < len(self._unfed) else _NOTHING
        if state is h11.IDLE:
            self._head_checker.feed(piece)
        self._h11.receive_data(piece)

    async def _next_event(self) -> h11.Event | type[h11.PAUSED]:
        while True:
            event = self._h11.next_event()
            if event is h11.NEED_DATA:
                if (
                    self._chunked
                    and self._h11.their_state is h11.SEND_BODY
                    and len(self._h11.trailing_data[0]) > MAX_CHUNK_LINE
                ):
                    # Waiting in a chunked body with this much unparsed means one endless chunk-size line
                    # (extensions) or trailer section: data chunks are taken out as they arrive.
                    raise h11.RemoteProtocolError("chunk-size line or trailers too long", 400)
                await self._receive_more()
                continue
            return event  # type: ignore[return-value]

    def _has_pending_input(self) -> bool:
        return bool(self._unfed) or bool(self._h11.trailing_data[0])

    async def _next_request(self) -> h11.Request | None:
        self._chunked = False
        self._head_checker = HeadChecker()
        self._head_checker.feed(self._h11.trailing_data[0])  # a pipelined head already received
        self._request_id = None  # errors before the next exchange starts carry no id
        if self._h11.their_state is h11.IDLE and not self._has_pending_input():
            # A keep-alive connection between requests: idle time is allowed, up to idle_timeout. The head
            # clock (head_timeout) starts with the first byte of the next request.
            with trio.move_on_after(self._limits.idle_timeout) as idle:
                self._idle_scope, self.idle_since = idle, trio.current_time()
                try:
                    await self._receive_more()
                finally:
                    self._idle_scope = self.idle_since = None
            if self.reclaimed or not self._has_pending_input():
                return None  # idle too long, or reclaimed: close quietly
        try:
            event = self._head_event_nowait()
            if event is h11.NEED_DATA:  # the head is not all here yet: from now on it has head_timeout
                with trio.fail_after(self._limits.head_timeout):
                    event = await self._next_head_event()
        except trio.TooSlowError:
            await self._send_error(408, "request head not received in time", close=True)
            return None
        except h11.RemoteProtocolError as exc:
            status = exc.error_status_hint
            reason = "request head too large" if status == 431 else f"malformed request: {exc}"
            await self._send_error(status, reason, close=True)
            return None
        if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
            return None
        if not isinstance(event, h11.Request):
            return None
        self._head_checker = _JUDGED
        return event

    def _head_event_nowait(self) -> h11.Event | type[h11.PAUSED] | type[h11.NEED_DATA]:
        """What h11 makes of the head received so far (after the strict checks), without waiting."""
        problem = self._head_checker.problem
        if problem is not None:
            raise h11.RemoteProtocolError(problem[1], problem[0])
        return self._h11.next_event()

    async def _next_head_event(self) -> h11.Event | type[h11.PAUSED]:
        """Like _next_event, with the strict raw-head checks (http/strict.py) run before h11 parses the head."""
        while True:
            problem = self._head_checker.problem
            if problem is not None:
                raise h11.RemoteProtocolError(problem[1], problem[0])
            event = self._h11.next_event()
            if event is h11.NEED_DATA:
                await self._receive_more()
                continue
            return event  # type: ignore[return-value]

    # -- one exchange ------------------------------------------------------------------------------

    async def _exchange(self, request: h11.Request) -> bool:
        started = trio.current_time()
        self._request_id = pick_request_id(request.headers.raw_items())
        if self._trusted is not None:
            forwarded = [value for name, value in request.headers if name == b"x-forwarded-for"]
            self._client = self._trusted.client_of(forwarded, self._client_ip)
        if self.inspector is not None:
            self._capture = self.inspector.begin(
                "relay", request.method, request.target, request.headers.raw_items(),
                request_id=self._request_id, client=self._client,
            )  # fmt: skip
        problem = self._check_request(request)
        if problem is not None:
            status, reason = problem
            sent = await self._send_error(status, reason, close=True)
            self._log(request, status, 0, sent, started)
            return False
        has_body = self._has_body(request)
        if not has_body:
            # h11 yields a bodiless request's EndOfMessage as a separate event, with no data needed. Take it
            # now: left pending, the client would still be in SEND_BODY when the response ends, and the
            # keep-alive connection could not start its next cycle (it would be closed after every GET).
            self._h11.next_event()
        self._chunked = any(name == b"transfer-encoding" for name, _ in request.headers)
        route = self._route(request)
        if isinstance(route, NoRoute):
            sent = await self._send_error(route.status, route.reason, close=route.status != 404)
            self._log(request, route.status, 0, sent, started)
            return route.status == 404 and self._h11.their_state is h11.DONE
        # A protocol switch (SPEC 5.5) is tunnelled for a bodiless HTTP/1.1 request only; otherwise its
        # Upgrade header is dropped like any hop-by-hop header and the request is ordinary HTTP.
        offer = None
        if not has_body and request.http_version == b"1.1":
            offer = upgrade_offer(request.headers.raw_items())
        head = self._build_head(request, route, offer)
        try:
            request_head_size(head)  # what the tunnel cannot carry is refused before waiting for an agent
        except HeadNotEncodable as exc:
            return await self._refuse_head(request, exc, started)
        refusal = self._admit()
        if refusal is not None:
            status, reason = refusal
            sent = await self._send_error(status, reason, retry_after=True)
            self._log(request, status, 0, sent, started)
            return self._h11.their_state is h11.DONE
        replay = _Replay()
        attempt = possibly_processed = 0
        mux: Multiplexer | None = None  # the agent of the previous attempt
        while True:
            attempt += 1
            try:
                # An upgrade request's direction stays open after its empty body: once switched, it carries
                # the client's bytes.
                end_stream = not has_body and offer is None
                mux, stream = await route.registry.open_exchange(head, end_stream=end_stream, avoid=mux)
                if self._capture is not None:
                    stream = self._capture.tap(stream, mux.name)
            except NoAgentAvailable as exc:
                what = "no agent available" if route.tunnel is None else f"tunnel {route.tunnel!r}"
                sent = await self._send_error(503, f"{what}: {exc}", retry_after=True)
                self._log(request, 503, 0, sent, started)
                return self._h11.their_state is h11.DONE
            except HeadNotEncodable as exc:  # over the MAX_HEAD_SIZE of the agent picked
                return await self._refuse_head(request, exc, started)
            try:
                outcome = await self._run_exchange(request, stream, has_body, replay, mux, offer is not None)
            finally:
                stream.close()  # on every path: an open stream would skew routing and the memory budget
            if outcome.retry:
                possibly_processed += outcome.maybe_processed
                if attempt < MAX_ATTEMPTS and possibly_processed < MAX_POSSIBLY_PROCESSED:
                    # open_exchange waits up to --agent-wait: this covers "the only agent is reconnecting" too.
                    method = request.method.decode()
                    log.info("retrying %s (attempt %d): %s", method, attempt + 1, outcome.why)
                    continue
                why = f"gave up after {attempt} attempts: {outcome.why}"
                outcome.pending_error = (502, why)
            if not outcome.head_sent and not outcome.abort:
                if outcome.body_error is not None:
                    status, reason = outcome.body_status, outcome.body_error
                else:
                    status, reason = outcome.pending_error or (502, "the agent sent no response")
                outcome.bytes_out = await self._send_error(status, reason, close=True)
                outcome.status = status
            self._log(request, outcome.status, outcome.bytes_in, outcome.bytes_out, started)
            if outcome.abort:
                raise _Abort
            return outcome.keep_alive

    async def _refuse_head(self, request: h11.Request, exc: HeadNotEncodable, started: float) -> bool:
        """A head the tunnel's wire format cannot carry (SPEC 5): the status that fits, and close."""
        status, reason = _UNENCODABLE.get(exc.part, (400, "request head cannot be forwarded"))
        sent = await self._send_error(status, f"{reason} ({exc})", close=True)
        self._log(request, status, 0, sent, started)
        return False

    async def _run_exchange(
        self,
        request: h11.Request,
        stream: MuxStream,
        has_body: bool,
        replay: _Replay,
        mux: Multiplexer,
        upgrade: bool = False,
    ) -> _Outcome:
        outcome = _Outcome()
        wants_continue = self._h11.they_are_waiting_for_100_continue
        if not has_body and not upgrade:
            self._watch_at = trio.current_time() + WATCH_AFTER
            try:
                await self._relay_response_or_fail(
                    request, stream, outcome, wants_continue, False, replay, mux, False
                )
            finally:
                self._watch_at = None
                watcher, self._watcher = self._watcher, None
                if watcher is not None:
                    watcher[0].cancel()
            if watcher is not None:
                await watcher[1].wait()  # it no longer reads from the client: the next request is ours
                if self._watch_error is not None:
                    error, self._watch_error = self._watch_error, None
                    raise error
            return await self._after_response(stream, outcome)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._request_side, stream, outcome, has_body, replay)
            await self._relay_response_or_fail(
                request, stream, outcome, wants_continue, has_body, replay, mux, upgrade
            )
            nursery.cancel_scope.cancel()
        return await self._after_response(stream, outcome)

    async def _relay_response_or_fail(
        self,
        request: h11.Request,
        stream: MuxStream,
        outcome: _Outcome,
        wants_continue: bool,
        has_body: bool,
        replay: _Replay,
        mux: Multiplexer,
        upgrade: bool,
    ) -> None:
        """_relay_response, with the ways it fails recorded on `outcome`."""
        try:
            await self._relay_response(request, stream, outcome, wants_continue, upgrade)
        except StreamReset as exc:
            on_reset(request.method, exc, outcome, has_body and replay.overflow, mux.is_closed)
        except h11.LocalProtocolError as exc:
            # The agent's head or trailers are not valid HTTP/1.1 (e.g. CR LF in a header value).
            stream.reset(ErrorCode.PROTOCOL_ERROR)
            bad = StreamReset(ErrorCode.PROTOCOL_ERROR, remote=False, retryable=False, reason=str(exc))
            on_reset(request.method, bad, outcome, has_body and replay.overflow, False)
        except _ClientGone:
            stream.reset(ErrorCode.CANCEL)
            outcome.abort = True
            outcome.status = 499

    async def _after_response(self, stream: MuxStream, outcome: _Outcome) -> _Outcome:
        if outcome.client_gone:
            stream.reset(ErrorCode.CANCEL)
            outcome.abort = True
            if not outcome.head_sent:
                outcome.status = 499  # the client left first: not a 502, which would blame the agent
        elif outcome.switched and not outcome.abort:
            await self._switched(stream, outcome)
        return outcome

    async def _from_agent(
        self, receive: Callable[[], Awaitable[_T]], stream: MuxStream, outcome: _Outcome
    ) -> _T:
        """Wait for the agent (`receive`); in a bodiless exchange that takes longer than WATCH_AFTER, start
        watching the client first (see WATCH_AFTER)."""
        watch_at = self._watch_at
        if watch_at is None:
            return await receive()
        with trio.move_on_at(watch_at):
            return await receive()  # both receives are cancel-safe: nothing is lost when the deadline fires
        self._watch_at = None
        self._start_watcher(stream, outcome)
        return await receive()

    def _start_watcher(self, stream: MuxStream, outcome: _Outcome) -> None:
        assert self._nursery is not None and self._watcher is None
        self._watcher = scope, ended = trio.CancelScope(), trio.Event()
        # A method, not a closure: its arguments live in the coroutine's frame, with no function or cells.
        self._nursery.start_soon(self._watch, stream, outcome, scope, ended)

    async def _watch(
        self, stream: MuxStream, outcome: _Outcome, scope: trio.CancelScope, ended: trio.Event
    ) -> None:
        try:
            with scope:
                await self._request_side(stream, outcome, False, _Replay())
        except Exception as exc:  # in the relay's nursery it must not end every other connection
            self._watch_error = exc
        finally:
            ended.set()

    async def _switched(self, stream: MuxStream, outcome: _Outcome) -> None:
        """After a 101: raw bytes both ways until both sides closed (SPEC 5.5); the connection then ends.

        No deadline applies: an idle WebSocket stays open as long as both of its ends keep it open."""
        # Bytes the client sent behind its request head already belong to the new protocol: h11 holds those
        # it was given, self._unfed those read but not yet given to it.
        data, _ = self._h11.trailing_data
        initial = data + bytes(self._unfed)
        self._unfed = _NOTHING
        pumped = await pump(stream, self._stream, initial=initial, what="client")
        outcome.bytes_in, outcome.bytes_out = pumped.into_stream, pumped.out_of_stream
        if pumped.error is not None:
            log.info("protocol switch ended abnormally: %s", pumped.error)
            outcome.abort = True

    async def _request_side(
        self, stream: MuxStream, outcome: _Outcome, has_body: bool, replay: _Replay
    ) -> None:
        if has_body:
            await self._pump_request_body(stream, outcome, replay)
        if outcome.client_gone or outcome.body_error is not None:
            return
        # Keep reading while the response is awaited, only to notice a client that goes away (a long poll
        # whose client left must not keep the upstream busy). Pipelined bytes go to h11's buffer, up to a
        # bound, and are parsed in the next cycle.
        try:
            while len(self._h11.trailing_data[0]) <= self._limits.max_head_size:
                await self._receive_more()
        except _ClientGone:
            if outcome.switched:
                return  # a client that half-closed right after the 101: the byte pump sees the EOF again
            outcome.client_gone = True
            stream.reset(ErrorCode.CANCEL)
            return
        await trio.sleep_forever()

    async def _pump_request_body(self, stream: MuxStream, outcome: _Outcome, replay: _Replay) -> None:
        try:
            if replay.held or replay.complete:
                # A retry: first what the earlier attempt had already read from the client.
                outcome.bytes_in = len(replay.held)
                if replay.held:
                    await stream.send_data(bytes(replay.held))
                if replay.complete:
                    if replay.trailers:
                        await stream.send_trailers(replay.trailers)
                    else:
                        await stream.send_end()
                    return
            with trio.CancelScope() as stall:
                await self._pump_client_body(stream, outcome, replay, stall)
            if stall.cancelled_caught:
                outcome.body_error = f"request body stalled for {self._limits.body_timeout:g} s"
                outcome.body_status = 408
                stream.reset(ErrorCode.CANCEL)
        except _ClientGone:
            outcome.client_gone = True
            stream.reset(ErrorCode.CANCEL)
        except StreamReset:
            return  # the response side reports it; the agent may have answered without the body

    async def _pump_client_body(
        self, stream: MuxStream, outcome: _Outcome, replay: _Replay, stall: trio.CancelScope
    ) -> None:
        """The body from the client to the agent, under one deadline (`stall`): body_timeout past the last
        progress. Moving a deadline costs more than parsing a small chunk, so it moves only once progress
        has eaten 1/16 of it (a stall is caught within 15/16..1 of body_timeout), and not at all for a
        body that keeps arriving in tiny chunks. Time spent waiting for the agent's window is not the
        client's: the deadline is off meanwhile."""
        limit = self._limits.max_body_size
        timeout = self._limits.body_timeout
        moved = trio.current_time()
        stall.deadline = moved + timeout
        unyielded = 0  # events handled since this task last gave way to others
        while True:
            try:
                event = await self._next_event()
            except h11.RemoteProtocolError as exc:
                outcome.body_error = f"malformed request body: {exc}"
                stream.reset(ErrorCode.CANCEL)
                return
            if isinstance(event, h11.Data):
                outcome.bytes_in += len(event.data)
                replay.hold(event.data)
                # A chunk is judged by its declared size, before it is forwarded: beyond what any body can
                # be it is malformed (400), beyond --max-body-size the body is too large (413).
                # (The first data of a chunk has its whole declared size in len(data) + what is left.)
                left = chunk_left(self._h11) if self._chunked else 0
                declared = outcome.bytes_in + left
                if left + len(event.data) > MAX_CHUNK_SIZE:
                    outcome.body_error = "malformed request body: chunk size out of range"
                    stream.reset(ErrorCode.CANCEL)
                    return
                if limit is not None and declared > limit:
                    outcome.body_error = "request body too large"
                    outcome.body_status = 413
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
                if event.headers:
                    await stream.send_trailers(list(event.headers.raw_items()))
                else:
                    await stream.send_end()
                return
            else:
                outcome.body_error = "client closed the connection mid-body"
                outcome.client_gone = True
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

    async def _relay_response(
        self, request: h11.Request, stream: MuxStream, outcome: _Outcome, wants_continue: bool, upgrade: bool
    ) -> None:
        while True:
            head = await self._from_agent(stream.receive_reply, stream, outcome)
            if not head.is_interim:
                break
            if head.status == 100 and not wants_continue:
                continue
            if head.status == 100:
                wants_continue = False
            await self._send(
                h11.InformationalResponse(
                    status_code=head.status, headers=list(head.headers), reason=head.reason
                )
            )
        if head.status == 101:
            if not upgrade:
                why = "101 to a request without Upgrade"
                stream.reset(ErrorCode.PROTOCOL_ERROR)  # SPEC 5.5: the agent broke a rule, not a cancel
                raise StreamReset(ErrorCode.PROTOCOL_ERROR, remote=True, retryable=False, reason=why)
            headers = strip_hop_by_hop(list(head.headers), keep_upgrade=True)
            headers = with_request_id(headers, self._request_id)
            outcome.switched = True  # from here on, the client's EOF is the end of its direction, not a leave
            await self._send(h11.InformationalResponse(status_code=101, headers=headers, reason=head.reason))
            outcome.head_sent = True
            outcome.status = 101
            return  # the caller stops reading HTTP from the client and pumps raw bytes
        if upgrade:
            # Declined (SPEC 5.5): end our direction, which stayed open for a switch, and go on as HTTP. A
            # reset here shows up in the response's own reads.
            with contextlib.suppress(StreamReset):
                await stream.send_end()
        # The agent already stripped hop-by-hop headers and added Via; strip again since the agent is not trusted.
        headers = with_request_id(strip_hop_by_hop(list(head.headers)), self._request_id)
        if self.draining:
            headers.append((b"Connection", b"close"))  # the relay is shutting down: no next request here
        # Whatever already arrived goes out in one write with the head: a small response (head, body, end in
        # one WebSocket message) then costs one send instead of three.
        pending: list[bytes | None] = [
            self._h11.send(h11.Response(status_code=head.status, headers=headers, reason=head.reason))
        ]
        outcome.head_sent = True
        outcome.status = head.status
        held = 0  # batched bytes are out of the mux's memory accounting: keep them to one read's worth
        while True:
            chunk = stream.receive_data_nowait(READ_SIZE) if held < READ_SIZE else None
            if chunk is None:
                await self._send_bytes(pending)
                pending, held = [], 0
                chunk = await self._from_agent(self._reader(stream), stream, outcome)
            if not chunk:
                break
            outcome.bytes_out += len(chunk)
            held += len(chunk)
            pending.append(self._h11.send(h11.Data(data=chunk)))
        trailers = stream.trailers or ()
        pending.append(self._h11.send(h11.EndOfMessage(headers=list(trailers))))
        await self._send_bytes(pending)
        outcome.keep_alive = True

    # -- helpers -----------------------------------------------------------------------------------

    @staticmethod
    def _reader(stream: MuxStream) -> Callable[[], Awaitable[bytes]]:
        return lambda: stream.receive_data(READ_SIZE)

    def _admit(self) -> tuple[int, str] | None:
        """The limits shared with other clients: the offender alone gets 429/503 (Retry-After), others go on."""
        refused = self._exchanges.acquire(self._client)
        if refused is not None:
            return 429, "too many concurrent requests from your address"
        self._holds_slot = self._client
        budget = self._limits.max_buffered_bytes
        if budget is not None:
            buffered = sum(mux.buffered_bytes for mux in self._router.agents)
            if buffered > budget:
                log.warning("buffered stream data %d > budget %d: refusing new exchanges", buffered, budget)
                return 503, "the relay is short of memory, try again later"
        return None

    def _release_exchange_slot(self) -> None:
        if self._holds_slot is not None:
            self._exchanges.release(self._holds_slot)
            self._holds_slot = None

    def _check_request(self, request: h11.Request) -> tuple[int, str] | None:
        if request.http_version not in (b"1.0", b"1.1"):
            return 505, f"HTTP/{request.http_version.decode()} is not supported"
        names = [name for name, _ in request.headers]
        if len(names) > self._limits.max_header_count:
            return 431, "too many request headers"
        size = sum(len(n) + len(v) + 4 for n, v in request.headers) + len(request.target) + 16
        if size > self._limits.max_head_size:
            return 431, "request head too large"
        if b"transfer-encoding" in names and b"content-length" in names:
            # RFC 9112 6.1: a proxy must not forward both; refusing closes the smuggling vector outright.
            return 400, "both Transfer-Encoding and Content-Length"
        if request.method == b"CONNECT":
            return 405, "CONNECT is not supported"
        if _offers_rtunnel(request.headers):
            # An agent dialled the clients' port: refuse it here, before its token travels on to an upstream.
            return MISDIRECTED_AGENT, "this is the relay's HTTP listener (--http); agents connect to --agents"
        if self._limits.max_body_size is not None:
            for name, value in request.headers:
                if name == b"content-length" and int(value) > self._limits.max_body_size:
                    return 413, "request body too large"
        return None

    @staticmethod
    def _has_body(request: h11.Request) -> bool:
        for name, value in request.headers:
            if name == b"transfer-encoding":
                return True
            if name == b"content-length":
                return int(value) > 0
        return False

    def _route(self, request: h11.Request) -> Route | NoRoute:
        host = next((value for name, value in request.headers if name == b"host"), None)
        return self._router.route(host, request.target)

    def _build_head(self, request: h11.Request, route: Route, offer: bytes | None) -> RequestHead:
        raw = list(request.headers.raw_items())
        host = next((value for name, value in raw if name.lower() == b"host"), None)
        headers = with_upgrade(raw, offer)
        lengths = [value for name, value in request.headers if name == b"content-length"]
        if lengths:
            # h11 accepted only equal values ("3, 3", or the header twice): forward exactly one, in canonical
            # form, so no later hop can read a list or a leading zero differently.
            canonical = str(int(lengths[0])).encode()
            kept: list[tuple[bytes, bytes]] = []
            for name, value in headers:
                if name.lower() != b"content-length":
                    kept.append((name, value))
                elif canonical:
                    kept.append((name, canonical))
                    canonical = b""
            headers = kept
        headers = add_forwarding(headers, client_ip=self._client_ip, proto=self._scheme, host=host)
        headers = route.forwarded(with_request_id(headers, self._request_id))
        return RequestHead(request.method, route.target, tuple(headers))

    async def _send(self, event: h11.Event) -> None:
        data = self._h11.send(event)
        if data:
            await self._send_bytes([data])

    async def _send_bytes(self, pieces: list[bytes | None]) -> None:
        data = (
            b"".join(piece for piece in pieces if piece) if len(pieces) > 1 else pieces[0] if pieces else None
        )
        if data:
            try:
                await fastsend.send_all(self._stream, data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                raise _ClientGone from None

    async def _send_error(
        self, status: int, reason: str, *, close: bool = False, retry_after: bool = False
    ) -> int:
        """Send the relay's own response; return its body size as sent (0 if it could not be)."""
        if self._h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return 0
        self._error_note = reason
        body = (reason + "\n").encode()
        headers: list[tuple[bytes, bytes]] = [
            (b"Content-Type", b"text/plain; charset=utf-8"),
            (b"Content-Length", str(len(body)).encode()),
        ]
        if retry_after:
            headers.append((b"Retry-After", b"5"))
        if status == MISDIRECTED_AGENT:
            headers.append((b"Rtunnel-Listener", b"http"))  # SPEC.md section 2: the dialer names the mistake
        headers = with_request_id(headers, self._request_id)
        if close or self._h11.their_state not in (h11.DONE, h11.IDLE):
            headers.append((b"Connection", b"close"))
        try:
            await self._send(h11.Response(status_code=status, headers=headers, reason=_phrase(status)))
            await self._send(h11.Data(data=body))
            await self._send(h11.EndOfMessage())
        except (_ClientGone, h11.LocalProtocolError):
            return 0
        return len(body)

    def _start_next_cycle(self) -> bool:
        conn = self._h11
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            try:
                conn.start_next_cycle()
            except h11.LocalProtocolError:
                return False
            return True
        return False

    def _log(self, request: h11.Request, status: int, bytes_in: int, bytes_out: int, started: float) -> None:
        path = request.target.split(b"?", 1)[0].decode("ascii", "replace")
        access = Access(
            method=request.method.decode("ascii", "replace"),
            path=path,
            status=status,
            bytes_in=bytes_in,
            bytes_out=bytes_out,
            duration_ms=round((trio.current_time() - started) * 1000, 3),
            request_id=self._request_id,
            note=self._error_note,
        )
        self._error_note = None
        if access_log.enabled:
            access_log.write(
                f"{self._client} {access.method} {path} {status:d} in={bytes_in:d} out={bytes_out:d} "
                f"{access.duration_ms:.1f}ms id={access.request_id}",
                access,
                "client",
                self._client,
            )
        if self._on_exchange is not None:
            self._on_exchange(access)
        if self._capture is not None:
            self._capture.finish(access)
            self._capture = None


def _phrase(status: int) -> bytes:
    try:
        return http.HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def _offers_rtunnel(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    offered = (
        token.strip()
        for name, value in headers
        if name == b"sec-websocket-protocol"
        for token in value.split(b",")
    )
    return SUBPROTOCOL.encode() in offered
