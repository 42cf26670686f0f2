"""SPEC.md section 7's local actions: every one in every stream state (and the connection-level ones in every
connection state) is either allowed or refused with LocalProtocolError, the connection left exactly as it was.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from protocol import (
    Connection,
    ConnectionState,
    LocalProtocolError,
    RemoteProtocolError,
    RequestHead,
    ResponseHead,
    Role,
)

from ._setups import FINAL, HEAD, INTERIM, SETUPS, TRAILERS, C, freeze, pair, pump, theirs
from ._wire import frame

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
    "initiator, closed, data unread": ONLY_RESET,
    "responder, awaiting reply": REPLYING,
    "responder, open": SENDING,
    "responder, half-closed (remote), awaiting reply": REPLYING,
    "responder, half-closed (remote)": SENDING,
    "responder, half-closed (local)": ONLY_RESET,
    "responder, closed recently": ONLY_RESET,
    "responder, reset": ONLY_RESET,
    "responder, closed, data unread": ONLY_RESET,
}


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
    sid = theirs(end=False)(me, them)
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
