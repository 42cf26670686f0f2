"""The stream state machine as data (SPEC.md section 7): one cell per (state, frame) and (state, action).

As in h11's _state.py, these tables decide every transition of a stream. _receiving.py classifies the frame
the peer sent into a `Received` event, looks up `RECEIVED[recv_state, event]` and carries out what the cell
says; _connection.py does the same for the application's actions with `SENT[send_side, action]`. A cell is the
next state, or the error the transition is refused with. Checks that do not depend on the stream's state
(windows and increments, rate limits, frame sizes, the stream-0 rules) stay with the frames.

A stream has two sides. Our send side (`Side`) is what we may still send. The receive side (`Recv`) is what
the peer may still send; for the table it also tells whose stream it is and whether it exists at all, since
those decide what a frame on it means (SPEC 6): a stream absent from the table is idle or closed by its id.

States and events are IntEnums, so the (state, event) keys hash in C and index the per-event rows
(RECEIVED_BY_EVENT, SENT_BY_EVENT) through which the per-frame DATA paths read the same cells.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import TypeVar

from ._errors import ErrorCode


class Side(enum.IntEnum):
    """Our send side. The responder's starts AWAITING_REPLY (only REPLY or RESET may go), the initiator's OPEN."""

    AWAITING_REPLY = 0
    OPEN = 1
    CLOSED = 2  # END_STREAM queued (it may not have left yet: see Stream.end_pending)


class Recv(enum.IntEnum):
    """A stream as the receiver of a frame on it sees it: SPEC 7's columns, split where the rules differ."""

    IDLE_PEER = 0  # the peer's parity, above the highest it opened: only OPEN may come
    IDLE_OWN = 1  # our parity, never opened by us
    AWAITING_REPLY = 2  # we opened it; the final REPLY has not come
    RESPONSE = 3  # we opened it; the final REPLY came, its body may follow
    RESPONSE_ENDED = 4  # we opened it; the peer's END_STREAM came
    REQUEST = 5  # the peer opened it; its request body may follow
    REQUEST_ENDED = 6  # the peer opened it; its END_STREAM came
    CLOSED_OWN = 7  # our parity, out of the table: both ends crossed and consumed, or reset
    CLOSED_PEER = 8  # the peer's parity, opened (or refused) and out of the table


class Received(enum.IntEnum):
    """A frame on a stream, classified by what matters to the table: its type, END_STREAM, its head."""

    OPEN = 0
    OPEN_END = 1
    REPLY_INTERIM = 2
    REPLY_INTERIM_END = 3  # SPEC 4.3: an interim REPLY MUST NOT end the stream
    REPLY_FINAL = 4
    REPLY_FINAL_END = 5
    REPLY_MALFORMED = 6  # the head does not parse
    DATA = 7
    DATA_END = 8
    TRAILERS = 9  # without END_STREAM, which SPEC 4.5 requires
    TRAILERS_END = 10
    TRAILERS_MALFORMED = 11
    WINDOW_UPDATE = 12
    RESET = 13


class Sent(enum.IntEnum):
    """A local action on a stream's send side."""

    REPLY_INTERIM = 0
    REPLY_INTERIM_END = 1
    REPLY_FINAL = 2
    REPLY_FINAL_END = 3
    DATA = 4
    DATA_END = 5
    TRAILERS = 6


@dataclasses.dataclass(frozen=True, slots=True)
class Reset:
    """A stream error: RESET the stream with `code` and report it; the connection goes on."""

    code: ErrorCode


@dataclasses.dataclass(frozen=True, slots=True)
class Fail:
    """A connection error. `message` is formatted with `stream_id` and `highest` (the peer's highest OPEN)."""

    message: str
    code: ErrorCode = ErrorCode.PROTOCOL_ERROR


class Discard:
    """The frame crossed the stream's end on the wire: drop it without error (SPEC 6)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "DISCARD"


@dataclasses.dataclass(frozen=True, slots=True)
class Misuse:
    """A local action the side's state forbids: LocalProtocolError(`message` formatted with `stream_id`)."""

    message: str


