"""The relay's HTTP/1.1 side: one task per client connection, one stream per exchange.

Each request head is checked (version, framing, size), stripped of hop-by-hop headers, given X-Forwarded-* and
Via, and sent as an OPEN to the least-loaded agent. Its body and the response are then pumped concurrently in
both directions with flow control end to end: nothing is buffered whole, and a slow client only slows its own
stream. Pipelined requests are read one at a time (h11 pauses after each), so they are answered in order.
"""

from __future__ import annotations

import dataclasses
import logging

import h11
import trio

from protocol import ErrorCode, RequestHead

from .mux import MuxStream, StreamReset
from .proxyheaders import add_forwarding, strip_hop_by_hop
from .registry import AgentRegistry, NoAgentAvailable

log = logging.getLogger("rtunnel.relay")
access_log = logging.getLogger("rtunnel.relay.access")

READ_SIZE = 65536
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})


@dataclasses.dataclass(frozen=True)
class HttpLimits:
    max_head_size: int = 32 * 1024
    max_header_count: int = 200
    head_timeout: float = 30.0  # time to receive a whole request head (slowloris)
    idle_timeout: float = 75.0  # keep-alive connection with no request in progress
    max_body_size: int | None = None  # None: unlimited (streamed, so no memory cost)


class _ClientGone(Exception):
    """The client closed or broke its connection."""


class _Abort(Exception):
    """The response cannot be completed honestly: drop the client connection without finishing it."""


