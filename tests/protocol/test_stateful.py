"""Stateful property test of the protocol core: two honest Connections back to back (SPEC.md 6-10).

Hypothesis drives a relay (ACCEPTOR) and an agent (DIALER) through an in-memory wire per direction that it
chunks and delays at will, while both applications open streams, reply, send, half-close, send trailers,
reset, read slowly or not at all, ping and GOAWAY. A model of what each side sent on each stream checks every
event, and invariants check flow-control conservation and buffer bounds after every step. `teardown` then
finishes every stream and drains both wires: everything not reset must complete and no stream may leak.

White-box reads (kept to what SPEC 8 conservation needs, all read-only): `Connection._streams` (stream objects:
`send_window`, `recv_window`, `recv_unacked`, `recv_consumed`, `recv`), `Connection._conn.recv_consumed` (acked
but not yet credited connection octets) and `Connection._control` (queued WINDOW_UPDATEs, see `_wire.in_flight`).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

import hypothesis
import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from protocol import (
    Connection,
    DataReceived,
    ErrorCode,
    Event,
    FrameType,
    GoAwayReceived,
    HandshakeComplete,
    Headers,
    LocalProtocolError,
    PingAcknowledged,
    PingReceived,
    RemoteProtocolError,
    ReplyReceived,
    RequestHead,
    ResponseHead,
    Role,
    Settings,
    StreamEnded,
    StreamOpened,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from protocol._state import ENDED

from ._wire import Wire, in_flight, payload

RELAY, AGENT = "relay", "agent"
PEER = {RELAY: AGENT, AGENT: RELAY}
SIDES = st.sampled_from([RELAY, AGENT])
OUTBOUND_CAP = 32 * 1024  # like the runtime: queue more only while the stream's outbound buffer is below this

settings_strategy = st.builds(
    Settings,
    max_frame_size=st.sampled_from([1024, 1500, 4096, 16384]),
    # Mostly small windows, so that flow control bites within a few steps.
    initial_stream_window=st.one_of(
        st.sampled_from([1024, 1500, 4096]), st.integers(1024, 65536), st.just(262144)
    ),
    connection_window=st.one_of(
        st.sampled_from([2048, 3000, 8192]), st.integers(2048, 200_000), st.just(16 * 1024 * 1024)
    ),
    max_concurrent_streams=st.one_of(st.integers(1, 4), st.just(256)),
)
header_lists = st.lists(st.tuples(st.binary(min_size=1, max_size=8), st.binary(max_size=16)), max_size=3).map(
    tuple
)
request_heads = st.builds(
    RequestHead,
    method=st.sampled_from([b"GET", b"POST", b"PUT", b"get"]),
    target=st.binary(min_size=1, max_size=20),
    headers=header_lists,
)
final_statuses = st.sampled_from([101, 200, 204, 304, 404, 500, 999])
rarely = st.integers(0, 3).map(lambda n: n == 3)  # True about one time in four
sizes = st.one_of(st.integers(0, 4096), st.integers(4096, 70000), st.sampled_from([1024, 16384, 65536]))

T = TypeVar("T", bound=Callable[..., None])


def guarded(fn: T) -> T:
    """Mark the machine broken when a step fails, so `teardown` does not mask the original error."""

    @functools.wraps(fn)
    def wrapper(self: TwoPeers, *args: Any, **kwargs: Any) -> None:
        try:
            fn(self, *args, **kwargs)
        except BaseException:
            self.broken = True
            raise

    return wrapper  # type: ignore[return-value]


@dataclasses.dataclass
class Direction:
    """One direction of one stream: what the sending application did, what the receiving one got."""

    seed: int
    sent: bytearray = dataclasses.field(default_factory=bytearray)
    end_queued: bool = False  # the sender's application ended this direction (END_STREAM or TRAILERS)
    trailers: Headers | None = None
    replies: list[ResponseHead] = dataclasses.field(default_factory=list)  # responder -> initiator only
    final_reply_sent: bool = False
    received: int = 0
    replies_received: int = 0
    final_reply_received: bool = False
    trailers_received: bool = False
    ended: bool = False  # the receiver got StreamEnded
    unread: bytearray = dataclasses.field(default_factory=bytearray)  # receiver's application buffer
    stalled: bool = False


@dataclasses.dataclass
class StreamModel:
    stream_id: int
    initiator: str
    head: RequestHead
    dirs: dict[str, Direction]  # keyed by the sending side
    known: set[str]  # sides that have the stream (initiator at open, responder at StreamOpened)
    gone: set[str] = dataclasses.field(default_factory=set)  # sides where it was reset (locally or by event)
    reset_code: dict[str, ErrorCode] = dataclasses.field(default_factory=dict)  # local reset_stream calls
    open_processed: bool = False  # the responder's core has processed the OPEN frame

    @property
    def responder(self) -> str:
        return PEER[self.initiator]


@dataclasses.dataclass
class Endpoint:
    name: str
    conn: Connection
    wire: Wire = dataclasses.field(default_factory=Wire)  # what this endpoint sent, toward its peer
    pings: deque[bytes] = dataclasses.field(default_factory=deque)
    goaway_called: bool = False
    goaways_expected: deque[int] = dataclasses.field(default_factory=deque)  # last-stream-ids, in order
    goaway_promise: int | None = None
    goaway_received: int | None = None


class TwoPeers(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.broken = False
        self.ready = False
        self.now = 0.0
        self.ends: dict[str, Endpoint] = {}
        self.streams: dict[int, StreamModel] = {}
        self.ping_counter = itertools.count()
        self.seen: set[str] = set()  # situations reached, reported as hypothesis statistics

    # -- setup -------------------------------------------------------------------------------------

    @initialize(
        relay_settings=settings_strategy,
        agent_settings=settings_strategy,
        opens=st.lists(st.tuples(SIDES, request_heads, st.booleans()), max_size=4),
    )
    @guarded
    def handshake(
        self, relay_settings: Settings, agent_settings: Settings, opens: list[tuple[str, RequestHead, bool]]
    ) -> None:
        self.ends[RELAY] = Endpoint(RELAY, Connection(Role.ACCEPTOR, relay_settings))
        self.ends[AGENT] = Endpoint(AGENT, Connection(Role.DIALER, agent_settings))
        for side in (RELAY, AGENT):
            self.ends[side].wire.push(self.ends[side].conn.data_to_send())
        for side in (RELAY, AGENT):
            self._deliver(side, 1 << 30)
        self.ready = True
        for side, head, end in opens:  # a head start: most interesting steps need streams
            self._open(side, head, end)

    # -- transport ---------------------------------------------------------------------------------

    @rule(side=SIDES, max_bytes=st.one_of(st.integers(1, 64), st.integers(1, 1 << 17)))
    @guarded
    def pull(self, side: str, max_bytes: int) -> None:
        self._pull(side, max_bytes)

    @rule(side=SIDES, size=st.one_of(st.integers(1, 16), st.integers(1, 1 << 17)))
    @guarded
    def deliver(self, side: str, size: int) -> None:
        self._deliver(side, size)

    @rule(side=SIDES, max_bytes=st.integers(1, 1 << 17), size=st.integers(1, 1 << 17))
    @guarded
    def pull_and_deliver(self, side: str, max_bytes: int, size: int) -> None:
        self._pull(side, max_bytes)
        self._deliver(side, size)

    def _pull(self, side: str, max_bytes: int) -> bytes:
        endpoint = self.ends[side]
        ready = endpoint.conn.has_data_to_send
        data = endpoint.conn.data_to_send(max_bytes)
        frames = endpoint.wire.push(data)
        assert ready or not data, "has_data_to_send was False but data_to_send returned frames"
        assert len(data) <= max_bytes or len(frames) == 1, (
            f"data_to_send({max_bytes}) returned {len(data)} octets in {len(frames)} frames: "
            f"{[(FrameType(f.type).name, f.stream_id, f.length) for f in frames]}"
        )
        return data

    def _deliver(self, side: str, size: int) -> None:
        """Feed up to `size` octets of what `side` sent to its peer and check the events they produce."""
        chunk, done = self.ends[side].wire.take(size)
        if not chunk:
            return
        receiver = self.ends[PEER[side]]
        self.now += 0.5  # the abuse rate limits refill with time; honest traffic never trips them
        try:
            events = receiver.conn.receive_data(chunk, self.now)
        except RemoteProtocolError as exc:
            pytest.fail(f"{receiver.name} raised RemoteProtocolError between honest peers: {exc!r}")
        for frame in done:
            if frame.type == FrameType.OPEN:
                self.streams[frame.stream_id].open_processed = True
        self._check_events(receiver.name, events)

    # -- stream actions ----------------------------------------------------------------------------
    #
    # Stream actions pick among (side, stream) pairs for which the action is legal, and are disabled by a
    # precondition when there are none: hypothesis then spends its steps on actions that do something.

    def _live(self, side: str) -> list[StreamModel]:
        return [m for _, m in sorted(self.streams.items()) if side in m.known and side not in m.gone]

    def _pairs(self, legal: Callable[[str, StreamModel], bool]) -> list[tuple[str, StreamModel]]:
        return [(side, m) for side in (RELAY, AGENT) for m in self._live(side) if legal(side, m)]

    @staticmethod
    def _replying(side: str, m: StreamModel) -> bool:
        return m.responder == side and not m.dirs[side].final_reply_sent

    @staticmethod
    def _sending(side: str, m: StreamModel) -> bool:
        direction = m.dirs[side]
        return not direction.end_queued and (m.initiator == side or direction.final_reply_sent)

    @staticmethod
    def _reading(side: str, m: StreamModel) -> bool:
        direction = m.dirs[PEER[side]]
        return bool(direction.unread) and not direction.stalled

    @staticmethod
    def _any(side: str, m: StreamModel) -> bool:
        return True

    def _open(self, side: str, head: RequestHead, end: bool) -> None:
        conn = self.ends[side].conn
        if not conn.can_open_stream:
            with pytest.raises(LocalProtocolError):
                conn.open_stream(head, end_stream=end)
            return
        stream_id = conn.open_stream(head, end_stream=end)
        assert stream_id not in self.streams and stream_id % 2 == (1 if side == AGENT else 0)
        dirs = {s: Direction(seed=stream_id * 2 + (s == RELAY)) for s in (RELAY, AGENT)}
        dirs[side].end_queued = end
        self.streams[stream_id] = StreamModel(stream_id, side, head, dirs, known={side})

    @rule(opens=st.lists(st.tuples(SIDES, request_heads, st.booleans()), min_size=1, max_size=3))
    @guarded
    def open_streams(self, opens: list[tuple[str, RequestHead, bool]]) -> None:
        for side, head, end in opens:
            self._open(side, head, end)

    @precondition(lambda self: self._pairs(self._replying))
    @rule(index=st.integers(0, 255), interim=st.integers(0, 2), status=final_statuses, end=rarely)
    @guarded
    def send_reply(self, index: int, interim: int, status: int, end: bool) -> None:
        """Interim 1xx heads, then the final head, possibly ending the response."""
        candidates = self._pairs(self._replying)
        side, model = candidates[index % len(candidates)]
        direction = model.dirs[side]
        conn = self.ends[side].conn
        for i in range(interim):
            head = ResponseHead(100, b"Continue", ((b"x-interim", str(i).encode()),))
            conn.send_reply(model.stream_id, head)
            direction.replies.append(head)
        final = ResponseHead(status, b"R", ((b"x-stream", str(model.stream_id).encode()),))
        conn.send_reply(model.stream_id, final, end_stream=end)
        direction.replies.append(final)
        direction.final_reply_sent = True
        direction.end_queued = end

    @precondition(lambda self: self._pairs(self._sending))
    @rule(sends=st.lists(st.tuples(st.integers(0, 255), sizes, rarely), min_size=1, max_size=4))
    @guarded
    def send_data(self, sends: list[tuple[int, int, bool]]) -> None:
        """Queue DATA on up to four streams: (which stream, how many octets, END_STREAM or not)."""
        for index, size, end in sends:
            candidates = self._pairs(self._sending)
            if not candidates:
                return
            side, model = candidates[index % len(candidates)]
            conn = self.ends[side].conn
            if conn.outbound_buffered(model.stream_id) >= OUTBOUND_CAP:
                continue  # the runtime's send_data would wait here
            direction = model.dirs[side]
            data = payload(direction.seed, len(direction.sent), size)
            conn.send_data(model.stream_id, data, end_stream=end)
            direction.sent += data
            direction.end_queued = end

    @precondition(lambda self: self._pairs(self._sending))
    @rule(index=st.integers(0, 255), trailers=st.one_of(st.none(), header_lists), go=rarely)
    @guarded
    def half_close(self, index: int, trailers: Headers | None, go: bool) -> None:
        """End a direction with an empty END_STREAM, or with TRAILERS when `trailers` is given."""
        if not go:
            return  # ending streams early would leave little to observe
        candidates = self._pairs(self._sending)
        side, model = candidates[index % len(candidates)]
        conn = self.ends[side].conn
        if trailers is None:
            conn.end_stream(model.stream_id)
        else:
            conn.send_trailers(model.stream_id, trailers)
            model.dirs[side].trailers = trailers
        model.dirs[side].end_queued = True

    @precondition(lambda self: self._pairs(self._any))
    @rule(index=st.integers(0, 255), code=st.sampled_from(ErrorCode), go=rarely)
    @guarded
    def reset(self, index: int, code: ErrorCode, go: bool) -> None:
        if not go:
            return  # rarer than other actions, so that streams live long enough
        candidates = self._pairs(self._any)
        side, model = candidates[index % len(candidates)]
        self.ends[side].conn.reset_stream(model.stream_id, code)
        model.gone.add(side)
        model.reset_code[side] = code
        model.dirs[PEER[side]].unread.clear()  # abandoned: the core credits the connection for it

    @precondition(lambda self: self._pairs(self._reading))
    @rule(index=st.integers(0, 255), size=st.one_of(st.integers(1, 512), st.integers(1, 1 << 17)))
    @guarded
    def read(self, index: int, size: int) -> None:
        """The application consumes `size` octets and acknowledges them (which credits the windows)."""
        candidates = self._pairs(self._reading)
        side, model = candidates[index % len(candidates)]
        self._read(side, model, size)

    def _read(self, side: str, model: StreamModel, size: int) -> int:
        unread = model.dirs[PEER[side]].unread
        size = min(size, len(unread))
        del unread[:size]
        if size:
            self.ends[side].conn.acknowledge_received_data(model.stream_id, size)
        return size

    @precondition(lambda self: self._pairs(self._any))
    @rule(index=st.integers(0, 255), stalled=st.booleans())
    @guarded
    def stall_reader(self, index: int, stalled: bool) -> None:
        """A stalled reader never reads (until unstalled or teardown): its sender must only block itself."""
        candidates = self._pairs(self._any)
        side, model = candidates[index % len(candidates)]
        model.dirs[PEER[side]].stalled = stalled
        if stalled:
            self.seen.add("a reader was stalled")

    @rule(side=SIDES)
    @guarded
    def ping(self, side: str) -> None:
        if len(self.ends[side].pings) >= 4:
            return  # like a runtime's keepalive: a few outstanding pings, never a PING flood (SPEC 11)
        opaque = next(self.ping_counter).to_bytes(8, "big")
        self.ends[side].conn.ping(opaque)
        self.ends[side].pings.append(opaque)

    @precondition(lambda self: len(self.streams) >= 3)
    @rule(side=SIDES, go=rarely)
    @guarded
    def goaway(self, side: str, go: bool) -> None:
        if not go:
            return  # rarer than other actions: after a GOAWAY the connection only winds down
        endpoint = self.ends[side]
        # SPEC 10: last-stream-id is the highest peer stream we processed, and never increases.
        accepted = [m.stream_id for m in self.streams.values() if m.initiator != side and side in m.known]
        promise = max(accepted, default=0)
        if endpoint.goaway_promise is not None:
            promise = min(promise, endpoint.goaway_promise)
        endpoint.conn.goaway(ErrorCode.NO_ERROR, b"draining")
        endpoint.goaway_called = True
        endpoint.goaway_promise = promise
        endpoint.goaways_expected.append(promise)

    # -- event checks ------------------------------------------------------------------------------

    def _stream_for(self, receiver: str, stream_id: int) -> StreamModel:
        model = self.streams.get(stream_id)
        assert model is not None, f"{receiver}: event for unknown stream {stream_id}"
        assert receiver in model.known, f"{receiver}: event for stream {stream_id} before StreamOpened"
        assert receiver not in model.gone, f"{receiver}: event for stream {stream_id} after it was reset"
        return model

    def _check_events(self, receiver: str, events: list[Event]) -> None:
        sender = PEER[receiver]
        for event in events:
            self._check_event(receiver, sender, event)
        for event in events:
            if isinstance(event, GoAwayReceived):
                # SPEC 10: our streams above last-stream-id were refused, with events in this same batch.
                above = [m.stream_id for m in self._live(receiver) if m.initiator == receiver]
                assert all(sid <= event.last_stream_id for sid in above), f"{event}: {above} still live"

    def _check_event(self, receiver: str, sender: str, event: Event) -> None:
        if isinstance(event, StreamOpened):
            model = self.streams.get(event.stream_id)
            assert model is not None and model.initiator == sender, f"unexpected {event}"
            assert receiver not in model.known, f"second StreamOpened for {event.stream_id}"
            assert event.head == model.head
            model.known.add(receiver)
            return
        if isinstance(event, HandshakeComplete | PingReceived):
            return
        if isinstance(event, PingAcknowledged):
            pings = self.ends[receiver].pings
            assert pings and event.data == pings.popleft(), f"unexpected {event}"
            return
        if isinstance(event, GoAwayReceived):
            self._check_goaway(receiver, event)
            return
        if isinstance(event, WindowUpdated):
            if event.stream_id:
                self._stream_for(receiver, event.stream_id)
            return
        assert isinstance(
            event, ReplyReceived | DataReceived | TrailersReceived | StreamEnded | StreamReset
        ), f"unknown event {event!r}"
        model = self._stream_for(receiver, event.stream_id)
        direction = model.dirs[sender]
        if isinstance(event, StreamReset):
            self._check_reset(receiver, model, event)
            return
        assert not direction.ended, f"{receiver}: {event!r} after StreamEnded"
        if isinstance(event, ReplyReceived):
            assert model.initiator == receiver, f"REPLY delivered to the responder: {event}"
            assert not direction.final_reply_received, f"REPLY after the final one: {event}"
            index = direction.replies_received
            assert index < len(direction.replies) and event.head == direction.replies[index]
            direction.replies_received += 1
            direction.final_reply_received = not event.head.is_interim
            return
        if model.initiator == receiver:
            assert direction.final_reply_received, f"{event!r} before the final REPLY"
        if isinstance(event, DataReceived):
            data = bytes(event.data)
            start = direction.received
            assert data and data == direction.sent[start : start + len(data)], (
                f"stream {event.stream_id} to {receiver}: {len(data)} octets at offset {start} are not "
                f"what was sent ({len(direction.sent)} octets)"
            )
            assert not direction.trailers_received
            direction.received += len(data)
            direction.unread += data
        elif isinstance(event, TrailersReceived):
            assert direction.trailers is not None and event.headers == direction.trailers
            assert not direction.trailers_received
            direction.trailers_received = True
        else:
            assert direction.end_queued, f"{event!r} but the sender never ended"
            assert direction.received == len(direction.sent), (
                f"StreamEnded on {event.stream_id} after {direction.received} of {len(direction.sent)} octets"
            )
            assert direction.trailers_received == (direction.trailers is not None)
            direction.ended = True
            self.seen.add("stream ended " + ("by TRAILERS" if direction.trailers else "by END_STREAM"))
            if direction.stalled and direction.unread:
                self.seen.add("stream ended while its reader was stalled")

    def _check_reset(self, receiver: str, model: StreamModel, event: StreamReset) -> None:
        sender = PEER[receiver]
        direction_ended = model.dirs[sender].ended
        assert event.remote, f"{receiver} hit a stream error between honest peers: {event!r}"
        if model.reset_code.get(sender) != event.error_code:
            # Not the peer's own reset_stream: only a refusal is allowed, for a stream the peer never
            # accepted, after it called goaway (it refused the OPEN, or we saw its GOAWAY).
            assert event.error_code is ErrorCode.REFUSED_STREAM, f"{receiver}: unexpected {event!r}"
            assert model.initiator == receiver and sender not in model.known, f"bad refusal {event!r}"
            assert self.ends[sender].goaway_called, f"refused without GOAWAY: {event!r}"
        model.gone.add(receiver)
        self.seen.add(f"StreamReset {event.error_code.name}" + (" after StreamEnded" * direction_ended))
        model.dirs[sender].unread.clear()

    def _check_goaway(self, receiver: str, event: GoAwayReceived) -> None:
        sender = self.ends[PEER[receiver]]
        assert sender.goaways_expected, f"{receiver}: GOAWAY nobody sent: {event}"
        expected = sender.goaways_expected.popleft()
        assert event.last_stream_id == expected, (
            f"GOAWAY from {sender.name} carried last-stream-id {event.last_stream_id}, expected {expected}"
        )
        again = self.ends[receiver].goaway_received is not None
        self.ends[receiver].goaway_received = event.last_stream_id
        self.seen.add("GOAWAY received" + (" again" if again else ""))

    # -- invariants --------------------------------------------------------------------------------

    @precondition(lambda self: self.ready)
    @invariant()
    @guarded
    def windows_are_conserved(self) -> None:
        """SPEC 8: per direction, sender window + DATA in flight + WINDOW_UPDATE in flight + received but
        not yet credited == the receiver's initial window. (WINDOW_UPDATEs in flight are window the sender
        has been granted but cannot see yet; with them the sum is exactly what the receiver started with.)"""
        for sender_name in (RELAY, AGENT):
            sender, receiver = self.ends[sender_name], self.ends[PEER[sender_name]]
            data = in_flight(sender.conn, sender.wire)
            credit = in_flight(receiver.conn, receiver.wire)
            rconn = receiver.conn
            held = sum(s.recv_unacked for s in rconn._streams.values()) + rconn._conn.recv_consumed
            total = sender.conn.connection_send_window + data.data_total + credit.window.get(0, 0) + held
            if not sender.conn.connection_send_window and any(
                s.outbound_bytes for s in sender.conn._streams.values()
            ):
                self.seen.add("the connection send window was exhausted")
            assert total == rconn.local_settings.connection_window, (
                f"connection window {sender_name}->{receiver.name} not conserved: {total}"
            )
            for stream_id, model in self.streams.items():
                out = sender.conn._streams.get(stream_id)
                if out is None:
                    continue  # retired or reset at the sender: its window no longer matters
                inbound = rconn._streams.get(stream_id)
                granted = out.send_window + data.data.get(stream_id, 0) + credit.window.get(stream_id, 0)
                if out.outbound_bytes and not out.send_window:
                    self.seen.add("a stream send window was exhausted")
                if inbound is None:
                    if model.initiator != sender_name or model.open_processed:
                        continue  # refused, reset or retired at the receiver
                    held = 0
                else:
                    if inbound.recv in ENDED:
                        continue  # END_STREAM processed: the window is dead
                    held = inbound.recv_unacked + inbound.recv_consumed
                    assert inbound.recv_window == granted, f"stream {stream_id}: windows disagree"
                assert granted + held == rconn.local_settings.initial_stream_window, (
                    f"stream {stream_id} window {sender_name}->{receiver.name} not conserved"
                )

    @precondition(lambda self: self.ready)
    @invariant()
    @guarded
    def receive_buffers_are_bounded(self) -> None:
        for side in (RELAY, AGENT):
            conn = self.ends[side].conn
            total = 0
            for model in self.streams.values():
                unread = len(model.dirs[PEER[side]].unread)
                if side in model.gone:
                    assert unread == 0
                    continue
                assert unread == conn.received_unacknowledged(model.stream_id)
                assert unread <= conn.local_settings.initial_stream_window
                total += unread
            assert total <= conn.local_settings.connection_window

    @invariant()
    @guarded
    def outbound_total_is_the_sum_of_stream_buffers(self) -> None:
        # The runtime's memory accounting reads this running total instead of summing every stream.
        for side in (RELAY, AGENT):
            conn = self.ends[side].conn
            assert conn.outbound_total == sum(conn.outbound_buffered(sid) for sid in conn._streams)

    # -- teardown ----------------------------------------------------------------------------------

    def teardown(self) -> None:
        if self.ready and not self.broken:
            self._drain()
            for situation in sorted(self.seen):
                hypothesis.event(
                    situation
                )  # see --hypothesis-show-statistics: proof that the runs reach these

    def _finish_streams(self) -> None:
        for side in (RELAY, AGENT):
            conn = self.ends[side].conn
            for model in self._live(side):
                direction = model.dirs[side]
                if model.responder == side and not direction.final_reply_sent:
                    head = ResponseHead(200, b"OK")
                    conn.send_reply(model.stream_id, head)
                    direction.replies.append(head)
                    direction.final_reply_sent = True
                if not direction.end_queued:
                    conn.end_stream(model.stream_id)
                    direction.end_queued = True

    def _drain(self) -> None:
        """Unstall and read everything, end every open direction, and run the wires until both are quiet."""
        for model in self.streams.values():
            for direction in model.dirs.values():
                direction.stalled = False
        for _ in range(10_000):
            self._finish_streams()
            progress = False
            for side in (RELAY, AGENT):
                for model in self._live(side):
                    progress |= self._read(side, model, 1 << 30) > 0
                while self.ends[side].conn.has_data_to_send:
                    if not self._pull(side, 1 << 20):
                        break
                    progress = True
                if self.ends[side].wire.buffer:
                    self._deliver(side, 1 << 30)
                    progress = True
            self.windows_are_conserved()
            self.receive_buffers_are_bounded()
            if not progress:
                break
        else:
            pytest.fail("the connections never went quiet")
        for model in self.streams.values():
            for side in (model.initiator, model.responder):
                if side in model.gone:
                    continue
                if side not in model.known:  # refused before the responder saw it
                    assert model.initiator in model.gone, f"stream {model.stream_id} never reached {side}"
                    continue
                direction = model.dirs[PEER[side]]
                assert direction.ended, f"stream {model.stream_id}: {side} never got StreamEnded (deadlock)"
        for side in (RELAY, AGENT):
            conn = self.ends[side].conn
            assert conn.open_stream_count == 0, f"{side} leaked {conn.open_stream_count} streams"
            assert not conn.has_data_to_send


TestTwoPeers = TwoPeers.TestCase