DISCARD = Discard()
# An accepted frame's cell is the receive state it leaves the stream in (RESET: the closed state of its id).
ReceivedCell = Recv | Reset | Fail | Discard
SentCell = Side | Misuse

# The receive states of a stream whose peer direction has ended (its window is never credited again).
ENDED = frozenset({Recv.RESPONSE_ENDED, Recv.REQUEST_ENDED})

_PE = Reset(ErrorCode.PROTOCOL_ERROR)
_SC = Reset(ErrorCode.STREAM_CLOSED)
_IDLE = Fail("frame on idle stream {stream_id}")
_OURS = Fail("OPEN of stream {stream_id}, which has our parity")
_BACK = Fail("OPEN of stream {stream_id} after stream {highest}: ids must increase")
_DROP = DISCARD

_E = Received
# The receive states by name, for the grids below.
(
    IDLE_PEER,
    IDLE_OWN,
    AWAITING_REPLY,
    RESPONSE,
    RESPONSE_ENDED,
    REQUEST,
    REQUEST_ENDED,
    CLOSED_OWN,
    CLOSED_PEER,
) = Recv

# Streams in the table. Whose stream it is decides REPLY (SPEC 7: "REPLY (to responder)" is always an error) and
# which message an OPEN on it fails with. State errors take precedence over what is wrong with the frame itself,
# so a malformed head or a TRAILERS without END_STREAM on an ended side is STREAM_CLOSED like any other frame.
# fmt: off
_LIVE: dict[Received, tuple[ReceivedCell, ...]] = {
    #                       AWAITING_REPLY   RESPONSE         RESPONSE_ENDED   REQUEST          REQUEST_ENDED
    _E.OPEN:               (_OURS,          _OURS,           _OURS,           _BACK,           _BACK),
    _E.OPEN_END:           (_OURS,          _OURS,           _OURS,           _BACK,           _BACK),
    _E.REPLY_INTERIM:      (AWAITING_REPLY, _PE,             _SC,             _PE,             _PE),
    _E.REPLY_INTERIM_END:  (_PE,            _PE,             _SC,             _PE,             _PE),
    _E.REPLY_FINAL:        (RESPONSE,       _PE,             _SC,             _PE,             _PE),
    _E.REPLY_FINAL_END:    (RESPONSE_ENDED, _PE,             _SC,             _PE,             _PE),
    _E.REPLY_MALFORMED:    (_PE,            _PE,             _SC,             _PE,             _PE),
    _E.DATA:               (_PE,            RESPONSE,        _SC,             REQUEST,         _SC),
    _E.DATA_END:           (_PE,            RESPONSE_ENDED,  _SC,             REQUEST_ENDED,   _SC),
    _E.TRAILERS:           (_PE,            _PE,             _SC,             _PE,             _SC),
    _E.TRAILERS_END:       (_PE,            RESPONSE_ENDED,  _SC,             REQUEST_ENDED,   _SC),
    _E.TRAILERS_MALFORMED: (_PE,            _PE,             _SC,             _PE,             _SC),
    _E.WINDOW_UPDATE:      (AWAITING_REPLY, RESPONSE,        RESPONSE_ENDED,  REQUEST,         REQUEST_ENDED),
    _E.RESET:              (CLOSED_OWN,     CLOSED_OWN,      CLOSED_OWN,      CLOSED_PEER,     CLOSED_PEER),
}
_LIVE_COLUMNS = (AWAITING_REPLY, RESPONSE, RESPONSE_ENDED, REQUEST, REQUEST_ENDED)

