"""A hostile or broken peer (SPEC.md sections 3.1, 4, 6, 8, 10 and 11): every limit and connection error.

The peer here is hand-written frames, not a `Connection`, since a well-behaved implementation cannot be made
to misbehave. The endpoint under test ("me") is the acceptor (even ids); the peer opens odd ids.
"""

from __future__ import annotations

import struct

import pytest

from protocol import (
    Connection,
    ConnectionState,
    DataReceived,
    ErrorCode,
    Limits,
    LocalProtocolError,
    RemoteProtocolError,
    RequestHead,
    ResponseHead,
    Role,
    Settings,
    StreamOpened,
    StreamReset,
    StreamState,
    WindowUpdated,
)

from ._wire import frame, header

MAX = 2**31 - 1
HELLO, OPEN, REPLY, DATA, TRAILERS, WINDOW_UPDATE, RESET, PING, GOAWAY = range(9)
PE, FSE, FCE, CALM = (
    ErrorCode.PROTOCOL_ERROR,
    ErrorCode.FRAME_SIZE_ERROR,
    ErrorCode.FLOW_CONTROL_ERROR,
    ErrorCode.ENHANCE_YOUR_CALM,
)


def u32(value: int) -> bytes:
    return struct.pack(">I", value)


def hello(*pairs: tuple[int, int], version: int = 1) -> bytes:
    return frame(
        HELLO, 0, 0, struct.pack(">HH", version, 0) + b"".join(struct.pack(">HI", *p) for p in pairs)
    )


# An OPEN of `GET /` with no headers.
REQUEST = b"\x03GET\x00\x01/\x00\x00"


def open_(stream_id: int, *, end: bool = False) -> bytes:
    return frame(OPEN, 1 if end else 0, stream_id, REQUEST)


def ping(opaque: bytes = b"12345678", *, ack: bool = False) -> bytes:
    return frame(PING, 1 if ack else 0, 0, opaque)


def connected(settings: Settings | None = None, limits: Limits | None = None) -> Connection:
    """An acceptor whose handshake is done (peer HELLO with default settings) and whose HELLO was read."""
    me = Connection(Role.ACCEPTOR, settings, limits)
    me.receive_data(hello())
    me.data_to_send()
    return me


def goaway_of(data: bytes) -> tuple[int, int, bytes]:
    """(last-stream-id, code, debug) of the GOAWAY frame among `data`'s frames."""
    pos = 0
    while pos < len(data):
        length, frame_type = int.from_bytes(data[pos : pos + 3], "big"), data[pos + 3]
        if frame_type == GOAWAY:
            last, code = struct.unpack_from(">II", data, pos + 9)
            return last, code, data[pos + 17 : pos + 9 + length]
        pos += 9 + length
    raise AssertionError("no GOAWAY queued")


def fails(me: Connection, data: bytes, code: ErrorCode, now: float = 0.0) -> RemoteProtocolError:
    """`data` is a connection error with `code`: raised, and a GOAWAY with that code queued."""
    with pytest.raises(RemoteProtocolError) as info:
        me.receive_data(data, now)
    assert info.value.error_code is code
    assert me.state is ConnectionState.CLOSED
    assert goaway_of(me.data_to_send())[1] == code
    return info.value


# -- size limits, checked from the header ------------------------------------------------------------


@pytest.mark.parametrize(
    ("frame_type", "length"),
    [
        (DATA, 16385),
        (WINDOW_UPDATE, 16385),
        (PING, 16385),
        (GOAWAY, 16385),
        (0x42, 16385),  # unknown types count against MAX_FRAME_SIZE too
        (OPEN, 65537),
        (REPLY, 65537),
        (TRAILERS, 65537),
        (DATA, 2**24 - 1),
    ],
)
def test_oversized_frame_fails_on_its_header_alone(frame_type: int, length: int) -> None:
    me = connected()
    fails(me, header(length, frame_type, 0, 1), FSE)
    assert len(me._partial) <= 9


def test_oversized_hello_fails_before_the_handshake() -> None:
    fails(Connection(Role.ACCEPTOR), header(16385, HELLO, 0, 0), FSE)


def test_limits_are_the_local_settings() -> None:
    me = connected(Settings(max_frame_size=1024, max_head_size=2048))
    me.receive_data(header(2048, OPEN, 0, 1))  # a head up to MAX_HEAD_SIZE: just buffered
    me2 = connected(Settings(max_frame_size=1024, max_head_size=2048))
    me2.receive_data(header(1024, DATA, 0, 1))
    fails(connected(Settings(max_frame_size=1024)), header(1025, DATA, 0, 1), FSE)
    fails(connected(Settings(max_head_size=2048)), header(2049, TRAILERS, 0, 1), FSE)


