"""The agent side of one HTTP exchange: a tunnel stream in, an upstream HTTP/1.1 request out (SPEC.md 5.4).

`ExchangeHandler` is the mux's handler for every stream the relay opens. Per stream it checks the allowlist
itself (the relay is not trusted to have done so), forwards exactly the normalized target, streams the
request body to the upstream while it streams the response back, and maps every upstream failure to a
status the client can act on:

* no connection (refused, DNS, unreachable): 502; connect timeout or no response head in time: 504;
* the upstream broke before the final response head: 502 with the reason as a text/plain body;
* the upstream broke after the final REPLY was sent: RESET(INTERNAL_ERROR), so the truncated body can never
  look complete.

A protocol switch (SPEC.md 5.5: `Connection: upgrade` + `Upgrade`, no body) is forwarded with its Upgrade
header; if the upstream answers 101, the stream and the upstream connection carry raw bytes both ways
(rtunnel.http.passthrough) until both sides have closed, and the connection is never pooled again.

The request body and the response run concurrently, because an upstream may answer (e.g. 413, 401, or an
echo) before it has read the whole body; sending the body first could then deadlock.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Awaitable, Callable
from typing import Final

import h11
import trio

from protocol import ErrorCode, LocalProtocolError, RequestHead, ResponseHead

from ..http.bridge import (
    BODY_METHODS,
    READ_SIZE,
    bodiless,
    end_body,
    parse_content_length,
    transfer_encoded,
    without_content_length,
)
from ..http.passthrough import pump, upgrade_offer, with_upgrade
from ..http.proxyheaders import Header, response_headers_for_client, strip_hop_by_hop
from ..http.replay import IDEMPOTENT, ReplayBuffer
from ..http.replies import phrase, plain_text
from ..link.mux import MuxStream, StreamReset
from ..ops.inspector import Capture, Inspector
from ..ops.logs import Access, AccessLog, request_id_of
from .allowlist import Allowlist
from .upstream import (
    UpstreamBroken,
    UpstreamConnectError,
    UpstreamConnection,
    UpstreamPool,
    UpstreamStalled,
    parse_upstream_url,
)

__all__ = ["ExchangeHandler"]

log = logging.getLogger("rtunnel.agent")
access_log = AccessLog("rtunnel.agent.access")

_MAX_REASON: Final = 255
# The relay holds at most 64 unread interim heads per stream (mux.MAX_PENDING_REPLIES); stay below it.
MAX_INTERIM_RESPONSES: Final = 32
# Host as a plain host[:port]: a DNS name or IPv4 address, or an IPv6 literal in brackets, and up to five port
# digits. RFC 9110 7.2 allows more (percent-encodings, sub-delims, IPvFuture), but an upstream that builds its URL
# as "http://" + Host + target could then act on another authority or path than the allowlist checked
# ("127.0.0.1%2fadmin", "evil.example:80:90").
_PLAIN_HOST: Final = re.compile(
    rb"(?:[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*\.?|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?"
)
# Headers some frameworks honour to replace the method or the path after routing (Symfony, Express's
# method-override, IIS URL rewrite): through a restricted agent they would run what the allowlist never checked.
_OVERRIDE_HEADERS: Final = frozenset(
    {b"x-http-method-override", b"x-http-method", b"x-method-override", b"x-original-url", b"x-rewrite-url"}
)


class _RequestBody:
    """The request body as read from the stream, with the first REPLAY_LIMIT bytes kept for a retry
    (http/replay.py).

    Each attempt reads it from index 0: held chunks first, then fresh ones from the relay.
    """

    def __init__(self, stream: MuxStream) -> None:
        self._stream = stream
        self._replay = ReplayBuffer()
        self._replay.complete = stream.at_eof
        self._taken = 0  # chunks taken from the relay

    @property
    def replayable(self) -> bool:
        return not self._replay.overflow

    @property
    def ended(self) -> bool:
        return self._replay.complete

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

    @property
    def trailers(self) -> list[Header]:
        return list(self._stream.trailers or ())


class _Attempt:
    """One try of the exchange on one upstream connection."""

    def __init__(self, conn: UpstreamConnection, response_timeout: float) -> None:
        self.conn = conn
        self.response_timeout = response_timeout
        # Covers the wait for the final response head; its deadline is set once the request is fully sent
        # (an upload may legitimately take longer than response_timeout).
        self.head_scope = trio.CancelScope()
        self.timed_out = ""
        self.failure: UpstreamBroken | None = None
        self.relay_body_error = ""
        self.interim_sent = False
        self.final_received = False
        self.complete = False
        self.switched = False  # the upstream answered 101: raw bytes from here on

    def request_sent(self) -> None:
        if self.head_scope.deadline == math.inf:
            self.head_scope.deadline = trio.current_time() + self.response_timeout


class _Exchange:
    """State of one stream's exchange, shared by its tasks; also what the access log reports."""

    def __init__(self, handler: ExchangeHandler, stream: MuxStream, head: RequestHead) -> None:
        self.handler = handler
        self.stream = stream
        self.head = head
        self.method = head.method
        self.log_path = _log_path(head.target)
        self.status: int | None = None
        self.note = ""
        self.reason = ""  # the text of a response the agent made itself (the dashboard's refusals)
        self.relay_reset: StreamReset | None = None
        self.finished = False  # our direction is complete or we reset it ourselves
        self.content_length: int | None = None  # framing of the upstream request body
        self.chunked = False
        self.upgrade = False  # a protocol-switch request (SPEC 5.5), forwarded with its Upgrade header

    # -- entry ---------------------------------------------------------------------------------------

    async def run(self) -> None:
        handler = self.handler
        head = self.head
        decision = handler.allowlist.check(head.method, head.target)
        if decision.target is not None:
            self.log_path = _log_path(decision.target)
        if not decision.allowed:
            what = f"{head.method.decode('latin-1')} {self.log_path}"
            if decision.status == 403:
                text = f"rtunnel agent: {what} is not allowed here ({decision.reason})\n"
            else:
                text = f"rtunnel agent: request refused: {decision.reason}\n"
            self.note = "denied"
            await self.reply_error(decision.status, text)
            return
        assert decision.target is not None
        prepared = self.prepare_headers()
        if isinstance(prepared, str):
            self.note = "bad request"
            await self.reply_error(400, f"rtunnel agent: {prepared}\n")
            return
        headers, content_length, chunked_hint = prepared
        if handler.app_call is not None:  # an in-process app (rtunnel.agent.apps) takes it from here
            await handler.app_call(self, decision.target, headers, content_length)
            return
        body = _RequestBody(self.stream)
        # An upgrade request has no body, and the relay keeps its direction open for the switched
        # protocol: peeking for a body there would wait for bytes that come only after a 101.
        has_body = not self.upgrade and await self.decide_body(body, headers, content_length, chunked_hint)
        try:
            request = h11.Request(method=head.method, target=decision.target, headers=headers)
        except h11.LocalProtocolError as exc:
            self.note = "bad request"
            await self.reply_error(400, f"rtunnel agent: invalid request head: {exc}\n")
            return

        for attempt in (1, 2):
            try:
                # The retry takes a new connection: another idle one may be just as stale.
                conn = await handler.pool.acquire(fresh=attempt == 2)
            except UpstreamConnectError as exc:
                self.note = "connect failed"
                log.warning("%s", exc.reason)
                await self.reply_error(exc.status, f"rtunnel agent: {exc.reason}\n")
                return
            retry = await self.attempt(conn, request, body if has_body else None, may_retry=attempt == 1)
            if not retry:
                return
            self.note = "retried"
            log.info("upstream closed a kept-alive connection; retrying %s on a new one", self.log_path)

    # -- request preparation ------------------------------------------------------------------------

    def prepare_headers(self) -> tuple[list[Header], int | None, bool] | str:
        """Upstream request headers, the Content-Length (None if absent) and whether the body is chunked
        by declaration; or a reason to answer 400."""
        raw = self.head.headers
        had_te = transfer_encoded(raw)
        # The relay already removed hop-by-hop headers; doing it again costs nothing and means a relay bug
        # cannot smuggle Connection/Transfer-Encoding through to the upstream. Upgrade is kept (with a single
        # Connection: upgrade) only for a bodiless protocol-switch request, h2c never (http/passthrough.py).
        has_length = any(
            name.lower() == b"content-length" and value.strip(b" \t") not in (b"0", b"")
            for name, value in raw
        )
        offer = None if had_te or has_length or self.method == b"CONNECT" else upgrade_offer(raw)
        self.upgrade = offer is not None
        headers = with_upgrade(raw, offer)
        lengths = [value for name, value in headers if name.lower() == b"content-length"]
        content_length: int | None = None
        if had_te:
            headers = without_content_length(headers)
        elif lengths:
            parsed = parse_content_length(lengths)
            if isinstance(parsed, str):
                return parsed
            content_length = parsed
        if not self.handler.allowlist.unrestricted:
            # Compared as CGI/WSGI-style servers read names: "_" and "-" alike, any case.
            override = next(
                (name for name, _ in headers if name.lower().replace(b"_", b"-") in _OVERRIDE_HEADERS), None
            )
            if override is not None:
                return f"{override.decode('latin-1')} is not accepted: it would bypass the allowlist"
        hosts = [value for name, value in headers if name.lower() == b"host"]
        if len(hosts) > 1:
            return "more than one Host header"
        if hosts and _PLAIN_HOST.fullmatch(hosts[0]) is None:
            return "invalid Host header"
        if not hosts:
            # HTTP/1.1 requires Host; an HTTP/1.0 client may have sent none.
            headers.insert(0, (b"Host", self.handler.address.authority))
        return headers, content_length, had_te

    async def decide_body(
        self, body: _RequestBody, headers: list[Header], content_length: int | None, chunked_hint: bool
    ) -> bool:
        """Frame the upstream request (edits `headers`); True if a body will be sent."""
        if content_length is not None:
            self.content_length = content_length
            return content_length > 0
        expects_continue = any(
            name.lower() == b"expect" and value.strip().lower() == b"100-continue" for name, value in headers
        )
        if body.ended:
            has_body = False
        elif expects_continue or chunked_hint:
            # A client that sent Expect waits for 100 before its body: peeking would wait for it forever.
            has_body = True
        else:
            # Without Content-Length the body length is unknown until END_STREAM: read the first chunk to
            # tell "no body" (END right away) from "a body of unknown length" (chunked).
            has_body = bool(await body.read(0))
        if has_body:
            self.chunked = True
            headers.append((b"Transfer-Encoding", b"chunked"))
        elif self.method in BODY_METHODS:
            headers.append((b"Content-Length", b"0"))
        return has_body

    # -- one attempt -------------------------------------------------------------------------------------

    async def attempt(
        self, conn: UpstreamConnection, request: h11.Request, body: _RequestBody | None, *, may_retry: bool
    ) -> bool:
        """Run the exchange on `conn`; True if it should be retried on a fresh connection."""
        pool = self.handler.pool
        att = _Attempt(conn, self.handler.response_timeout)
        released = False
        try:
            try:
                if body is None:  # head and end in one write
                    await conn.send(request, h11.EndOfMessage(), stall_timeout=att.response_timeout)
                else:
                    await conn.send(request, stall_timeout=att.response_timeout)
            except UpstreamBroken as exc:
                att.failure = exc
            except UpstreamStalled as exc:
                att.timed_out = str(exc)
            else:
                if body is None:
                    att.request_sent()
                    await self.read_response(att)
                else:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self.send_body, att, body, nursery.cancel_scope)
                        await self.read_response(att)
                        # Response done or failed: a body still being sent is of no use any more.
                        nursery.cancel_scope.cancel()
            if self.relay_reset is not None:
                raise self.relay_reset
            if att.switched:
                await self.passthrough(conn)
                return False
            if att.complete:
                pool.release(conn)
                released = True
                return False
            if att.relay_body_error:
                # The relay's body did not match its own Content-Length: the relay broke the protocol.
                self.note = f"bad request body: {att.relay_body_error}"
                self.reset(ErrorCode.PROTOCOL_ERROR)
                return False
            if att.final_received:
                self.note = (
                    f"upstream failed mid-body: {att.failure.reason if att.failure else att.timed_out}"
                )
                log.warning("%s %s: %s", self.method.decode("latin-1"), self.log_path, self.note)
                self.reset(ErrorCode.INTERNAL_ERROR)
                return False
            if att.timed_out:
                self.note = "upstream timeout"
                await self.reply_error(504, f"rtunnel agent: {att.timed_out}\n")
                return False
            assert att.failure is not None
            # A kept-alive connection the upstream had closed: an idempotent request goes again on a new one.
            if (
                may_retry
                and conn.reused
                and conn.bytes_received == 0
                and not att.interim_sent
                and self.method in IDEMPOTENT
                and (body is None or body.replayable)
            ):
                return True
            self.note = "upstream failed"
            log.warning("%s %s: %s", self.method.decode("latin-1"), self.log_path, att.failure.reason)
            await self.reply_error(502, f"rtunnel agent: {att.failure.reason}\n")
            return False
        finally:
            if not released:
                pool.discard(conn)

    async def send_body(self, att: _Attempt, body: _RequestBody, scope: trio.CancelScope) -> None:
        """Stream the request body to the upstream; failures are recorded on `att`, never raised."""
        conn = att.conn
        stall = att.response_timeout
        remaining = self.content_length
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
            trailers = strip_hop_by_hop(body.trailers) if self.chunked else []
            await conn.send(h11.EndOfMessage(headers=trailers), stall_timeout=stall)
            att.request_sent()
            if remaining == 0 and await body.read(index):
                # The whole declared length went out at once (so the upstream's answer need not wait for the
                # relay's END); anything beyond it means the relay framed the body wrongly.
                att.relay_body_error = "request body longer than its Content-Length"
                scope.cancel()
        except StreamReset as exc:
            self.relay_reset = exc
            scope.cancel()
        except h11.LocalProtocolError as exc:
            att.relay_body_error = str(exc)
            scope.cancel()
        except UpstreamStalled as exc:
            # Once the upstream has answered, it may ignore the rest of the body: only the response matters.
            if not att.final_received:
                att.timed_out = f"{exc} and sent no response"
                scope.cancel()
        except UpstreamBroken:
            # The upstream stopped reading (it may have answered early and closed): the response reader
            # sees what it sent, or the failure.
            pass
        finally:
            att.request_sent()

    async def read_response(self, att: _Attempt) -> None:
        """Forward the upstream's response; failures are recorded on `att`, never raised."""
        try:
            await self._read_response(att)
        except StreamReset as exc:
            self.relay_reset = exc
        except UpstreamBroken as exc:
            att.failure = exc

    async def _read_response(self, att: _Attempt) -> None:
        conn = att.conn
        stream = self.stream
        response: h11.Response | None = None
        interims = 0
        with att.head_scope:
            while response is None:
                event = await conn.next_event()
                if isinstance(event, h11.InformationalResponse) and event.status_code == 101:
                    # h11 accepts a 101 only in answer to our Upgrade: it ends HTTP on this connection.
                    kept = tuple(response_headers_for_client(event.headers.raw_items(), keep_upgrade=True))
                    try:
                        await self.stream.send_reply(ResponseHead(101, event.reason[:_MAX_REASON], kept))
                    except LocalProtocolError as exc:
                        raise UpstreamBroken(f"upstream 101 head cannot be forwarded: {exc}") from None
                    att.final_received = att.switched = True
                    self.status = 101
                    return
                if isinstance(event, h11.InformationalResponse):
                    interims += 1
                    if interims > MAX_INTERIM_RESPONSES:
                        # Interim heads are not flow-controlled: the relay resets a stream that piles them up.
                        raise UpstreamBroken(
                            f"upstream sent more than {MAX_INTERIM_RESPONSES} interim responses"
                        )
                    interim = tuple(strip_hop_by_hop(event.headers.raw_items()))
                    await self.send_head(ResponseHead(event.status_code, event.reason[:_MAX_REASON], interim))
                    att.interim_sent = True
                elif isinstance(event, h11.Response):
                    response = event
                else:
                    raise UpstreamBroken(f"upstream sent {type(event).__name__} before a response head")
        if response is None:
            att.timed_out = f"upstream sent no response within {att.response_timeout:g} s"
            return
        att.final_received = True
        raw = list(response.headers.raw_items())
        chunked = any(name == b"transfer-encoding" for name, _ in response.headers)
        headers = response_headers_for_client(raw)
        length: int | None = None
        if chunked:
            # The relay must not frame by a stale length.
            headers = without_content_length(headers)
        else:
            lengths = [value for name, value in response.headers if name == b"content-length"]
            length = int(lengths[0]) if lengths else None  # h11 validated and merged it
        status = response.status_code
        no_body = length == 0 or bodiless(self.method, status)
        head = ResponseHead(status, response.reason[:_MAX_REASON], tuple(headers))
        # The body bytes that arrived with the head go with it: a small response is then one message.
        data, end = (b"", None) if no_body else _received_body(conn)
        trailers = strip_hop_by_hop(end.headers.raw_items()) if end is not None else []
        try:
            await stream.send_reply(head, data=data, end_stream=no_body or (end is not None and not trailers))
        except LocalProtocolError as exc:
            # Not forwardable (e.g. a head over the tunnel's MAX_HEAD_SIZE): still nothing sent, so 502.
            att.final_received = False
            raise UpstreamBroken(f"upstream response head cannot be forwarded: {exc}") from None
        self.status = status
        if end is not None:
            if trailers:
                await stream.send_trailers(trailers)
            self.finished = True
            att.complete = True
            return
        while True:
            event = await conn.next_event()
            if isinstance(event, h11.Data):
                if not no_body:  # h11 frames HEAD/204/304 as empty; Content-Length 0 gives no Data either
                    await stream.send_data(event.data)
            elif isinstance(event, h11.EndOfMessage):
                if not no_body:
                    await end_body(stream, strip_hop_by_hop(event.headers.raw_items()))
                self.finished = True
                att.complete = True
                return
            else:
                raise UpstreamBroken(f"upstream sent {type(event).__name__} inside a response body")

    async def passthrough(self, conn: UpstreamConnection) -> None:
        """After a 101: copy raw bytes between the stream and the upstream until both have closed.

        No timeout applies (response_timeout covered the wait for the 101 only): an idle WebSocket lives as
        long as its two ends want. A RESET from the relay, or a broken upstream connection, aborts both."""
        data, _ = conn.h11.trailing_data  # the upstream's first bytes, read together with its 101
        pumped = await pump(self.stream, conn.stream, initial=data, what="upstream")
        self.finished = True
        if pumped.error is not None:
            self.note = f"switched protocol ended abnormally: {pumped.error}"
        else:
            self.note = "switched protocols"

    # -- replies to the relay ------------------------------------------------------------------------

    async def send_head(self, head: ResponseHead) -> None:
        """An interim head; one the tunnel cannot carry is dropped (interim heads are advisory)."""
        try:
            await self.stream.send_reply(head)
        except LocalProtocolError as exc:
            log.info("dropped an interim %d response: %s", head.status, exc)

    async def reply_error(self, status: int, text: str) -> None:
        """A complete response made by the agent (text/plain), e.g. 403 or 502."""
        self.reason = text.strip()
        body, headers = plain_text(text)
        head = ResponseHead(status, phrase(status), (*headers, (b"Cache-Control", b"no-store")))
        self.status = status
        await self.stream.send_reply(head, data=b"" if self.method == b"HEAD" else body, end_stream=True)
        self.finished = True

    def reset(self, code: ErrorCode) -> None:
        self.finished = True
        self.stream.reset(code)


