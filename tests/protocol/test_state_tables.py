"""SPEC.md section 7, cell by cell (in the manner of hyper-h2's test_state_machines.py).

A pair of real connections drives one stream into each state; then a hand-crafted frame is injected into the
endpoint under test ("me") and the exact outcome is asserted: the events, a RESET queued with its code (stream
error), or RemoteProtocolError with its code (connection error). The second half checks every local action in
every state: allowed, or LocalProtocolError with the connection left exactly as it was.
"""

from __future__ import annotations

import enum
import struct
from collections import deque
from collections.abc import Callable

import pytest

from protocol import (
    Connection,
    ConnectionState,
    DataReceived,
    ErrorCode,
    Event,
    LocalProtocolError,
    RemoteProtocolError,
    ReplyReceived,
    RequestHead,
    ResponseHead,
    Role,
    StreamEnded,
    StreamOpened,
    StreamReset,
    StreamState,
    TrailersReceived,
    WindowUpdated,
)

from ._wire import block, frame

HEAD = RequestHead(b"POST", b"/x", ((b"Host", b"h"),))
FINAL = ResponseHead(200, b"OK")
INTERIM = ResponseHead(100, b"Continue")
TRAILERS = ((b"Digest", b"x"),)


# -- frames written out by hand (independent of the encoder) ------------------------------------------


_REQ = b"\x04POST\x00\x02/x" + block(HEAD.headers)
_FINAL = b"\x00\xc8\x02OK" + block(())
_INTERIM = b"\x00\x64\x08Continue" + block(())

FRAMES: dict[str, Callable[[int], bytes]] = {
    "OPEN": lambda s: frame(1, 0, s, _REQ),
    "OPEN+END": lambda s: frame(1, 1, s, _REQ),
    "REPLY-final": lambda s: frame(2, 0, s, _FINAL),
    "REPLY-final+END": lambda s: frame(2, 1, s, _FINAL),
    "REPLY-interim": lambda s: frame(2, 0, s, _INTERIM),
    "REPLY-interim+END": lambda s: frame(2, 1, s, _INTERIM),
    "DATA": lambda s: frame(3, 0, s, b"x"),
    "DATA+END": lambda s: frame(3, 1, s, b"x"),
    "DATA-empty+END": lambda s: frame(3, 1, s),
    "TRAILERS+END": lambda s: frame(4, 1, s, block(TRAILERS)),
    "TRAILERS-no-END": lambda s: frame(4, 0, s, block(TRAILERS)),
    "WINDOW_UPDATE": lambda s: frame(5, 0, s, b"\x00\x00\x00\x01"),
    "WINDOW_UPDATE-0": lambda s: frame(5, 0, s, b"\x00\x00\x00\x00"),
    "RESET": lambda s: frame(6, 0, s, b"\x00\x00\x00\x08"),
}


# -- driving a pair into each state ----------------------------------------------------------------

Setup = Callable[[Connection, Connection], int]


def pair(role: Role) -> tuple[Connection, Connection]:
    other = Role.DIALER if role is Role.ACCEPTOR else Role.ACCEPTOR
    me, them = Connection(role), Connection(other)
    pump(me, them)
    return me, them


def pump(me: Connection, them: Connection) -> None:
    """Deliver everything queued in both directions until both are quiet."""
    while True:
        a, b = me.data_to_send(), them.data_to_send()
        if not a and not b:
            return
        them.receive_data(a)
        me.receive_data(b)


def _own_first(me: Connection) -> int:
    return 1 if me.role is Role.DIALER else 2


def _peer_first(me: Connection) -> int:
    return 2 if me.role is Role.DIALER else 1