class ClientConnection:
    """One client TCP connection on the relay's HTTP listener."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        registry: AgentRegistry,
        limits: HttpLimits,
        *,
        client_ip: str,
        scheme: str = "http",
    ) -> None:
        self._stream = stream
        self._registry = registry
        self._limits = limits
        self._client_ip = client_ip
        self._scheme = scheme
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_head_size)

    async def serve(self) -> None:
        try:
            while True:
                request = await self._next_request()
                if request is None:
                    return
                keep_going = await self._exchange(request)
                if not keep_going or not self._start_next_cycle():
                    return
        except (_ClientGone, _Abort):
            return

    # -- reading -----------------------------------------------------------------------------------

    async def _receive_more(self) -> None:
        try:
            data = await self._stream.receive_some(READ_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            raise _ClientGone from None
        if not data:
            raise _ClientGone  # a client that closes before its exchange is done has abandoned it
        self._h11.receive_data(bytes(data))

    async def _next_event(self) -> h11.Event | type[h11.PAUSED]:
        while True:
            event = self._h11.next_event()
            if event is h11.NEED_DATA:
                await self._receive_more()
                continue
            return event  # type: ignore[return-value]

    async def _next_request(self) -> h11.Request | None:
        first = self._h11.their_state is h11.IDLE and not self._h11.trailing_data[0]
        timeout = self._limits.idle_timeout if first else self._limits.head_timeout
        try:
            with trio.fail_after(timeout):
                event = await self._next_event()
                # The head clock starts once the client starts sending; idle time before is allowed.
        except trio.TooSlowError:
            if self._h11.their_state is h11.IDLE and not self._h11.trailing_data[0]:
                return None  # idle keep-alive connection: close quietly
            await self._send_error(408, "request head not received in time")
            return None
        except h11.RemoteProtocolError as exc:
            status = exc.error_status_hint
            reason = "request head too large" if status == 431 else f"malformed request: {exc}"
            await self._send_error(status, reason)
            return None
        if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
            return None
        if not isinstance(event, h11.Request):
            return None
        return event

    # -- one exchange ------------------------------------------------------------------------------

    async def _exchange(self, request: h11.Request) -> bool:
        started = trio.current_time()
        problem = self._check_request(request)
        if problem is not None:
            status, reason = problem
            await self._send_error(status, reason, close=True)
            self._log(request, status, 0, 0, started)
            return False
        has_body = self._has_body(request)
        head = self._build_head(request)
        attempt = 0
        while True:
            attempt += 1
            try:
                _, stream = await self._registry.open_exchange(head, end_stream=not has_body)
            except NoAgentAvailable as exc:
                await self._send_error(503, f"no agent available: {exc}", retry_after=True)
                self._log(request, 503, 0, 0, started)
                return self._h11.their_state is h11.DONE
            outcome = await self._run_exchange(request, stream, has_body)
            stream.close()
            if outcome.retry and attempt < 3:
                log.info("retrying %s on another agent: %s", request.method.decode(), outcome.why)
                continue
            if not outcome.head_sent and not outcome.abort:
                if outcome.body_error is not None:
                    status, reason = outcome.body_status, outcome.body_error
                else:
                    status, reason = outcome.pending_error or (502, "the agent sent no response")
                await self._send_error(status, reason, close=True)
                outcome.status = status
            self._log(request, outcome.status, outcome.bytes_in, outcome.bytes_out, started)
            if outcome.abort:
                raise _Abort
            return outcome.keep_alive

    async def _run_exchange(self, request: h11.Request, stream: MuxStream, has_body: bool) -> _Outcome:
        outcome = _Outcome()
        wants_continue = self._h11.they_are_waiting_for_100_continue
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._request_side, stream, outcome, has_body)
            try:
                await self._relay_response(request, stream, outcome, wants_continue)
            except StreamReset as exc:
                self._on_reset(request, exc, outcome, has_body)
            except _ClientGone:
                stream.reset(ErrorCode.CANCEL)
                outcome.abort = True
                outcome.status = 499
            nursery.cancel_scope.cancel()
        if outcome.client_gone:
            stream.reset(ErrorCode.CANCEL)
            outcome.abort = True
        return outcome

    def _on_reset(self, request: h11.Request, exc: StreamReset, outcome: _Outcome, has_body: bool) -> None:
        if outcome.head_sent:
            # Part of the response is out: the only honest signal left is to break the connection.
            outcome.abort = True
            return
        body_untouched = not has_body or outcome.bytes_in == 0
        # SPEC 10: never processed -> always safe; possibly processed -> only an idempotent request whose
        # link died (not one the agent failed on purpose), since nothing of the response reached the client.
        lost_link = not exc.remote and exc.error_code is ErrorCode.CANCEL
        safe = exc.retryable or (request.method in IDEMPOTENT and lost_link)
        if safe and body_untouched:
            outcome.retry = True
            outcome.why = str(exc)
            return
        outcome.pending_error = (502, f"the agent's connection was lost: {exc}")

    async def _request_side(self, stream: MuxStream, outcome: _Outcome, has_body: bool) -> None:
        if has_body:
            await self._pump_request_body(stream, outcome)
        if outcome.client_gone or outcome.body_error is not None:
            return
        # Keep reading while the response is awaited, only to notice a client that goes away (a long poll
        # whose client left must not keep the upstream busy). Pipelined bytes go to h11's buffer, up to a
        # bound, and are parsed in the next cycle.
        try:
            while len(self._h11.trailing_data[0]) <= self._limits.max_head_size:
                await self._receive_more()
        except _ClientGone:
            outcome.client_gone = True
            stream.reset(ErrorCode.CANCEL)
            return
        await trio.sleep_forever()

    async def _pump_request_body(self, stream: MuxStream, outcome: _Outcome) -> None:
        limit = self._limits.max_body_size
        try:
            while True:
                try:
                    event = await self._next_event()
                except h11.RemoteProtocolError as exc:
                    outcome.body_error = f"malformed request body: {exc}"
                    stream.reset(ErrorCode.CANCEL)
                    return
                if isinstance(event, h11.Data):
                    outcome.bytes_in += len(event.data)
                    if limit is not None and outcome.bytes_in > limit:
                        outcome.body_error = "request body too large"
                        outcome.body_status = 413
                        stream.reset(ErrorCode.CANCEL)
                        return
                    await stream.send_data(event.data)
                elif isinstance(event, h11.EndOfMessage):
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
        except _ClientGone:
            outcome.client_gone = True
            stream.reset(ErrorCode.CANCEL)
        except StreamReset:
            return  # the response side reports it; the agent may have answered without the body

    async def _relay_response(
        self, request: h11.Request, stream: MuxStream, outcome: _Outcome, wants_continue: bool
    ) -> None:
        while True:
            head = await stream.receive_reply()
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
            # Protocol switches are not tunnelled yet (the agent answers 502 for them).
            raise StreamReset(
                ErrorCode.PROTOCOL_ERROR, remote=True, retryable=False, reason="101 unsupported"
            )
        # The agent already stripped hop-by-hop headers and added Via; strip again since the agent is not trusted.
        headers = strip_hop_by_hop(list(head.headers))
        await self._send(h11.Response(status_code=head.status, headers=headers, reason=head.reason))
        outcome.head_sent = True
        outcome.status = head.status
        while True:
            chunk = await stream.receive_data(READ_SIZE)
            if not chunk:
                break
            outcome.bytes_out += len(chunk)
            await self._send(h11.Data(data=chunk))
        trailers = stream.trailers or ()
        await self._send(h11.EndOfMessage(headers=list(trailers)))
        outcome.keep_alive = True

    # -- helpers -----------------------------------------------------------------------------------

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

    def _build_head(self, request: h11.Request) -> RequestHead:
        raw = list(request.headers.raw_items())
        host = next((value for name, value in raw if name.lower() == b"host"), None)
        headers = strip_hop_by_hop(raw)
        headers = add_forwarding(headers, client_ip=self._client_ip, proto=self._scheme, host=host)
        return RequestHead(request.method, request.target, tuple(headers))

    async def _send(self, event: h11.Event) -> None:
        data = self._h11.send(event)
        if data:
            try:
                await self._stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                raise _ClientGone from None

    async def _send_error(
        self, status: int, reason: str, *, close: bool = False, retry_after: bool = False
    ) -> None:
        if self._h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        body = (reason + "\n").encode()
        headers: list[tuple[bytes, bytes]] = [
            (b"Content-Type", b"text/plain; charset=utf-8"),
            (b"Content-Length", str(len(body)).encode()),
        ]
        if retry_after:
            headers.append((b"Retry-After", b"5"))
        if close or self._h11.their_state not in (h11.DONE, h11.IDLE):
            headers.append((b"Connection", b"close"))
        try:
            await self._send(h11.Response(status_code=status, headers=headers))
            await self._send(h11.Data(data=body))
            await self._send(h11.EndOfMessage())
        except (_ClientGone, h11.LocalProtocolError):
            pass

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
        access_log.info(
            "%s %s %s %d in=%d out=%d %.1fms",
            self._client_ip,
            request.method.decode("ascii", "replace"),
            path,
            status,
            bytes_in,
            bytes_out,
            (trio.current_time() - started) * 1000,
        )


@dataclasses.dataclass
class _Outcome:
    status: int = 502
    bytes_in: int = 0
    bytes_out: int = 0
    head_sent: bool = False
    keep_alive: bool = False
    abort: bool = False
    retry: bool = False
    why: str = ""
    client_gone: bool = False
    body_error: str | None = None
    body_status: int = 400
    pending_error: tuple[int, str] | None = None