def _received_body(conn: UpstreamConnection) -> tuple[bytes, h11.EndOfMessage | None]:
    """The response body bytes already received (up to READ_SIZE, without waiting) and its end if that
    arrived too."""
    pieces: list[bytes] = []
    size = 0
    while size < READ_SIZE and (event := conn.next_event_nowait()) is not None:
        if isinstance(event, h11.EndOfMessage):
            return b"".join(pieces), event
        if not isinstance(event, h11.Data):
            raise UpstreamBroken(f"upstream sent {type(event).__name__} inside a response body")
        pieces.append(event.data)
        size += len(event.data)
    return b"".join(pieces), None


def _log_path(target: bytes) -> str:
    """The path for the access log: no query (it may carry secrets), no raw control characters."""
    path = target.split(b"?", 1)[0][:512]
    return path.decode("latin-1").encode("unicode_escape").decode("ascii")


class ExchangeHandler:
    """The agent's handler for the streams the relay opens: one per agent process, shared by its links.

    `upstream_url` is ``http://host:port``. `response_timeout` bounds the wait for the response head after
    the request was sent, and any single stall while sending the request body. Start `run()` in a nursery
    to close idle connections on time; call `aclose()` at shutdown.
    """

    # Set by rtunnel.agent.apps.handler.AppExchangeHandler: an app run in-process takes each request that passed the
    # checks, instead of an upstream connection.
    app_call: Callable[[_Exchange, bytes, list[Header], int | None], Awaitable[None]] | None = None

    def __init__(
        self,
        upstream_url: str,
        allowlist: Allowlist,
        *,
        connect_timeout: float = 10,
        response_timeout: float = 60,
        max_idle_connections: int = 32,
        idle_timeout: float = 30,
    ) -> None:
        self.address = parse_upstream_url(upstream_url)
        self.allowlist = allowlist
        self.response_timeout = response_timeout
        self.on_exchange: Callable[[Access], None] | None = None  # each exchange's access record (metrics)
        self.inspector: Inspector | None = None  # --inspect: record each exchange (the one hook, __call__)
        self.pool = UpstreamPool(
            self.address,
            connect_timeout=connect_timeout,
            max_idle=max_idle_connections,
            idle_timeout=idle_timeout,
        )

    async def __call__(self, stream: MuxStream) -> None:
        head = stream.request_head
        if head is None:
            stream.reset(ErrorCode.PROTOCOL_ERROR)
            return
        started = trio.current_time()
        capture: Capture | None = None
        if self.inspector is not None:
            capture = self.inspector.begin(
                "agent", head.method, head.target, head.headers, request_id=request_id_of(head.headers)
            )
            stream = capture.tap(stream, stream.peer_name)
        exchange = _Exchange(self, stream, head)
        try:
            # The relay may abandon the stream while we wait on the upstream: cancel at once whatever we wait on.
            with trio.CancelScope() as scope:
                stream.cancel_on_reset(scope)
                try:
                    await exchange.run()
                except StreamReset as exc:
                    if exchange.relay_reset is None:
                        exchange.relay_reset = exc
            if scope.cancelled_caught and not exchange.finished and exchange.relay_reset is None:
                exchange.relay_reset = stream.error
        finally:
            access = self._log(exchange, stream, started)
            if capture is not None:
                capture.finish(access)

    def _log(self, exchange: _Exchange, stream: MuxStream, started: float) -> Access:
        note = exchange.note
        if exchange.relay_reset is not None:
            note = str(exchange.relay_reset)  # "stream reset (peer, CANCEL)", or the link's end
        elif not exchange.finished and not note:
            note = "cancelled"
        access = Access(
            method=exchange.method.decode("latin-1"),
            path=exchange.log_path,
            status=exchange.status,
            bytes_in=stream.bytes_received,
            bytes_out=stream.bytes_sent,
            duration_ms=round((trio.current_time() - started) * 1000, 3),
            # Set by the relay; sanitized: not trusted. Only the log shows it.
            request_id=request_id_of(exchange.head.headers) if (logged := access_log.enabled) else None,
            note=f"{note}: {exchange.reason}" if exchange.reason else note or None,
        )
        if logged:
            access_log.write(
                f"{access.method} {access.path} {access.status if access.status is not None else '-'} "
                f"in={access.bytes_in:d} out={access.bytes_out:d} {round(access.duration_ms):d}ms "
                f"id={access.request_id or '-'}{f' ({note})' if note else ''}",
                access,
                "note",
                note or None,
            )
        if self.on_exchange is not None:
            self.on_exchange(access)
        return access

    async def run(self) -> None:
        """Close idle upstream connections as they expire; runs until cancelled."""
        await self.pool.run()

    async def aclose(self) -> None:
        """Close the pooled connections (those in use close when their exchange ends)."""
        self.pool.close()
        await trio.lowlevel.checkpoint()
