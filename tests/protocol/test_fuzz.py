"""Whatever the peer sends, `receive_data` either returns events or raises RemoteProtocolError, never an
IndexError/struct.error/ValueError/KeyError from inside the parser; and once it has raised, the connection
stays failed (SPEC.md section 10: a connection error is fatal).

Three generators: raw bytes (before and after a valid HELLO), and sequences of structurally plausible frames
(right header, random types, flags, ids and payloads) which get much deeper into the state machine. Every input
is fed in arbitrary splits, with the application acknowledging data and sending replies in between as a
runtime would.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol import (
    Connection,
    ConnectionState,
    DataReceived,
    Event,
    LocalProtocolError,
    RemoteProtocolError,
    RequestHead,
    ResponseHead,
    Role,
    Settings,
    StreamOpened,
    StreamState,
)
from protocol import _frames as F

from ._wire import frame

HELLO = F.encode_hello(Settings().to_pairs())
SMALL = Settings(max_frame_size=1024, max_head_size=1024, initial_stream_window=2048, connection_window=4096)


_request_heads = st.builds(
    lambda m, t, h: F.encode_request_head(RequestHead(m, t, h)),
    st.binary(min_size=1, max_size=8),
    st.binary(min_size=1, max_size=8),
    st.lists(st.tuples(st.binary(min_size=1, max_size=4), st.binary(max_size=4)), max_size=3).map(tuple),
)
_response_heads = st.builds(
    lambda s: F.encode_response_head(ResponseHead(s)), st.sampled_from([100, 101, 103, 200, 404])
)
_trailers = st.builds(lambda n: F.encode_trailers([(b"t", b"v")] * n), st.integers(0, 2))
_u32 = st.one_of(st.sampled_from([0, 1, 1000, 2**31 - 1, 2**31, 2**32 - 1]), st.integers(0, 2**32 - 1)).map(
    lambda v: struct.pack(">I", v)
)
_settings = st.lists(st.tuples(st.integers(0, 7), st.integers(0, 2**32 - 1)), max_size=3).map(
    lambda pairs: b"\x00\x01\x00\x00" + b"".join(struct.pack(">HI", *p) for p in pairs)
)
# What each known type usually carries; any type also gets arbitrary payloads now and then.
_TYPICAL: dict[int, st.SearchStrategy[bytes]] = {
    F.FrameType.HELLO: _settings,
    F.FrameType.OPEN: _request_heads,
    F.FrameType.REPLY: _response_heads,
    F.FrameType.DATA: st.one_of(st.integers(0, 1100).map(bytes), st.binary(max_size=20)),
    F.FrameType.TRAILERS: _trailers,
    F.FrameType.WINDOW_UPDATE: _u32,
    F.FrameType.RESET: _u32,
    F.FrameType.PING: st.binary(min_size=8, max_size=8),
    F.FrameType.GOAWAY: st.builds(bytes.__add__, _u32, _u32),
}


@st.composite
def _frames(draw: st.DrawFn) -> bytes:
    frame_type = draw(st.one_of(st.integers(0, 8), st.integers(0, 8), st.integers(0, 255)))
    typical = _TYPICAL.get(frame_type)
    if typical is not None and draw(st.integers(0, 9)) > 0:
        payload = draw(typical)
    else:
        payload = draw(st.binary(max_size=40))
    flags = draw(st.sampled_from([0, 0, 1, 1, 2, 0xFF]))
    stream_id = draw(st.one_of(st.integers(0, 8), st.integers(0, 8), st.sampled_from([2**31 - 1, 2**32 - 1])))
    return frame(frame_type, flags, stream_id, payload)


def _feed(me: Connection, data: bytes, cuts: list[int]) -> None:
    """Feed `data` split at `cuts`, acting like a runtime in between; check the failure contract."""
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    now = 0.0
    for piece in pieces:
        now += 0.001
        try:
            events = me.receive_data(piece, now)
        except RemoteProtocolError:
            _assert_failed(me)
            return
        assert me.state is not ConnectionState.CLOSED
        _act(me, events)
        out = me.data_to_send(4096)
        _assert_whole_frames(out)


def _act(me: Connection, events: list[Event]) -> None:
    """Consume data and answer new streams, as the runtime would; none of it may raise."""
    for event in events:
        assert isinstance(event, Event)
        if isinstance(event, DataReceived):
            me.acknowledge_received_data(event.stream_id, len(event.data))
        elif isinstance(event, StreamOpened):
            sid = event.stream_id
            if me.stream_state(sid) is StreamState.CLOSED:
                continue  # reset by a later frame of the same batch
            me.send_reply(sid, ResponseHead(200), end_stream=sid % 3 == 0)
            if sid % 3 == 1:
                me.send_data(sid, b"y" * 3000, end_stream=sid % 2 == 0)
            elif sid % 3 == 2:
                me.send_trailers(sid, [(b"t", b"v")])


def _assert_failed(me: Connection) -> None:
    assert me.state is ConnectionState.CLOSED
    types = _assert_whole_frames(me.data_to_send())
    assert types[-1] == F.FrameType.GOAWAY  # the connection error's GOAWAY is the last frame out
    assert me.data_to_send() == b""
    for data in (b"", HELLO, bytes(9)):
        with pytest.raises(RemoteProtocolError):
            me.receive_data(data)
    with pytest.raises(LocalProtocolError):
        me.ping(bytes(8))
    with pytest.raises(LocalProtocolError):
        me.open_stream(RequestHead(b"GET", b"/"))
    assert me.state is ConnectionState.CLOSED


def _assert_whole_frames(out: bytes) -> list[int]:
    """The frame types in `out`, which must hold whole frames only (SPEC 2)."""
    types = []
    pos = 0
    while pos < len(out):
        assert len(out) - pos >= F.FRAME_HEADER_SIZE
        length, frame_type, _, _ = F.unpack_header(out, pos)
        types.append(frame_type)
        pos += F.FRAME_HEADER_SIZE + length
    assert pos == len(out)
    return types


def _cuts(data: bytes, draw: st.DrawFn) -> list[int]:
    return sorted(draw(st.lists(st.integers(0, len(data)), max_size=8)))


@st.composite
def _split_input(draw: st.DrawFn, prefix: bytes, body: st.SearchStrategy[bytes]) -> tuple[bytes, list[int]]:
    data = prefix + draw(body)
    return data, _cuts(data, draw)


@given(_split_input(b"", st.binary(max_size=300)), st.sampled_from([None, SMALL]))
def test_raw_bytes_without_hello(case: tuple[bytes, list[int]], settings: Settings | None) -> None:
    _feed(Connection(Role.ACCEPTOR, settings), *case)


@given(_split_input(HELLO, st.binary(max_size=300)), st.sampled_from([None, SMALL]))
def test_raw_bytes_after_hello(case: tuple[bytes, list[int]], settings: Settings | None) -> None:
    _feed(Connection(Role.DIALER, settings), *case)


@given(
    _split_input(HELLO, st.lists(_frames(), max_size=25).map(b"".join)),
    st.sampled_from([None, SMALL]),
    st.sampled_from(list(Role)),
    st.integers(0, 4),
)
def test_plausible_frames(
    case: tuple[bytes, list[int]], settings: Settings | None, role: Role, own_streams: int
) -> None:
    me = Connection(role, settings)
    me.receive_data(HELLO)
    # Streams of our own, so frames naming our parity sometimes hit live streams.
    for i in range(own_streams):
        sid = me.open_stream(RequestHead(b"GET", b"/"), end_stream=i % 2 == 0)
        if i == 3:
            me.send_data(sid, b"x" * 5000)
    data, cuts = case
    _feed(me, data[len(HELLO) :], [c - len(HELLO) for c in cuts if c >= len(HELLO)])


@given(st.binary(max_size=64), st.integers(0, 8), st.integers(0, 255), st.integers(0, 9))
def test_every_known_type_with_arbitrary_payload(
    payload: bytes, frame_type: int, flags: int, sid: int
) -> None:
    me = Connection(Role.ACCEPTOR)
    me.receive_data(HELLO)
    me.receive_data(frame(F.FrameType.OPEN, 0, 1, F.encode_request_head(RequestHead(b"GET", b"/"))))
    _feed(me, frame(frame_type, flags, sid, payload), [])