def _stream(
    mine: bool, *, end: bool, reply: bool = False, reply_end: bool = False, reset: bool = False
) -> Setup:
    """A stream opened by me (`mine`) or by the peer, optionally answered by the other end, optionally reset
    by the opener."""

    def setup(me: Connection, them: Connection) -> int:
        opener, answerer = (me, them) if mine else (them, me)
        sid = opener.open_stream(HEAD, end_stream=end)
        pump(me, them)
        if reply:
            answerer.send_reply(sid, FINAL, end_stream=reply_end)
            pump(me, them)
        if reset:
            opener.reset_stream(sid)
            pump(me, them)
        return sid

    return setup


def _i(**how: bool) -> Setup:
    """A stream I initiated."""
    return _stream(True, **how)


def _r(**how: bool) -> Setup:
    """A stream the peer initiated."""
    return _stream(False, **how)


def _idle_peer(me: Connection, them: Connection) -> int:
    # One stream already opened by the peer, so "idle" means "above the highest", not just "never used".
    them.open_stream(HEAD, end_stream=True)
    pump(me, them)
    return _peer_first(me) + 2


def _idle_own(me: Connection, them: Connection) -> int:
    me.open_stream(HEAD, end_stream=True)
    pump(me, them)
    return _own_first(me) + 2


OP, HCL, HCR, C, IDLE = (
    StreamState.OPEN,
    StreamState.HALF_CLOSED_LOCAL,
    StreamState.HALF_CLOSED_REMOTE,
    StreamState.CLOSED,
    StreamState.IDLE,
)

# name -> (setup, the state it leaves the stream in)
SETUPS: dict[str, tuple[Setup, StreamState]] = {
    "idle (peer parity)": (_idle_peer, IDLE),
    "idle (own parity)": (_idle_own, IDLE),
    "initiator, awaiting reply": (_i(end=False), OP),
    "initiator, awaiting reply, half-closed (local)": (_i(end=True), HCL),
    "initiator, open": (_i(end=False, reply=True), OP),
    "initiator, half-closed (local)": (_i(end=True, reply=True), HCL),
    "initiator, half-closed (remote)": (_i(end=False, reply=True, reply_end=True), HCR),
    "initiator, closed recently": (_i(end=True, reply=True, reply_end=True), C),
    "initiator, reset": (_i(end=False, reset=True), C),
    "responder, awaiting reply": (_r(end=False), OP),
    "responder, open": (_r(end=False, reply=True), OP),
    "responder, half-closed (remote), awaiting reply": (_r(end=True), HCR),
    "responder, half-closed (remote)": (_r(end=True, reply=True), HCR),
    "responder, half-closed (local)": (_r(end=False, reply=True, reply_end=True), HCL),
    "responder, closed recently": (_r(end=True, reply=True, reply_end=True), C),
    "responder, reset": (_r(end=False, reset=True), C),
}


# -- expected outcomes ------------------------------------------------------------------------------


class Kind(enum.Enum):
    EVENTS = "events"
    STREAM_ERROR = "stream error"
    CONNECTION_ERROR = "connection error"


Outcome = tuple[Kind, object, StreamState | None]


def ev(names: str, after: StreamState) -> Outcome:
    return (Kind.EVENTS, names, after)


def stream_err(code: ErrorCode) -> Outcome:
    return (Kind.STREAM_ERROR, code, C)


def conn_err(code: ErrorCode = ErrorCode.PROTOCOL_ERROR) -> Outcome:
    return (Kind.CONNECTION_ERROR, code, None)


DISCARD: Outcome = (Kind.EVENTS, "", C)
PE, SC = ErrorCode.PROTOCOL_ERROR, ErrorCode.STREAM_CLOSED


def _events(names: str, sid: int) -> list[Event]:
    table: dict[str, Event] = {
        "opened": StreamOpened(sid, HEAD),
        "reply": ReplyReceived(sid, FINAL),
        "interim": ReplyReceived(sid, INTERIM),
        "data": DataReceived(sid, memoryview(b"x")),
        "trailers": TrailersReceived(sid, TRAILERS),
        "ended": StreamEnded(sid),
        "window": WindowUpdated(sid, 1),
        "reset": StreamReset(sid, ErrorCode.CANCEL, remote=True),
    }
    return [table[name] for name in names.split()]