def test_header_fed_one_octet_at_a_time_holds_only_the_header() -> None:
    me = connected()
    raw = header(2**24 - 1, DATA, 0, 1)
    for octet in raw[:-1]:
        assert me.receive_data(bytes((octet,))) == []
        assert len(me._partial) < 9
    fails(me, raw[-1:], FSE)
    assert len(me._partial) <= 9


def test_oversized_header_with_payload_in_the_same_chunk_is_not_buffered() -> None:
    me = connected()
    fails(me, header(16385, DATA, 0, 1) + bytes(16385), FSE)
    assert len(me._partial) <= 9


def test_a_legal_frame_is_buffered_up_to_its_own_size_only() -> None:
    me = connected(Settings(max_frame_size=2**24 - 1, initial_stream_window=MAX, connection_window=MAX))
    me.receive_data(open_(1))
    me.receive_data(header(2**24 - 1, DATA, 0, 1))
    chunk = bytes(65536)
    for _ in range(10):
        me.receive_data(chunk)
    assert len(me._partial) == 9 + 10 * 65536


# -- stream limits ---------------------------------------------------------------------------------------


def test_too_many_streams_are_refused() -> None:
    me = connected(Settings(max_concurrent_streams=2))
    assert me.receive_data(open_(1) + open_(3)) == [
        StreamOpened(1, RequestHead(b"GET", b"/")),
        StreamOpened(3, RequestHead(b"GET", b"/")),
    ]
    assert me.receive_data(open_(5)) == []
    assert me.data_to_send() == frame(RESET, 0, 5, u32(ErrorCode.REFUSED_STREAM))
    assert me.stream_state(5) is StreamState.CLOSED
    # Frames on the refused stream are then discarded like on any closed stream.
    assert me.receive_data(frame(DATA, 0, 5, b"x")) == []
    # A slot frees up when a stream closes.
    me.receive_data(frame(RESET, 0, 1, u32(ErrorCode.CANCEL)))
    assert me.receive_data(open_(7)) == [StreamOpened(7, RequestHead(b"GET", b"/"))]


def test_zero_concurrent_streams_refuses_everything() -> None:
    me = connected(Settings(max_concurrent_streams=0))
    assert me.receive_data(open_(1, end=True)) == []
    assert me.data_to_send() == frame(RESET, 0, 1, u32(ErrorCode.REFUSED_STREAM))


def test_streams_opened_after_our_goaway_are_refused() -> None:
    me = connected()
    me.receive_data(open_(1))
    me.goaway()
    assert goaway_of(me.data_to_send())[:2] == (1, ErrorCode.NO_ERROR)
    assert me.receive_data(open_(3)) == []
    assert me.data_to_send() == frame(RESET, 0, 3, u32(ErrorCode.REFUSED_STREAM))


def test_refused_stream_flood() -> None:
    me = connected(Settings(max_concurrent_streams=0), Limits(reset_burst=3, reset_rate=1.0))
    me.receive_data(open_(1) + open_(3) + open_(5))
    fails(me, open_(7), CALM)


# -- rate limits -----------------------------------------------------------------------------------------


def test_reset_flood() -> None:
    me = connected(limits=Limits(reset_burst=5, reset_rate=1.0))
    me.receive_data(open_(1, end=True))
    # RESETs of closed streams are discarded, but still count: that is the rapid-reset pattern.
    for _ in range(5):
        me.receive_data(frame(RESET, 0, 1, u32(ErrorCode.CANCEL)))
    fails(me, frame(RESET, 0, 1, u32(ErrorCode.CANCEL)), CALM)


def test_reset_budget_refills_with_the_callers_clock() -> None:
    me = connected(limits=Limits(reset_burst=5, reset_rate=1.0))
    me.receive_data(open_(1, end=True))
    for _ in range(5):
        me.receive_data(frame(RESET, 0, 1, u32(ErrorCode.CANCEL)), now=100.0)
    me.receive_data(frame(RESET, 0, 1, u32(ErrorCode.CANCEL)), now=101.0)  # one token back after 1 s
    fails(me, frame(RESET, 0, 1, u32(ErrorCode.CANCEL)), CALM, now=101.0)


def test_ping_flood() -> None:
    me = connected(limits=Limits(ping_burst=3, ping_rate=1.0))
    me.receive_data(ping() * 3)
    assert me.data_to_send() == ping(ack=True) * 3
    me.receive_data(ping(ack=True) * 20)  # ACKs are never limited: they answer our own pings
    fails(me, ping(), CALM)


