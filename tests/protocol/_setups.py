"""Shared by the state-table tests: a pair of connections driven into every
stream state SPEC.md section 7 distinguishes, as seen by the endpoint under test ("me")."""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable

from protocol import (
    Connection,
    RequestHead,
    ResponseHead,
    Role,
    StreamState,
)

HEAD = RequestHead(b"POST", b"/x", ((b"Host", b"h"),))
FINAL = ResponseHead(200, b"OK")
INTERIM = ResponseHead(100, b"Continue")
TRAILERS = ((b"Digest", b"x"),)


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


def _stream(i_open: bool, *, end: bool, reply: bool, reply_end: bool, reset: bool) -> Setup:
    def setup(me: Connection, them: Connection) -> int:
        opener, replier = (me, them) if i_open else (them, me)
        sid = opener.open_stream(HEAD, end_stream=end)
        pump(me, them)
        if reply:
            replier.send_reply(sid, FINAL, end_stream=reply_end)
            pump(me, them)
        if reset:
            opener.reset_stream(sid)
            pump(me, them)
        return sid

    return setup


def mine(*, end: bool, reply: bool = False, reply_end: bool = False, reset: bool = False) -> Setup:
    """A stream I initiated."""
    return _stream(True, end=end, reply=reply, reply_end=reply_end, reset=reset)


def theirs(*, end: bool, reply: bool = False, reply_end: bool = False, reset: bool = False) -> Setup:
    """A stream the peer initiated."""
    return _stream(False, end=end, reply=reply, reply_end=reply_end, reset=reset)


def _ended_unread(i_open: bool) -> Setup:
    """Both END_STREAMs crossed, but the peer's last DATA is still unread: closed, yet still in the table."""

    def setup(me: Connection, them: Connection) -> int:
        opener, replier = (me, them) if i_open else (them, me)
        sid = opener.open_stream(HEAD, end_stream=i_open)
        if not i_open:
            them.send_data(sid, b"abc", end_stream=True)
        pump(me, them)
        replier.send_reply(sid, FINAL, end_stream=not i_open)
        if i_open:
            them.send_data(sid, b"abc", end_stream=True)
        pump(me, them)
        return sid

    return setup


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
    "initiator, awaiting reply": (mine(end=False), OP),
    "initiator, awaiting reply, half-closed (local)": (mine(end=True), HCL),
    "initiator, open": (mine(end=False, reply=True), OP),
    "initiator, half-closed (local)": (mine(end=True, reply=True), HCL),
    "initiator, half-closed (remote)": (mine(end=False, reply=True, reply_end=True), HCR),
    "initiator, closed recently": (mine(end=True, reply=True, reply_end=True), C),
    "initiator, reset": (mine(end=False, reset=True), C),
    "initiator, closed, data unread": (_ended_unread(True), C),
    "responder, awaiting reply": (theirs(end=False), OP),
    "responder, open": (theirs(end=False, reply=True), OP),
    "responder, half-closed (remote), awaiting reply": (theirs(end=True), HCR),
    "responder, half-closed (remote)": (theirs(end=True, reply=True), HCR),
    "responder, half-closed (local)": (theirs(end=False, reply=True, reply_end=True), HCL),
    "responder, closed recently": (theirs(end=True, reply=True, reply_end=True), C),
    "responder, reset": (theirs(end=False, reset=True), C),
    "responder, closed, data unread": (_ended_unread(False), C),
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
    if not hasattr(obj, "__dict__"):  # slotted, perhaps over several classes (a Stream is its Windows too)
        slots = [name for cls in type(obj).__mro__ for name in getattr(cls, "__slots__", ())]
        return (type(obj).__name__, tuple(freeze(getattr(obj, name, None)) for name in slots))
    return (type(obj).__name__, freeze(vars(obj)))