def _receiving_side_open(state: StreamState, ended: StreamState) -> dict[str, Outcome]:
    """Peer's direction open, final REPLY (if any is due to me) already received: the "open" column."""
    return {
        "OPEN": conn_err(),
        "OPEN+END": conn_err(),
        "REPLY-final": stream_err(PE),
        "REPLY-final+END": stream_err(PE),
        "REPLY-interim": stream_err(PE),
        "REPLY-interim+END": stream_err(PE),
        "DATA": ev("data", state),
        "DATA+END": ev("data ended", ended),
        "DATA-empty+END": ev("ended", ended),
        "TRAILERS+END": ev("trailers ended", ended),
        "TRAILERS-no-END": stream_err(PE),
        "WINDOW_UPDATE": ev("window", state),
        "WINDOW_UPDATE-0": stream_err(PE),
        "RESET": ev("reset", C),
    }


def _awaiting_reply(state: StreamState, ended: StreamState) -> dict[str, Outcome]:
    """I opened the stream and no final REPLY came yet: only REPLY (or RESET) may arrive."""
    return {
        **_receiving_side_open(state, ended),
        "REPLY-final": ev("reply", state),
        "REPLY-final+END": ev("reply ended", ended),
        "REPLY-interim": ev("interim", state),
        "REPLY-interim+END": stream_err(PE),  # SPEC 4.3: interim MUST NOT carry END_STREAM
        "DATA": stream_err(PE),
        "DATA+END": stream_err(PE),
        "DATA-empty+END": stream_err(PE),
        "TRAILERS+END": stream_err(PE),  # SPEC 4.5: must follow the final REPLY
        "TRAILERS-no-END": stream_err(PE),
    }


def _received_end(state: StreamState, reply_code: ErrorCode) -> dict[str, Outcome]:
    """The peer's direction has ended: the "half-closed (remote)" column."""
    return {
        "OPEN": conn_err(),
        "OPEN+END": conn_err(),
        "REPLY-final": stream_err(reply_code),
        "REPLY-final+END": stream_err(reply_code),
        "REPLY-interim": stream_err(reply_code),
        "REPLY-interim+END": stream_err(reply_code),
        "DATA": stream_err(SC),
        "DATA+END": stream_err(SC),
        "DATA-empty+END": stream_err(SC),
        "TRAILERS+END": stream_err(SC),
        "TRAILERS-no-END": stream_err(SC),
        "WINDOW_UPDATE": ev("window", state),
        "WINDOW_UPDATE-0": stream_err(PE),
        "RESET": ev("reset", C),
    }


_CLOSED: dict[str, Outcome] = {name: DISCARD for name in FRAMES} | {
    "OPEN": conn_err(),  # own parity: wrong parity; peer parity: id not increasing
    "OPEN+END": conn_err(),
}

EXPECTED: dict[str, dict[str, Outcome]] = {
    "idle (peer parity)": {name: conn_err() for name in FRAMES}
    | {"OPEN": ev("opened", OP), "OPEN+END": ev("opened ended", HCR)},
    "idle (own parity)": {name: conn_err() for name in FRAMES},
    "initiator, awaiting reply": _awaiting_reply(OP, HCR),
    "initiator, awaiting reply, half-closed (local)": _awaiting_reply(HCL, C),
    "initiator, open": _receiving_side_open(OP, HCR),
    "initiator, half-closed (local)": _receiving_side_open(HCL, C),
    "initiator, half-closed (remote)": _received_end(HCR, SC),
    "initiator, closed recently": _CLOSED,
    "initiator, reset": _CLOSED,
    "responder, awaiting reply": _receiving_side_open(OP, HCR),
    "responder, open": _receiving_side_open(OP, HCR),
    # A REPLY sent to the responder is always PROTOCOL_ERROR, even after the peer's END_STREAM (SPEC 7 table).
    "responder, half-closed (remote), awaiting reply": _received_end(HCR, PE),
    "responder, half-closed (remote)": _received_end(HCR, PE),
    "responder, half-closed (local)": _receiving_side_open(HCL, C),
    "responder, closed recently": _CLOSED,
    "responder, reset": _CLOSED,
}