def test_transport_pings_share_the_ping_budget() -> None:
    me = connected(limits=Limits(ping_burst=3, ping_rate=1.0))
    me.receive_data(ping() * 2)
    me.data_to_send()
    me.receive_transport_ping(now=0.0)  # the third token: the budget is spent, by both kinds together
    me.receive_transport_ping(now=1.0)  # refilled by the caller's clock
    with pytest.raises(RemoteProtocolError) as info:
        me.receive_transport_ping(now=1.0)
    assert info.value.error_code is CALM
    assert me.state is ConnectionState.CLOSED
    assert goaway_of(me.data_to_send())[1] == CALM


def test_ping_rate_is_sustainable() -> None:
    me = connected(limits=Limits(ping_burst=3, ping_rate=10.0))
    for i in range(100):
        me.receive_data(ping(), now=i * 0.1)
        me.data_to_send()
    assert me.state is ConnectionState.OPEN


def test_empty_data_flood() -> None:
    me = connected(limits=Limits(empty_frame_burst=3, empty_frame_rate=1.0))
    me.receive_data(open_(1))
    me.receive_data(frame(DATA, 0, 1) * 3)
    fails(me, frame(DATA, 0, 1), CALM)


def test_empty_data_with_end_stream_is_not_counted() -> None:
    me = connected(limits=Limits(empty_frame_burst=1, empty_frame_rate=1.0))
    for sid in range(1, 41, 2):
        me.receive_data(open_(sid) + frame(DATA, 1, sid))
    assert me.state is ConnectionState.OPEN


def test_window_update_flood() -> None:
    me = connected(limits=Limits(window_update_burst=3, window_update_rate=1.0))
    me.receive_data(frame(WINDOW_UPDATE, 0, 0, u32(1)) * 3)
    fails(me, frame(WINDOW_UPDATE, 0, 0, u32(1)), CALM)


def test_control_queue_limit() -> None:
    """A peer that pings within the rate but never reads our ACKs cannot grow our queue without bound."""
    me = connected(limits=Limits(max_control_queue=5, ping_burst=1000))
    me.receive_data(ping() * 5)
    fails(me, ping(), CALM)


def test_control_queue_drains_when_we_write() -> None:
    me = connected(limits=Limits(max_control_queue=5, ping_burst=1000))
    for _ in range(50):
        me.receive_data(ping() * 5)
        assert me.data_to_send() == ping(ack=True) * 5


# -- flow control ----------------------------------------------------------------------------------------


def test_stream_window_overflow_is_a_stream_error() -> None:
    me = connected()
    me.receive_data(open_(1))
    me.receive_data(frame(WINDOW_UPDATE, 0, 1, u32(MAX - 262144)))  # exactly to the maximum: fine
    assert me.receive_data(frame(WINDOW_UPDATE, 0, 1, u32(1))) == [
        StreamReset(1, ErrorCode.FLOW_CONTROL_ERROR, remote=False)
    ]
    assert me.data_to_send() == frame(RESET, 0, 1, u32(FCE))
    assert me.state is ConnectionState.OPEN


def test_connection_window_overflow_is_a_connection_error() -> None:
    me = connected()
    me.receive_data(frame(WINDOW_UPDATE, 0, 0, u32(MAX - 16777216)))
    assert me.connection_send_window == MAX
    fails(me, frame(WINDOW_UPDATE, 0, 0, u32(1)), FCE)


def test_window_update_reserved_bit_is_ignored() -> None:
    me = connected()
    assert me.receive_data(frame(WINDOW_UPDATE, 0, 0, u32(0x80000005))) == [WindowUpdated(0, 5)]
    fails(me, frame(WINDOW_UPDATE, 0, 0, u32(0x80000000)), PE)  # an increment of 0 once R is dropped


def test_zero_increments() -> None:
    me = connected()
    me.receive_data(open_(1))
    assert me.receive_data(frame(WINDOW_UPDATE, 0, 1, u32(0))) == [StreamReset(1, PE, remote=False)]
    fails(me, frame(WINDOW_UPDATE, 0, 0, u32(0)), PE)


def test_data_on_a_half_closed_stream() -> None:
    me = connected()
    me.receive_data(open_(1, end=True))
    assert me.receive_data(frame(DATA, 0, 1, b"late")) == [
        StreamReset(1, ErrorCode.STREAM_CLOSED, remote=False)
    ]
    assert me.data_to_send() == frame(RESET, 0, 1, u32(ErrorCode.STREAM_CLOSED))


