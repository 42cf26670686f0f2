"""The relay's HTTP/1.1 side: one task per client connection, one exchange (exchange.py) at a time on it.

The connection waits for each request head (idle_timeout between requests, head_timeout once one started),
checks and plans it (request.py), admits it against the limits it shares with other clients, hands it to an
`Exchange` and writes its access line. Pipelined requests are read one at a time (h11 pauses after each), so
they are answered in order.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import h11
import trio

from ..http.bridge import transfer_encoded
from ..net.clientaddr import TrustedProxies
from ..net.limits import Counter
from ..ops.inspector import Capture, Inspector
from ..ops.logs import Access, AccessLog, pick_request_id
from .exchange import Exchange
from .limits import HttpLimits
from .outcome import ErrorReply, Result, Then
from .registry import AgentRegistry, TunnelRouter
from .replies import reply, send_error
from .request import Plan, check_request, has_body, plan_request
from .wire import ClientGone, ClientWire

__all__ = ["ClientConnection"]

log = logging.getLogger("rtunnel.relay")
access_log = AccessLog("rtunnel.relay.access")


class ClientConnection:
    """One client TCP connection on the relay's HTTP listener."""

    # Slots: one of these lives as long as its connection, a held long poll's too.
    __slots__ = (
        "_client",
        "_client_ip",
        "_exchanges",
        "_holds_slot",
        "_idle_scope",
        "_on_exchange",
        "_router",
        "_scheme",
        "_trusted",
        "busy",
        "draining",
        "idle_since",
        "inspector",
        "limits",
        "reclaimed",
        "watchers",
        "wire",
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
        self.wire = ClientWire(stream, limits.max_head_size, limits.send_timeout)
        self._on_exchange = on_exchange  # called with each exchange's access record (metrics)
        if isinstance(registry, AgentRegistry):  # one agent pool, no named tunnels (tests use this form)
            router = TunnelRouter(registry.agent_wait)
            router.registries[None] = registry
            registry = router
        self._router = registry
        self.limits = limits
        self._client_ip = client_ip  # the connection's client: its peer, or the one a PROXY header names
        # The connection comes from a trusted proxy: each request's client is read from its X-Forwarded-For.
        self._trusted = trusted_proxies
        self._client = client_ip  # the current request's client (limits, access log)
        self._scheme = scheme
        # Exchanges in progress per client address, shared by all connections of one relay.
        self._exchanges = exchanges or Counter(per_key=limits.max_exchanges_per_ip)
        self._holds_slot: str | None = None  # the key under which this exchange counts in self._exchanges
        self.busy = False  # an exchange is in progress (the relay's drain waits for those)
        self.draining = False  # set by the relay's drain: close once the current exchange is done
        # Where a late client watcher runs (exchange.WATCH_AFTER): the relay's handler nursery, given in
        # `watchers`, as a nursery per connection, held as long as the connection, costs each held long poll
        # ~1.5 KiB; without one, serve opens its own.
        self.watchers = watchers
        self.inspector: Inspector | None = None  # --inspect: record each exchange
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
        if self.watchers is not None:
            await self._serve()
            return
        async with trio.open_nursery() as nursery:
            self.watchers = nursery
            try:
                await self._serve()
            finally:
                self.watchers = None

    async def _serve(self) -> None:
        try:
            while True:
                request = await self._next_request()
                if request is None:
                    return
                self.busy = True
                try:
                    then = await self._exchange(request)
                finally:
                    self.busy = False
                    self._release_exchange_slot()
                if then is not Then.NEXT or self.draining or not self.wire.start_next_cycle():
                    return
        except ClientGone:
            return

    async def _next_request(self) -> h11.Request | None:
        wire = self.wire
        wire.begin_head()
        if wire.h11.their_state is h11.IDLE and not wire.has_pending_input():
            # A keep-alive connection between requests: idle time is allowed, up to idle_timeout. The head
            # clock (head_timeout) starts with the first byte of the next request.
            with trio.move_on_after(self.limits.idle_timeout) as idle:
                self._idle_scope, self.idle_since = idle, trio.current_time()
                try:
                    await wire.receive_more()
                finally:
                    self._idle_scope = self.idle_since = None
            if self.reclaimed or not wire.has_pending_input():
                return None  # idle too long, or reclaimed: close quietly
        try:
            event = wire.head_event_nowait()
            if event is h11.NEED_DATA:  # the head is not all here yet: from now on it has head_timeout
                with trio.fail_after(self.limits.head_timeout):
                    event = await wire.next_head_event()
        except trio.TooSlowError:
            # Errors before an exchange starts carry no request id.
            await send_error(wire, 408, "request head not received in time", None, close=True)
            return None
        except h11.RemoteProtocolError as exc:
            status = exc.error_status_hint
            reason = "request head too large" if status == 431 else f"malformed request: {exc}"
            await send_error(wire, status, reason, None, close=True)
            return None
        if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
            return None
        if not isinstance(event, h11.Request):
            return None
        wire.head_judged()
        return event

    # -- one exchange ------------------------------------------------------------------------------

    async def _exchange(self, request: h11.Request) -> Then:
        started = trio.current_time()
        request_id = pick_request_id(request.headers.raw_items())
        if self._trusted is not None:
            forwarded = [value for name, value in request.headers if name == b"x-forwarded-for"]
            self._client = self._trusted.client_of(forwarded, self._client_ip)
        capture = None
        if self.inspector is not None:
            capture = self.inspector.begin(
                "relay", request.method, request.target, request.headers.raw_items(),
                request_id=request_id, client=self._client,
            )  # fmt: skip
        ready = self._prepare(request, request_id)
        if isinstance(ready, ErrorReply):
            result = await reply(self.wire, ready, request_id)
        else:
            result = await Exchange(self, request, ready, request_id, capture).run()
        self._log(request, result, started, request_id, capture)
        return result.then

    def _prepare(self, request: h11.Request, request_id: str) -> Plan | ErrorReply:
        """Check, plan and admit the request (no I/O); or the refusal it gets."""
        error = check_request(request, self.limits)
        if error is not None:
            return error
        body = has_body(request)
        if not body:
            # h11 yields a bodiless request's EndOfMessage as a separate event, with no data needed. Take it
            # now: left pending, the client would still be in SEND_BODY when the response ends, and the
            # keep-alive connection could not start its next cycle (it would be closed after every GET).
            self.wire.h11.next_event()
        self.wire.chunked = transfer_encoded(request.headers)
        plan = plan_request(
            request, self._router, body=body, client_ip=self._client_ip, scheme=self._scheme,
            request_id=request_id,
        )  # fmt: skip
        if isinstance(plan, ErrorReply):
            return plan
        return self._admit() or plan

    def _admit(self) -> ErrorReply | None:
        """The limits shared with other clients: the offender alone gets 429/503 (Retry-After), others go on."""
        refused = self._exchanges.acquire(self._client)
        if refused is not None:
            return ErrorReply(
                429, "too many concurrent requests from your address", close=False, retry_after=True
            )
        self._holds_slot = self._client
        budget = self.limits.max_buffered_bytes
        if budget is not None:
            buffered = sum(mux.buffered_bytes for mux in self._router.agents)
            if buffered > budget:
                log.warning("buffered stream data %d > budget %d: refusing new exchanges", buffered, budget)
                return ErrorReply(
                    503, "the relay is short of memory, try again later", close=False, retry_after=True
                )
        return None

    def _release_exchange_slot(self) -> None:
        if self._holds_slot is not None:
            self._exchanges.release(self._holds_slot)
            self._holds_slot = None

    def _log(
        self, request: h11.Request, result: Result, started: float, request_id: str, capture: Capture | None
    ) -> None:
        path = request.target.split(b"?", 1)[0].decode("ascii", "replace")
        status, bytes_in, bytes_out = result.status, result.bytes_in, result.bytes_out
        access = Access(
            method=request.method.decode("ascii", "replace"),
            path=path,
            status=status,
            bytes_in=bytes_in,
            bytes_out=bytes_out,
            duration_ms=round((trio.current_time() - started) * 1000, 3),
            request_id=request_id,
            note=result.note,
        )
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
        if capture is not None:
            capture.finish(access)