def _goaway_code(data: bytes) -> int | None:
    pos = 0
    while pos < len(data):
        length, frame_type = int.from_bytes(data[pos : pos + 3], "big"), data[pos + 3]
        if frame_type == 8:
            return int.from_bytes(data[pos + 13 : pos + 17], "big")
        pos += 9 + length
    return None


CELLS = [(s, f, role) for s in SETUPS for f in FRAMES for role in Role]


def test_table_is_complete() -> None:
    assert set(EXPECTED) == set(SETUPS)
    for row in EXPECTED.values():
        assert set(row) == set(FRAMES)


@pytest.mark.parametrize("role", list(Role), ids=lambda r: r.value)
@pytest.mark.parametrize("setup_name", list(SETUPS))
def test_setup_reaches_its_state(setup_name: str, role: Role) -> None:
    me, them = pair(role)
    setup, state = SETUPS[setup_name]
    sid = setup(me, them)
    assert me.stream_state(sid) is state
    assert me.data_to_send() == them.data_to_send() == b""


@pytest.mark.parametrize(("setup_name", "frame_name", "role"), CELLS, ids=lambda x: getattr(x, "value", x))
def test_received_frame(setup_name: str, frame_name: str, role: Role) -> None:
    me, them = pair(role)
    sid = SETUPS[setup_name][0](me, them)
    kind, detail, state_after = EXPECTED[setup_name][frame_name]
    raw = FRAMES[frame_name](sid)

    if kind is Kind.CONNECTION_ERROR:
        with pytest.raises(RemoteProtocolError) as info:
            me.receive_data(raw)
        assert info.value.error_code is detail
        assert me.state is ConnectionState.CLOSED
        assert _goaway_code(me.data_to_send()) == detail
        return

    events = me.receive_data(raw)
    assert me.state is ConnectionState.OPEN
    if kind is Kind.STREAM_ERROR:
        assert isinstance(detail, ErrorCode)
        assert events == [StreamReset(sid, detail, remote=False)]
        assert me.data_to_send() == frame(6, 0, sid, struct.pack(">I", detail))
    else:
        assert isinstance(detail, str)
        assert events == (_events(detail, sid) if detail else [])
        assert me.data_to_send() == b""  # nothing answered: no RESET, no WINDOW_UPDATE this small
    assert me.stream_state(sid) is state_after


def test_data_on_a_closed_stream_is_credited_to_the_connection() -> None:
    from protocol import Settings

    me = Connection(Role.ACCEPTOR, Settings(connection_window=2048))
    them = Connection(Role.DIALER)
    pump(me, them)
    sid = _r(end=False, reset=True)(me, them)
    assert me.receive_data(frame(3, 0, sid, bytes(1024))) == []
    # Half the connection window was discarded, so it is credited back at once (SPEC 6 and 8).
    assert me.data_to_send() == frame(5, 0, 0, struct.pack(">I", 1024))


# -- local actions ----------------------------------------------------------------------------------

ACTIONS: dict[str, Callable[[Connection, int], object]] = {
    "reply-interim": lambda c, s: c.send_reply(s, INTERIM),
    "reply-final": lambda c, s: c.send_reply(s, FINAL),
    "reply-final+end": lambda c, s: c.send_reply(s, FINAL, end_stream=True),
    "reply-interim+end": lambda c, s: c.send_reply(s, INTERIM, end_stream=True),
    "data": lambda c, s: c.send_data(s, b"x"),
    "data+end": lambda c, s: c.send_data(s, b"x", end_stream=True),
    "empty-data": lambda c, s: c.send_data(s, b""),
    "end": lambda c, s: c.end_stream(s),
    "trailers": lambda c, s: c.send_trailers(s, TRAILERS),
    "reset": lambda c, s: c.reset_stream(s),
}
SENDING = {"data", "data+end", "empty-data", "end", "trailers", "reset"}
REPLYING = {"reply-interim", "reply-final", "reply-final+end", "reset"}
ONLY_RESET = {"reset"}