def test_data_beyond_the_stream_window() -> None:
    me = connected(Settings(initial_stream_window=1024, connection_window=4096))
    me.receive_data(open_(1) + open_(3))
    events = me.receive_data(frame(DATA, 0, 1, bytes(1024)))  # exactly the window: fine
    assert [type(e) for e in events] == [DataReceived]
    assert me.receive_data(frame(DATA, 0, 3, bytes(1025))) == [StreamReset(3, FCE, remote=False)]
    # The refused 1025 octets are credited to the connection at once (SPEC 8): the window left to the peer
    # (2047) is below half the connection window, so the credit is not held back for batching.
    assert me.data_to_send() == frame(WINDOW_UPDATE, 0, 0, u32(1025)) + frame(RESET, 0, 3, u32(FCE))
    # With the window back above half, stream 1's 1024 octets are credited to the stream and batched for
    # the connection.
    me.acknowledge_received_data(1, 1024)
    assert me.data_to_send() == frame(WINDOW_UPDATE, 0, 1, u32(1024))


def test_data_beyond_the_connection_window() -> None:
    me = connected(Settings(initial_stream_window=4096, connection_window=1024))
    me.receive_data(open_(1) + open_(3))
    me.receive_data(frame(DATA, 0, 1, bytes(600)))
    fails(me, frame(DATA, 0, 3, bytes(425)), FCE)


def test_data_on_closed_streams_still_counts_against_the_connection_window() -> None:
    me = connected(Settings(connection_window=1024))
    me.receive_data(open_(1, end=True))
    # Discarded and credited back at once, so the window never runs out however much arrives.
    for _ in range(10):
        me.receive_data(frame(DATA, 0, 1, bytes(1000)))
    assert me.state is ConnectionState.OPEN


# -- handshake ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "first",
    [ping(), open_(1), frame(WINDOW_UPDATE, 0, 0, u32(1)), frame(0x42, 0, 0), frame(GOAWAY, 0, 0, bytes(8))],
)
def test_first_frame_must_be_hello(first: bytes) -> None:
    fails(Connection(Role.ACCEPTOR), first, PE)


def test_second_hello() -> None:
    fails(connected(), hello(), PE)


@pytest.mark.parametrize("version", [0, 2, 0xFFFF])
def test_bad_version(version: int) -> None:
    fails(Connection(Role.ACCEPTOR), hello(version=version), PE)


@pytest.mark.parametrize(
    "setting",
    [(1, 1023), (1, 2**24), (2, 1023), (2, 2**24), (3, 2**31), (4, 2**31), (5, 2**32 - 1)],
)
def test_settings_out_of_range(setting: tuple[int, int]) -> None:
    fails(Connection(Role.ACCEPTOR), hello(setting), PE)


def test_settings_at_the_edges_of_their_range() -> None:
    for pairs in [((1, 1024), (2, 1024), (3, 0), (4, 0), (5, 0)), ((1, 2**24 - 1), (2, 2**24 - 1), (3, MAX))]:
        me = Connection(Role.ACCEPTOR)
        me.receive_data(hello(*pairs))
        assert me.state is ConnectionState.OPEN


def test_unknown_and_repeated_settings() -> None:
    me = Connection(Role.ACCEPTOR)
    me.receive_data(hello((0x99, 2**32 - 1), (1, 2048), (1, 4096)))
    assert me.peer_settings == Settings(max_frame_size=4096)


@pytest.mark.parametrize(
    "raw",
    [
        frame(HELLO, 0, 0, b"\x00\x01\x00"),
        frame(HELLO, 0, 0, b"\x00\x01\x00\x00\x00\x01\x00\x00\x40"),
    ],
)
def test_hello_of_the_wrong_length(raw: bytes) -> None:
    fails(Connection(Role.ACCEPTOR), raw, FSE)


def test_hello_on_a_stream() -> None:
    fails(Connection(Role.ACCEPTOR), frame(HELLO, 0, 1, b"\x00\x01\x00\x00"), PE)


# -- stream identifiers ------------------------------------------------------------------------------------


def test_open_with_our_parity() -> None:
    fails(connected(), open_(2), PE)


def test_open_with_a_non_increasing_id() -> None:
    me = connected()
    me.receive_data(open_(5))  # skipping ids is allowed
    fails(me, open_(3), PE)


def test_open_reusing_an_id() -> None:
    me = connected()
    me.receive_data(open_(1, end=True))
    fails(me, open_(1), PE)


