"""One exchange on the relay: a planned request (request.py) sent to an agent as a stream, its response relayed
back, sent again when the retry rule allows (retry.py), and its end as a `Result` (outcome.py).

Its request body and the response are pumped concurrently in both directions (pumps.py) with flow control
end to end: nothing is buffered whole, and a slow client only slows its own stream.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING, TypeVar

import h11
import trio

from protocol import ErrorCode, HeadNotEncodable

from ..http.proxyheaders import strip_hop_by_hop
from ..http.replay import ReplayBuffer
from ..link.mux import Multiplexer, MuxStream, StreamReset
from ..ops.inspector import Capture
from ..ops.logs import with_request_id
from .outcome import ErrorReply, Result, Retry, Then
from .pumps import (
    CLIENT_LEFT,
    Attempt,
    Stage,
    pump_response_body,
    pump_switched,
    request_side,
    take_arrived,
    trailers_carried,
)
from .registry import NoAgentAvailable
from .replies import reply
from .request import Plan, unencodable
from .retry import MAX_ATTEMPTS, MAX_POSSIBLY_PROCESSED, on_reset
from .wire import ClientGone

if TYPE_CHECKING:
    from .connection import ClientConnection

__all__ = ["WATCH_AFTER", "Exchange"]

log = logging.getLogger("rtunnel.relay")

# A bodiless exchange runs in the connection's own task, without a second one watching the client: a nursery,
# a task and its cancellation cost about as much as the rest of a small exchange. One still running after this
# long (a long poll, a slow upstream, a streamed response) starts the watcher then, so a client that leaves is
# noticed at most this much later than with a watcher from the start.
WATCH_AFTER = 0.25

_T = TypeVar("_T")


class Exchange:
    """One request of a client connection, from its plan to its Result (which the connection logs)."""

    # Slots: one of these lives as long as its exchange, a held long poll's too.
    __slots__ = (
        "_attempt",
        "_capture",
        "_conn",
        "_plan",
        "_request",
        "_request_id",
        "_stream",
        "_watch_at",
        "_watch_error",
        "_watcher",
        "_wire",
    )

    def __init__(
        self,
        conn: ClientConnection,
        request: h11.Request,
        plan: Plan,
        request_id: str | None,
        capture: Capture | None,
    ) -> None:
        self._conn = conn
        self._wire = conn.wire
        self._request = request
        self._plan = plan
        self._request_id = request_id
        self._capture = capture
        # A bodiless attempt's stream and state, for a watcher started late (see WATCH_AFTER).
        self._stream: MuxStream | None = None
        self._attempt: Attempt | None = None
        self._watch_at: float | None = None  # a bodiless attempt's time to start watching the client
        self._watcher: tuple[trio.CancelScope, trio.Event] | None = None  # (its scope, set once it ended)
        self._watch_error: Exception | None = None  # the watcher's unexpected failure, raised by the attempt

    async def run(self) -> Result:
        """Attempts until one ends in a Result, the retry rule says no more, or no agent is left."""
        plan = self._plan
        # An upgrade request's direction stays open after its empty body: once switched, it carries the
        # client's bytes.
        end_stream = not plan.has_body and plan.offer is None
        replay = ReplayBuffer()
        attempt = possibly_processed = 0
        mux: Multiplexer | None = None  # the agent of the previous attempt
        while True:
            attempt += 1
            try:
                mux, stream = await plan.route.registry.open_exchange(
                    plan.head, end_stream=end_stream, avoid=mux
                )
                if self._capture is not None:
                    stream = self._capture.tap(stream, mux.name)
            except NoAgentAvailable as exc:
                what = "no agent available" if plan.route.tunnel is None else f"tunnel {plan.route.tunnel!r}"
                error = ErrorReply(503, f"{what}: {exc}", close=False, retry_after=True)
                return await reply(self._wire, error, self._request_id)
            except HeadNotEncodable as exc:  # over the MAX_HEAD_SIZE of the agent picked
                return await reply(self._wire, unencodable(exc), self._request_id)
            try:
                end = await self._attempt_on(stream, mux, replay)
            finally:
                stream.close()  # on every path: an open stream would skew routing and the memory budget
            if isinstance(end, Retry):
                possibly_processed += end.maybe_processed
                if attempt < MAX_ATTEMPTS and possibly_processed < MAX_POSSIBLY_PROCESSED:
                    # open_exchange waits up to --agent-wait: this covers "the only agent is reconnecting" too.
                    method = self._request.method.decode()
                    log.info("retrying %s (attempt %d): %s", method, attempt + 1, end.why)
                    continue
                end = ErrorReply(502, f"gave up after {attempt} attempts: {end.why}", bytes_in=end.bytes_in)
            if isinstance(end, ErrorReply):
                return await reply(self._wire, end, self._request_id)
            return end

    async def _attempt_on(
        self, stream: MuxStream, mux: Multiplexer, replay: ReplayBuffer
    ) -> Result | Retry | ErrorReply:
        attempt = Attempt()
        plan = self._plan
        upgrade = plan.offer is not None
        wants_continue = self._wire.h11.they_are_waiting_for_100_continue
        if not plan.has_body and not upgrade:
            self._stream, self._attempt = stream, attempt
            self._watch_at = trio.current_time() + WATCH_AFTER
            try:
                end = await self._respond(stream, attempt, wants_continue, False, mux, replay)
            finally:
                self._watch_at = self._stream = self._attempt = None
                watcher, self._watcher = self._watcher, None
                if watcher is not None:
                    watcher[0].cancel()
            if watcher is not None:
                await watcher[1].wait()  # it no longer reads from the client: the next request is ours
                if self._watch_error is not None:
                    error, self._watch_error = self._watch_error, None
                    raise error
            return await self._conclude(stream, attempt, end)
        limits = self._conn.limits
        async with trio.open_nursery() as nursery:
            nursery.start_soon(request_side, self._wire, stream, attempt, plan.has_body, replay, limits)
            end = await self._respond(stream, attempt, wants_continue, upgrade, mux, replay)
            nursery.cancel_scope.cancel()
        return await self._conclude(stream, attempt, end)

    async def _respond(
        self,
        stream: MuxStream,
        attempt: Attempt,
        wants_continue: bool,
        upgrade: bool,
        mux: Multiplexer,
        replay: ReplayBuffer,
    ) -> Then | Retry | ErrorReply:
        """_relay_response, with the ways it fails turned into what they come to."""
        try:
            return await self._relay_response(stream, attempt, wants_continue, upgrade)
        except StreamReset as exc:
            return self._on_reset(exc, attempt, replay, mux.is_closed)
        except h11.LocalProtocolError as exc:
            # The agent's head or trailers are not valid HTTP/1.1 (e.g. CR LF in a header value).
            stream.reset(ErrorCode.PROTOCOL_ERROR)
            bad = StreamReset(ErrorCode.PROTOCOL_ERROR, remote=False, retryable=False, reason=str(exc))
            return self._on_reset(bad, attempt, replay, False)
        except ClientGone:
            stream.reset(ErrorCode.CANCEL)
            attempt.status = 499
            return Then.ABORT

    def _on_reset(
        self, exc: StreamReset, attempt: Attempt, replay: ReplayBuffer, link_gone: bool
    ) -> Then | Retry | ErrorReply:
        return on_reset(
            self._request.method,
            exc,
            head_sent=attempt.stage >= Stage.HEAD_SENT,
            replied=attempt.stage >= Stage.REPLIED,
            request_failed=attempt.failed is not None,
            body_lost=self._plan.has_body and replay.overflow,
            link_gone=link_gone,
        )

    async def _conclude(
        self, stream: MuxStream, attempt: Attempt, end: Then | Retry | ErrorReply
    ) -> Result | Retry | ErrorReply:
        """What the attempt came to, once both of its sides are done."""
        failed = attempt.failed
        if failed is CLIENT_LEFT:
            stream.reset(ErrorCode.CANCEL)
            # The client left first: not a 502, which would blame the agent.
            status = attempt.status if attempt.stage >= Stage.HEAD_SENT else 499
            return Result(status, attempt.bytes_in, attempt.bytes_out, Then.ABORT)
        if attempt.stage is Stage.SWITCHED:
            ended_cleanly = await pump_switched(self._wire, stream, attempt)
            then = Then.CLOSE if ended_cleanly else Then.ABORT
            return Result(101, attempt.bytes_in, attempt.bytes_out, then)
        if isinstance(end, Retry):
            return end._replace(bytes_in=attempt.bytes_in)
        if isinstance(end, ErrorReply):
            # The client's own failure (its body refused) is the answer it gets, rather than the reset's.
            return (failed or end)._replace(bytes_in=attempt.bytes_in)
        return Result(attempt.status, attempt.bytes_in, attempt.bytes_out, end)

    async def _relay_response(
        self, stream: MuxStream, attempt: Attempt, wants_continue: bool, upgrade: bool
    ) -> Then:
        wire = self._wire
        while True:
            head = await self._from_agent(stream.receive_reply)
            if not head.is_interim:
                break
            if head.status == 100 and not wants_continue:
                continue
            if head.status == 100:
                wants_continue = False
            await wire.send(
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
            switch = h11.InformationalResponse(status_code=101, headers=headers, reason=head.reason)
            attempt.stage = Stage.SWITCHING
            await wire.send(switch)
            attempt.stage = Stage.SWITCHED
            attempt.status = 101
            return Then.CLOSE  # the caller stops reading HTTP from the client and pumps raw bytes
        if upgrade:
            # Declined (SPEC 5.5): end our direction, which stayed open for a switch, and go on as HTTP. A
            # reset here shows up in the response's own reads.
            with contextlib.suppress(StreamReset):
                await stream.send_end()
        # The agent already stripped hop-by-hop headers and added Via; strip again since the agent is not trusted.
        headers = with_request_id(strip_hop_by_hop(list(head.headers)), self._request_id)
        if self._conn.draining:
            headers.append((b"Connection", b"close"))  # the relay is shutting down: no next request here
        response = h11.Response(status_code=head.status, headers=headers, reason=head.reason)
        attempt.stage = Stage.REPLIED
        arrived = take_arrived(stream)  # a reset behind the head raises here, while a 502 is still possible
        pending: list[bytes | None] = [wire.h11.send(response)]
        attempt.stage = Stage.HEAD_SENT
        attempt.status = head.status
        carries = partial(
            trailers_carried, self._request.method, head.status, headers, wire.h11.their_http_version
        )
        await pump_response_body(
            wire, stream, attempt, pending, arrived, self._from_agent, carries_trailers=carries
        )
        return Then.NEXT

    # -- the late watcher of a bodiless exchange ---------------------------------------------------

    async def _from_agent(self, receive: Callable[[], Awaitable[_T]]) -> _T:
        """Wait for the agent (`receive`); in a bodiless exchange that takes longer than WATCH_AFTER, start
        watching the client first (see WATCH_AFTER)."""
        watch_at = self._watch_at
        if watch_at is None:
            return await receive()
        with trio.move_on_at(watch_at):
            return await receive()  # both receives are cancel-safe: nothing is lost when the deadline fires
        self._watch_at = None
        self._start_watcher()
        return await receive()

    def _start_watcher(self) -> None:
        nursery = self._conn.watchers
        assert nursery is not None and self._watcher is None
        assert self._stream is not None and self._attempt is not None
        self._watcher = scope, ended = trio.CancelScope(), trio.Event()
        # A method, not a closure: its arguments live in the coroutine's frame, with no function or cells.
        nursery.start_soon(self._watch, self._stream, self._attempt, scope, ended)

    async def _watch(
        self, stream: MuxStream, attempt: Attempt, scope: trio.CancelScope, ended: trio.Event
    ) -> None:
        try:
            with scope:
                await request_side(self._wire, stream, attempt, False, ReplayBuffer(), self._conn.limits)
        except Exception as exc:  # in the relay's nursery it must not end every other connection
            self._watch_error = exc
        finally:
            ended.set()