ALLOWED: dict[str, set[str]] = {
    "idle (peer parity)": set(),
    "idle (own parity)": set(),
    "initiator, awaiting reply": SENDING,
    "initiator, awaiting reply, half-closed (local)": ONLY_RESET,
    "initiator, open": SENDING,
    "initiator, half-closed (local)": ONLY_RESET,
    "initiator, half-closed (remote)": SENDING,
    "initiator, closed recently": ONLY_RESET,  # a no-op: resetting is idempotent
    "initiator, reset": ONLY_RESET,
    "responder, awaiting reply": REPLYING,
    "responder, open": SENDING,
    "responder, half-closed (remote), awaiting reply": REPLYING,
    "responder, half-closed (remote)": SENDING,
    "responder, half-closed (local)": ONLY_RESET,
    "responder, closed recently": ONLY_RESET,
    "responder, reset": ONLY_RESET,
}


def freeze(obj: object) -> object:
    """A comparable deep snapshot of a connection's whole state (slots, deques and views included)."""
    if obj is None or isinstance(obj, int | float | str | bytes | enum.Enum):
        return obj
    if isinstance(obj, memoryview | bytearray):
        return bytes(obj)
    if isinstance(obj, dict):
        return tuple((freeze(k), freeze(v)) for k, v in obj.items())
    if isinstance(obj, list | tuple | deque):
        return tuple(freeze(x) for x in obj)
    slots = getattr(type(obj), "__slots__", None)
    if slots is not None and not hasattr(obj, "__dict__"):
        return (type(obj).__name__, tuple(freeze(getattr(obj, name, None)) for name in slots))
    return (type(obj).__name__, freeze(vars(obj)))


def _prepared(setup_name: str, role: Role) -> tuple[Connection, int]:
    me, them = pair(role)
    sid = SETUPS[setup_name][0](me, them)
    me.ping(b"pingpong")  # something queued, so "nothing was added" is visible in data_to_send
    return me, sid


def test_allowed_table_is_complete() -> None:
    assert set(ALLOWED) == set(SETUPS)


@pytest.mark.parametrize("role", list(Role), ids=lambda r: r.value)
@pytest.mark.parametrize("action", list(ACTIONS))
@pytest.mark.parametrize("setup_name", list(SETUPS))
def test_local_action(setup_name: str, action: str, role: Role) -> None:
    me, sid = _prepared(setup_name, role)
    if action in ALLOWED[setup_name]:
        ACTIONS[action](me, sid)
        assert me.state is ConnectionState.OPEN
        return
    before = freeze(me)
    with pytest.raises(LocalProtocolError):
        ACTIONS[action](me, sid)
    assert freeze(me) == before
    twin, _ = _prepared(setup_name, role)
    assert me.data_to_send() == twin.data_to_send() == frame(7, 0, 0, b"pingpong")


@pytest.mark.parametrize("setup_name", [n for n in SETUPS if SETUPS[n][1] is C])
def test_resetting_a_closed_stream_sends_nothing(setup_name: str) -> None:
    me, them = pair(Role.ACCEPTOR)
    sid = SETUPS[setup_name][0](me, them)
    me.reset_stream(sid)
    assert me.data_to_send() == b""


# -- connection-level local actions --------------------------------------------------------------------

CONN_ACTIONS: dict[str, Callable[[Connection], object]] = {
    "open": lambda c: c.open_stream(HEAD),
    "ping": lambda c: c.ping(b"12345678"),
    "goaway": lambda c: c.goaway(),
}