@pytest.mark.parametrize(
    "raw",
    [
        frame(DATA, 0, 1, b"x"),
        frame(REPLY, 0, 1, b"\x00\xc8\x00\x00\x00"),
        frame(TRAILERS, 1, 1, b"\x00\x00"),
        frame(WINDOW_UPDATE, 0, 1, u32(1)),
        frame(RESET, 0, 1, u32(8)),
        frame(DATA, 0, 2, b"x"),  # our parity, never opened by us
        frame(RESET, 0, MAX, u32(8)),
    ],
)
def test_frames_on_idle_streams(raw: bytes) -> None:
    fails(connected(), raw, PE)


@pytest.mark.parametrize(
    "raw",
    [
        frame(OPEN, 0, 0, REQUEST),
        frame(REPLY, 0, 0, b"\x00\xc8\x00\x00\x00"),
        frame(DATA, 0, 0, b"x"),
        frame(TRAILERS, 1, 0, b"\x00\x00"),
        frame(RESET, 0, 0, u32(8)),
        frame(PING, 0, 1, bytes(8)),
        frame(GOAWAY, 0, 1, bytes(8)),
        frame(HELLO, 0, 1, b"\x00\x01\x00\x00"),
    ],
)
def test_frames_on_the_wrong_kind_of_stream_id(raw: bytes) -> None:
    fails(connected(), raw, PE)


@pytest.mark.parametrize(
    "raw",
    [
        frame(PING, 0, 0, bytes(7)),
        frame(PING, 1, 0, bytes(9)),
        frame(RESET, 0, 1, bytes(3)),
        frame(WINDOW_UPDATE, 0, 0, bytes(5)),
        frame(WINDOW_UPDATE, 0, 1, bytes(0)),
        frame(GOAWAY, 0, 0, bytes(7)),
    ],
)
def test_fixed_size_payloads_of_the_wrong_length(raw: bytes) -> None:
    me = connected()
    me.receive_data(open_(1))
    fails(me, raw, FSE)


def test_unknown_types_and_flags_are_ignored() -> None:
    me = connected()
    assert me.receive_data(frame(0x42, 0xFF, 7, b"whatever") + frame(0xFF, 0, 0)) == []
    events = me.receive_data(frame(OPEN, 0xFE, 1, REQUEST))  # undefined flags; END_STREAM clear
    assert events == [StreamOpened(1, RequestHead(b"GET", b"/"))]
    assert me.stream_state(1) is StreamState.OPEN


def test_malformed_head_is_a_stream_error() -> None:
    me = connected()
    assert me.receive_data(frame(OPEN, 0, 1, b"\x03GE")) == []
    assert me.data_to_send() == frame(RESET, 0, 1, u32(PE))
    assert me.receive_data(open_(3)) == [StreamOpened(3, RequestHead(b"GET", b"/"))]


def test_goaway_may_not_raise_its_last_stream_id() -> None:
    me = connected()
    me.receive_data(frame(GOAWAY, 0, 0, u32(10) + u32(0)))
    me.receive_data(frame(GOAWAY, 0, 0, u32(4) + u32(0)))
    fails(me, frame(GOAWAY, 0, 0, u32(6) + u32(0)), PE)


# -- after a connection error ------------------------------------------------------------------------------


def test_after_a_connection_error() -> None:
    me = connected()
    me.receive_data(open_(1) + open_(3))
    mine = me.open_stream(RequestHead(b"GET", b"/mine"))
    me.send_reply(1, ResponseHead(200))
    me.send_data(1, b"queued but never sent")
    with pytest.raises(RemoteProtocolError) as info:
        me.receive_data(frame(DATA, 0, 0, b"x") + ping())
    assert info.value.error_code is PE
    data = me.data_to_send()
    # No stream DATA goes out after the error; the GOAWAY says which of the peer's streams we saw (3) and why.
    last, code, debug = goaway_of(data)
    assert (last, code) == (3, PE)
    assert debug
    assert b"queued but never sent" not in data
    assert me.data_to_send() == b""
    assert not me.has_data_to_send
    with pytest.raises(RemoteProtocolError):
        me.receive_data(ping())
    with pytest.raises(RemoteProtocolError):
        me.receive_data(b"")
    for action in (
        lambda: me.open_stream(RequestHead(b"GET", b"/")),
        lambda: me.send_data(1, b"x"),
        lambda: me.send_reply(3, ResponseHead(200)),
        lambda: me.end_stream(1),
        lambda: me.send_trailers(1, []),
        lambda: me.reset_stream(mine),
        lambda: me.acknowledge_received_data(1, 0),
        lambda: me.ping(bytes(8)),
        lambda: me.goaway(),
    ):
        with pytest.raises(LocalProtocolError):
            action()
    assert me.data_to_send() == b""
