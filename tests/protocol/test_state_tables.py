"""SPEC.md section 7, cell by cell (in the manner of hyper-h2's test_state_machines.py).

A pair of real connections drives one stream into each state; then a hand-crafted frame is injected into the
endpoint under test ("me") and the exact outcome is asserted: the events, a RESET queued with its code (stream
error), or RemoteProtocolError with its code (connection error). Local actions are in test_local_actions.py.
"""

from __future__ import annotations

import enum
import re
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from protocol import (
    Connection,
    ConnectionState,
    DataReceived,
    ErrorCode,
    Event,
    RemoteProtocolError,
    ReplyReceived,
    Role,
    StreamEnded,
    StreamOpened,
    StreamReset,
    StreamState,
    TrailersReceived,
    WindowUpdated,
)
from protocol._state import DISCARD as DISCARD_CELL
from protocol._state import ENDED, RECEIVED, SENT, Fail, Received, Recv, Reset, Sent, Side

from ._setups import FINAL, HCL, HCR, HEAD, INTERIM, OP, SETUPS, TRAILERS, C, pair, pump, theirs
from ._wire import block, frame

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
    # Closed, but unread data keeps it in the table: only a RESET is discarded as on a closed stream (SPEC 7).
    "initiator, closed, data unread": _received_end(C, SC) | {"RESET": DISCARD},
    "responder, awaiting reply": _receiving_side_open(OP, HCR),
    "responder, open": _receiving_side_open(OP, HCR),
    # A REPLY sent to the responder is always PROTOCOL_ERROR, even after the peer's END_STREAM (SPEC 7 table).
    "responder, half-closed (remote), awaiting reply": _received_end(HCR, PE),
    "responder, half-closed (remote)": _received_end(HCR, PE),
    "responder, half-closed (local)": _receiving_side_open(HCL, C),
    "responder, closed recently": _CLOSED,
    "responder, reset": _CLOSED,
    "responder, closed, data unread": _received_end(C, PE) | {"RESET": DISCARD},
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
    sid = theirs(end=False, reset=True)(me, them)
    assert me.receive_data(frame(3, 0, sid, bytes(1024))) == []
    # Half the connection window was discarded, so it is credited back at once (SPEC 6 and 8).
    assert me.data_to_send() == frame(5, 0, 0, struct.pack(">I", 1024))


# -- the code's table against SPEC.md's ------------------------------------------------------------
# SPEC 7's received-frame table is prose. Each column, row, condition and outcome phrase below maps its words
# onto the states and events of protocol/_state.py; a cell worded in a way not listed here fails the test, so
# neither the SPEC nor the code's table can change without the other being looked at.

SPEC = Path(__file__).resolve().parents[2] / "SPEC.md"
MINE = {Recv.AWAITING_REPLY, Recv.RESPONSE, Recv.RESPONSE_ENDED, Recv.CLOSED_OWN}
THEIRS = {Recv.REQUEST, Recv.REQUEST_ENDED, Recv.CLOSED_PEER}
IDLE_STATES = {Recv.IDLE_PEER}
EVERY = MINE | THEIRS | IDLE_STATES

SPEC_COLUMNS = {
    "idle (peer parity)": {Recv.IDLE_PEER},
    "open / half-closed (local)": {Recv.AWAITING_REPLY, Recv.RESPONSE, Recv.REQUEST},
    "half-closed (remote) / received END": set(ENDED),
    "closed (derived)": {Recv.CLOSED_OWN, Recv.CLOSED_PEER},
}
_REPLIES = {Received.REPLY_INTERIM, Received.REPLY_FINAL, Received.REPLY_FINAL_END}
# row -> (the states it speaks of, its well-formed events, its ill-formed events: refused for the state's reason
# wherever the state alone refuses the frame)
SPEC_ROWS: dict[str, tuple[set[Recv], set[Received], set[Received]]] = {
    "OPEN": (EVERY, {Received.OPEN, Received.OPEN_END}, set()),
    "REPLY (to initiator)": (
        MINE | IDLE_STATES,
        _REPLIES,
        {Received.REPLY_INTERIM_END, Received.REPLY_MALFORMED},
    ),
    "REPLY (to responder)": (
        THEIRS | IDLE_STATES,
        _REPLIES,
        {Received.REPLY_INTERIM_END, Received.REPLY_MALFORMED},
    ),
    "DATA": (EVERY, {Received.DATA, Received.DATA_END}, set()),
    "TRAILERS": (EVERY, {Received.TRAILERS_END}, {Received.TRAILERS, Received.TRAILERS_MALFORMED}),
    "WINDOW_UPDATE": (EVERY, {Received.WINDOW_UPDATE}, set()),
    "RESET": (EVERY, {Received.RESET}, set()),
}
# "condition: outcome" clauses inside a cell, and the states they single out.
SPEC_CONDITIONS = {
    "before the final REPLY": {Recv.AWAITING_REPLY},
    "a second final or REPLY after DATA": {Recv.RESPONSE},
}
# Phrases for an accepted frame -> the states it may leave the stream in (None: the state it was in).
SPEC_ACCEPTS: dict[str, set[Recv] | None] = {
    "opens the stream": {Recv.REQUEST, Recv.REQUEST_ENDED},
    "interim/final as 4.3": {Recv.AWAITING_REPLY, Recv.RESPONSE, Recv.RESPONSE_ENDED},
    "delivered": {Recv.RESPONSE, Recv.RESPONSE_ENDED, Recv.REQUEST, Recv.REQUEST_ENDED},
    "delivered, ends the side": set(ENDED),
    "credits the send window": None,
    "stream closed, reported": {Recv.CLOSED_OWN, Recv.CLOSED_PEER},
}