def _handshaking() -> Connection:
    return Connection(Role.ACCEPTOR)


def _open() -> Connection:
    return pair(Role.ACCEPTOR)[0]


def _goaway_sent() -> Connection:
    me = _open()
    me.goaway()
    return me


def _goaway_received() -> Connection:
    me, them = pair(Role.ACCEPTOR)
    them.goaway()
    pump(me, them)
    return me


def _streams_exhausted() -> Connection:
    from protocol import Settings

    me = Connection(Role.ACCEPTOR)
    them = Connection(Role.DIALER, Settings(max_concurrent_streams=1))
    pump(me, them)
    me.open_stream(HEAD)
    return me


def _failed() -> Connection:
    me = _open()
    with pytest.raises(RemoteProtocolError):
        me.receive_data(frame(0, 0, 0, b"\x00\x01\x00\x00"))  # a second HELLO
    return me


CONN_STATES: dict[str, tuple[Callable[[], Connection], set[str]]] = {
    # GOAWAY before the handshake is how a runtime refuses a connection it will not serve.
    "handshaking": (_handshaking, {"goaway"}),
    "open": (_open, {"open", "ping", "goaway"}),
    "goaway sent": (_goaway_sent, {"ping", "goaway"}),
    "goaway received": (_goaway_received, {"ping", "goaway"}),
    "MAX_CONCURRENT_STREAMS reached": (_streams_exhausted, {"ping", "goaway"}),
    "failed": (_failed, set()),
}


@pytest.mark.parametrize("action", list(CONN_ACTIONS))
@pytest.mark.parametrize("state", list(CONN_STATES))
def test_connection_level_action(state: str, action: str) -> None:
    make, allowed = CONN_STATES[state]
    me = make()
    if action in allowed:
        CONN_ACTIONS[action](me)
        return
    before = freeze(me)
    with pytest.raises(LocalProtocolError):
        CONN_ACTIONS[action](me)
    assert freeze(me) == before
    assert me.data_to_send() == make().data_to_send()


@pytest.mark.parametrize(
    "misuse",
    [
        lambda c, s: c.open_stream(RequestHead(b"", b"/")),
        lambda c, s: c.open_stream(RequestHead(b"GET", b"/", ((b"n", b"v" * 0xFFFF),) * 2)),
        lambda c, s: c.send_reply(s, ResponseHead(200, b"", ((b"", b"v"),))),
        lambda c, s: c.send_reply(s, ResponseHead(200, b"", ((b"n", b"v" * 0xFFFF),) * 2)),
        lambda c, s: c.send_trailers(s, [(b"", b"")]),
        lambda c, s: c.send_trailers(s, [(b"n", b"v" * 0xFFFF)] * 2),
        lambda c, s: c.ping(b"short"),
        lambda c, s: c.acknowledge_received_data(s, 1),
        lambda c, s: c.acknowledge_received_data(s, -1),
    ],
)
def test_invalid_arguments_are_local_errors_that_change_nothing(
    misuse: Callable[[Connection, int], object],
) -> None:
    me, them = pair(Role.ACCEPTOR)
    sid = _r(end=False)(me, them)
    before = freeze(me)
    with pytest.raises(LocalProtocolError):
        misuse(me, sid)
    assert freeze(me) == before
    assert me.data_to_send() == b""


def test_goaway_debug_fits_the_peers_max_frame_size() -> None:
    # Before the handshake the peer's limit is unknown: the smallest legal MAX_FRAME_SIZE (1024) applies.
    me = Connection(Role.ACCEPTOR)
    me.data_to_send()
    me.goaway(debug=b"d" * 5000)
    assert len(me.data_to_send()) == 9 + 1024
    me = pair(Role.ACCEPTOR)[0]
    me.goaway(debug=b"d" * 50000)
    assert len(me.data_to_send()) == 9 + 16384