# Streams not in the table: idle or closed, told apart by the id (SPEC 6). A closed one needs no memory.
_ABSENT: dict[Received, tuple[ReceivedCell, ...]] = {
    #                       IDLE_PEER        IDLE_OWN         CLOSED_OWN       CLOSED_PEER
    _E.OPEN:               (REQUEST,        _OURS,           _OURS,           _BACK),
    _E.OPEN_END:           (REQUEST_ENDED,  _OURS,           _OURS,           _BACK),
    **{event:              (_IDLE,          _IDLE,           _DROP,           _DROP)
       for event in Received if event not in (_E.OPEN, _E.OPEN_END)},
}
_ABSENT_COLUMNS = (IDLE_PEER, IDLE_OWN, CLOSED_OWN, CLOSED_PEER)
# fmt: on

_REPLIED = Misuse("stream {stream_id}: a final REPLY was already sent")
_INTERIM_END = Misuse("an interim (1xx) REPLY cannot end the stream")
_DATA_EARLY = Misuse("stream {stream_id}: cannot send data in side state awaiting-reply")
_DATA_LATE = Misuse("stream {stream_id}: cannot send data in side state closed")
_TRAILERS_EARLY = Misuse("stream {stream_id}: cannot send trailers in side state awaiting-reply")
_TRAILERS_LATE = Misuse("stream {stream_id}: cannot send trailers in side state closed")

# fmt: off
_SENDING: dict[Sent, tuple[SentCell, ...]] = {
    #                          AWAITING_REPLY        OPEN          CLOSED
    Sent.REPLY_INTERIM:       (Side.AWAITING_REPLY,  _REPLIED,     _REPLIED),
    Sent.REPLY_INTERIM_END:   (_INTERIM_END,         _REPLIED,     _REPLIED),
    Sent.REPLY_FINAL:         (Side.OPEN,            _REPLIED,     _REPLIED),
    Sent.REPLY_FINAL_END:     (Side.CLOSED,          _REPLIED,     _REPLIED),
    Sent.DATA:                (_DATA_EARLY,          Side.OPEN,    _DATA_LATE),
    Sent.DATA_END:            (_DATA_EARLY,          Side.CLOSED,  _DATA_LATE),
    Sent.TRAILERS:            (_TRAILERS_EARLY,      Side.CLOSED,  _TRAILERS_LATE),
}
# fmt: on


_S = TypeVar("_S")
_V = TypeVar("_V")
_C = TypeVar("_C")


def _flatten(grid: dict[_V, tuple[_C, ...]], columns: tuple[_S, ...]) -> dict[tuple[_S, _V], _C]:
    return {
        (state, event): cell for event, row in grid.items() for state, cell in zip(columns, row, strict=True)
    }


RECEIVED: dict[tuple[Recv, Received], ReceivedCell] = _flatten(_LIVE, _LIVE_COLUMNS) | _flatten(
    _ABSENT, _ABSENT_COLUMNS
)
SENT: dict[tuple[Side, Sent], SentCell] = _flatten(_SENDING, tuple(Side))

# The same cells by event, then state: `BY_EVENT[event][state]` is two tuple subscripts, cheaper than hashing a
# key (and than an enum attribute: in Python 3.11 `Received.DATA` is a descriptor call). The DATA paths use these.
RECEIVED_BY_EVENT = tuple(tuple(RECEIVED[state, event] for state in Recv) for event in Received)
SENT_BY_EVENT = tuple(tuple(SENT[side, action] for side in Side) for action in Sent)

# A REPLY's (interim, END_STREAM) -> its event: the frame received, or the action of sending one.
REPLY_EVENTS: dict[tuple[bool, bool], Received] = {
    (True, False): Received.REPLY_INTERIM,
    (True, True): Received.REPLY_INTERIM_END,
    (False, False): Received.REPLY_FINAL,
    (False, True): Received.REPLY_FINAL_END,
}
REPLY_ACTIONS: dict[tuple[bool, bool], Sent] = {
    (True, False): Sent.REPLY_INTERIM,
    (True, True): Sent.REPLY_INTERIM_END,
    (False, False): Sent.REPLY_FINAL,
    (False, True): Sent.REPLY_FINAL_END,
}