def spec_table() -> dict[str, dict[str, str]]:
    """SPEC 7's table of received frames: row -> column -> cell text."""
    section = SPEC.read_text().split("\n## 7. ", 1)[1].split("\n## ", 1)[0]
    lines = [line.strip().strip("|") for line in section.splitlines() if line.startswith("|")]
    header, _rule, *rows = [[cell.strip() for cell in line.split("|")] for line in lines]
    return {row[0]: dict(zip(header[1:], row[1:], strict=True)) for row in rows}


def _verdict(phrase: str) -> tuple[str, ...]:
    """An outcome phrase as ("conn" | "stream", code), ("discard",) or ("accept", phrase)."""
    refusal = re.fullmatch(r"(conn|stream) ([A-Z_]+)", phrase)
    if refusal:
        return refusal.groups()
    if phrase.startswith("discarded"):
        return ("discard",)
    assert phrase in SPEC_ACCEPTS, f"SPEC 7 says {phrase!r}: teach this test what it means"
    return ("accept", phrase)


def spec_cell(text: str, states: set[Recv]) -> dict[Recv, tuple[str, ...]]:
    """What a SPEC cell says for each state of its column: the first clause, unless a condition overrides it.
    A parenthesis without a colon (say, the REFUSED_STREAM remark) is about admission, not state: skipped."""
    first, *clauses = (c.strip() for c in re.split(r";|\(|\)", text) if c.strip())
    verdicts = dict.fromkeys(states, _verdict(first))
    for clause in clauses:
        if ":" in clause:
            condition, phrase = (part.strip() for part in clause.split(":", 1))
            assert condition in SPEC_CONDITIONS, f"SPEC 7 has the condition {condition!r}: teach this test"
            verdicts.update(dict.fromkeys(SPEC_CONDITIONS[condition] & states, _verdict(phrase)))
    return verdicts


def _code_verdict(state: Recv, event: Received) -> tuple[str, ...]:
    cell = RECEIVED[state, event]
    if isinstance(cell, Fail):
        return ("conn", cell.code.name)
    if isinstance(cell, Reset):
        return ("stream", cell.code.name)
    return ("discard",) if cell is DISCARD_CELL else ("accept",)


SPEC_CELLS = [(row, column) for row in SPEC_ROWS for column in SPEC_COLUMNS]


def test_spec_table_has_the_rows_and_columns_mapped_here() -> None:
    table = spec_table()
    assert set(table) == set(SPEC_ROWS)
    assert all(set(cells) == set(SPEC_COLUMNS) for cells in table.values())


@pytest.mark.parametrize(("row", "column"), SPEC_CELLS)
def test_code_table_matches_spec_table(row: str, column: str) -> None:
    states, events, ill_formed = SPEC_ROWS[row]
    for state, verdict in spec_cell(spec_table()[row][column], SPEC_COLUMNS[column] & states).items():
        expected = verdict[:1] if verdict[0] == "accept" else verdict  # ("accept", phrase) -> ("accept",)
        for event in events:
            cell = RECEIVED[state, event]
            assert _code_verdict(state, event) == expected, (state, event)
            if verdict[0] == "accept":
                allowed = SPEC_ACCEPTS[verdict[1]]
                assert cell in (allowed if allowed is not None else {state}), (state, event, cell)
        if verdict[0] != "accept":  # the state alone refuses: no frame variant gets another answer
            for event in ill_formed:
                assert _code_verdict(state, event) == verdict, (state, event)


def test_code_table_matches_spec_prose_on_our_own_idle_ids() -> None:
    # Not a column of the table: "Frames on a stream of *our own* parity that we never opened are a connection
    # error PROTOCOL_ERROR".
    assert (
        "Frames on a stream of *our own* parity that we never opened are a connection error PROTOCOL_ERROR"
        in (" ".join(SPEC.read_text().split()))
    )
    assert {_code_verdict(Recv.IDLE_OWN, event) for event in Received} == {("conn", "PROTOCOL_ERROR")}


def test_code_table_is_complete() -> None:
    assert set(RECEIVED) == {(state, event) for state in Recv for event in Received}
    assert set(SENT) == {(side, action) for side in Side for action in Sent}
