"""Frame and head codecs (SPEC.md sections 3-5): exact round trips and every decoding error.

Heads carry HTTP octets verbatim, so the properties here are exactness ones: whatever bytes go in (case, odd
characters, empty values, duplicates, order) come out identical, and the encoding is the one SPEC 5 draws.
"""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

import protocol
from protocol import (
    ErrorCode,
    FrameType,
    Headers,
    HeadNotEncodable,
    RemoteProtocolError,
    RequestHead,
    ResponseHead,
)
from protocol import _frames as F

from ._wire import block, connected_pair

# -- strategies -----------------------------------------------------------------------------------

# Sizes are kept modest so examples stay fast; the length prefixes' limits get their own explicit tests.
names = st.binary(min_size=1, max_size=40)
values = st.binary(max_size=60)
header_lists = st.lists(st.tuples(names, values), max_size=12).map(tuple)
# Headers drawn from a tiny alphabet so duplicates (same name, also same name+value) are common.
dup_header_lists = st.lists(
    st.tuples(st.sampled_from([b"A", b"a", b"Set-Cookie", b"X"]), st.sampled_from([b"", b"1", b"1 "])),
    max_size=10,
).map(tuple)
methods = st.binary(min_size=1, max_size=255)
targets = st.binary(min_size=1, max_size=300)
statuses = st.integers(100, 999)
reasons = st.binary(max_size=255)
stream_ids = st.integers(0, 2**31 - 1)
u32s = st.integers(0, 2**32 - 1)


# -- frame header ---------------------------------------------------------------------------------


@given(st.integers(0, 2**24 - 1), st.integers(0, 255), st.integers(0, 255), stream_ids)
def test_header_round_trip(length: int, frame_type: int, flags: int, stream_id: int) -> None:
    raw = F.pack_header(length, frame_type, flags, stream_id)
    assert len(raw) == F.FRAME_HEADER_SIZE == protocol.FRAME_HEADER_SIZE
    assert raw == length.to_bytes(3, "big") + bytes((frame_type, flags)) + stream_id.to_bytes(4, "big")
    assert F.unpack_header(b"junk" + raw, 4) == (length, frame_type, flags, stream_id)


@given(stream_ids)
def test_header_reserved_bit_is_ignored(stream_id: int) -> None:
    raw = bytearray(F.pack_header(0, 3, 0, stream_id))
    raw[5] |= 0x80
    assert F.unpack_header(bytes(raw), 0)[3] == stream_id


def test_frame_type_values_match_spec() -> None:
    assert {t.name: int(t) for t in FrameType} == {
        "HELLO": 0,
        "OPEN": 1,
        "REPLY": 2,
        "DATA": 3,
        "TRAILERS": 4,
        "WINDOW_UPDATE": 5,
        "RESET": 6,
        "PING": 7,
        "GOAWAY": 8,
    }
    assert {c.name: int(c) for c in ErrorCode} == {
        "NO_ERROR": 0,
        "PROTOCOL_ERROR": 1,
        "INTERNAL_ERROR": 2,
        "FLOW_CONTROL_ERROR": 3,
        "STREAM_CLOSED": 5,
        "FRAME_SIZE_ERROR": 6,
        "REFUSED_STREAM": 7,
        "CANCEL": 8,
        "ENHANCE_YOUR_CALM": 0xB,
    }


@given(u32s)
def test_unknown_error_codes_are_internal_error(code: int) -> None:
    known = {int(c) for c in ErrorCode}
    expected = ErrorCode(code) if code in known else ErrorCode.INTERNAL_ERROR
    assert ErrorCode.from_wire(code) is expected


# -- fixed-layout frames --------------------------------------------------------------------------


@given(st.integers(1, 2**31 - 1), st.integers(3, 4), st.binary(max_size=100))
def test_generic_frame(stream_id: int, frame_type: int, payload: bytes) -> None:
    raw = F.encode_frame(frame_type, 1, stream_id, payload)
    assert raw[: F.FRAME_HEADER_SIZE] == F.pack_header(len(payload), frame_type, 1, stream_id)
    assert raw[F.FRAME_HEADER_SIZE :] == payload


@given(st.lists(st.tuples(st.integers(0, 0xFFFF), u32s), max_size=20), st.integers(0, 0xFFFF))
def test_hello_round_trip(pairs: list[tuple[int, int]], version: int) -> None:
    raw = F.encode_hello(pairs, version)
    assert F.unpack_header(raw, 0) == (4 + 6 * len(pairs), FrameType.HELLO, 0, 0)
    payload = raw[9:]
    assert payload[:4] == struct.pack(">HH", version, 0)
    assert F.decode_hello(payload) == (version, pairs)


@pytest.mark.parametrize("size", [0, 1, 2, 3, 5, 9, 11, 4 + 6 + 5])
def test_hello_bad_length(size: int) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        F.decode_hello(b"\x00\x01" + bytes(size - 2) if size >= 2 else bytes(size))
    assert info.value.error_code is ErrorCode.FRAME_SIZE_ERROR


def test_settings_pairs_are_in_id_order_and_parse_back() -> None:
    settings = protocol.Settings(
        max_frame_size=1024,
        max_head_size=2**24 - 1,
        max_concurrent_streams=0,
        initial_stream_window=2**31 - 1,
        connection_window=7,
    )
    pairs = settings.to_pairs()
    assert [sid for sid, _ in pairs] == [1, 2, 3, 4, 5]
    assert protocol.Settings.from_pairs(pairs) == settings
    # Unknown ids are ignored, and the last of a repeated id wins (SPEC 4.1).
    assert protocol.Settings.from_pairs([(99, 5), (1, 2048), (1, 4096)]).max_frame_size == 4096


@given(stream_ids, u32s)
def test_window_update_and_reset(stream_id: int, value: int) -> None:
    raw = F.encode_window_update(stream_id, value & 0x7FFFFFFF)
    assert F.unpack_header(raw, 0) == (4, FrameType.WINDOW_UPDATE, 0, stream_id)
    assert F.decode_u32(raw[9:], "WINDOW_UPDATE") == value & 0x7FFFFFFF
    raw = F.encode_reset(stream_id, value)
    assert F.unpack_header(raw, 0) == (4, FrameType.RESET, 0, stream_id)
    assert F.decode_u32(raw[9:], "RESET") == value


@pytest.mark.parametrize("size", [0, 3, 5, 8])
def test_u32_payload_bad_length(size: int) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        F.decode_u32(bytes(size), "RESET")
    assert info.value.error_code is ErrorCode.FRAME_SIZE_ERROR


@given(st.binary(min_size=8, max_size=8), st.booleans())
def test_ping(opaque: bytes, ack: bool) -> None:
    raw = F.encode_ping(opaque, ack=ack)
    assert raw == F.pack_header(8, FrameType.PING, 1 if ack else 0, 0) + opaque


@given(stream_ids, u32s, st.binary(max_size=100))
def test_goaway_round_trip(last: int, code: int, debug: bytes) -> None:
    raw = F.encode_goaway(last, code, debug)
    assert F.unpack_header(raw, 0) == (8 + len(debug), FrameType.GOAWAY, 0, 0)
    assert F.decode_goaway(raw[9:]) == (last, code, debug)


def test_goaway_reserved_bit_and_short_payload() -> None:
    assert F.decode_goaway(b"\xff\xff\xff\xff\x00\x00\x00\x00")[0] == 2**31 - 1
    for size in range(8):
        with pytest.raises(RemoteProtocolError) as info:
            F.decode_goaway(bytes(size))
        assert info.value.error_code is ErrorCode.FRAME_SIZE_ERROR


# -- heads ----------------------------------------------------------------------------------------


@given(methods, targets, header_lists)
def test_request_head_round_trip(method: bytes, target: bytes, headers: Headers) -> None:
    head = RequestHead(method, target, headers)
    raw = F.encode_request_head(head)
    assert raw == bytes((len(method),)) + method + struct.pack(">H", len(target)) + target + block(headers)
    decoded = F.decode_request_head(raw)
    assert decoded == head
    assert type(decoded.method) is bytes and all(type(n) is bytes for n, _ in decoded.headers)


@given(statuses, reasons, header_lists)
def test_response_head_round_trip(status: int, reason: bytes, headers: Headers) -> None:
    head = ResponseHead(status, reason, headers)
    raw = F.encode_response_head(head)
    assert raw == struct.pack(">HB", status, len(reason)) + reason + block(headers)
    assert F.decode_response_head(raw) == head
    assert head.is_interim == (100 <= status <= 199 and status != 101)


@given(header_lists)
def test_trailers_round_trip(headers: Headers) -> None:
    raw = F.encode_trailers(list(headers))
    assert raw == block(headers)
    assert F.decode_trailers(raw) == headers


@given(dup_header_lists)
def test_duplicates_and_order_survive(headers: Headers) -> None:
    head = RequestHead(b"GET", b"/", headers)
    assert F.decode_request_head(F.encode_request_head(head)).headers == headers
    assert F.decode_trailers(F.encode_trailers(headers)) == headers


def test_head_limits_at_their_edges() -> None:
    big = RequestHead(b"M" * 255, b"/" * 0xFFFF, ((b"n" * 0xFFFF, b"v" * 0xFFFF),))
    assert F.decode_request_head(F.encode_request_head(big)) == big
    many = tuple((b"h", b"") for _ in range(0xFFFF))
    assert F.decode_trailers(F.encode_trailers(many)) == many
    reply = ResponseHead(999, b"r" * 255)
    assert F.decode_response_head(F.encode_response_head(reply)) == reply


@pytest.mark.parametrize(
    "encode",
    [
        lambda: F.encode_request_head(RequestHead(b"", b"/")),
        lambda: F.encode_request_head(RequestHead(b"M" * 256, b"/")),
        lambda: F.encode_request_head(RequestHead(b"GET", b"")),
        lambda: F.encode_request_head(RequestHead(b"GET", b"/" * 0x10000)),
        lambda: F.encode_request_head(RequestHead(b"GET", b"/", ((b"", b"v"),))),
        lambda: F.encode_request_head(RequestHead(b"GET", b"/", ((b"n" * 0x10000, b""),))),
        lambda: F.encode_request_head(RequestHead(b"GET", b"/", ((b"n", b"v" * 0x10000),))),
        lambda: F.encode_response_head(ResponseHead(99)),
        lambda: F.encode_response_head(ResponseHead(1000)),
        lambda: F.encode_response_head(ResponseHead(200, b"r" * 256)),
        lambda: F.encode_trailers([(b"h", b"")] * 0x10000),
    ],
)
def test_unencodable_heads_raise_head_not_encodable(encode: object) -> None:
    with pytest.raises(HeadNotEncodable):
        encode()  # type: ignore[operator]


# -- head decoding errors -------------------------------------------------------------------------

_REQUEST = F.encode_request_head(RequestHead(b"GET", b"/x", ((b"Host", b"h"), (b"A", b""))))
_RESPONSE = F.encode_response_head(ResponseHead(200, b"OK", ((b"Content-Length", b"0"),)))
_TRAILERS = F.encode_trailers([(b"Digest", b"x"), (b"B", b"")])
_DECODERS = [
    (F.decode_request_head, _REQUEST),
    (F.decode_response_head, _RESPONSE),
    (F.decode_trailers, _TRAILERS),
]


@pytest.mark.parametrize(("decode", "raw"), _DECODERS)
def test_every_truncation_is_malformed(decode: object, raw: bytes) -> None:
    for cut in range(len(raw)):
        with pytest.raises(F.HeadDecodeError):
            decode(raw[:cut])  # type: ignore[operator]


@pytest.mark.parametrize(("decode", "raw"), _DECODERS)
def test_trailing_octets_are_malformed(decode: object, raw: bytes) -> None:
    with pytest.raises(F.HeadDecodeError):
        decode(raw + b"\x00")  # type: ignore[operator]


@pytest.mark.parametrize(
    "raw",
    [
        b"\x00\x00\x01/\x00\x00",  # empty method
        b"\x03GET\x00\x00\x00\x00",  # empty target
        b"\x03GET\x00\x01/\x00\x01\x00\x00\x00\x00",  # empty header name
        b"\x03GET\x00\x01/\x00\x01\x00\x01A\x00\x05abc",  # value runs past the end
        b"\x03GET\x00\x09/\x00\x00",  # target runs past the end
        b"\xffGET",  # method runs past the end
    ],
)
def test_malformed_request_heads(raw: bytes) -> None:
    with pytest.raises(F.HeadDecodeError):
        F.decode_request_head(raw)


@pytest.mark.parametrize("status", [0, 99, 1000, 0xFFFF])
def test_status_out_of_range(status: int) -> None:
    with pytest.raises(F.HeadDecodeError):
        F.decode_response_head(struct.pack(">HB", status, 0) + b"\x00\x00")


@given(st.binary(max_size=64))
def test_arbitrary_head_payloads_fail_only_with_head_decode_error(raw: bytes) -> None:
    for decode in (F.decode_request_head, F.decode_response_head, F.decode_trailers):
        with contextlib.suppress(F.HeadDecodeError):
            decode(raw)


@given(st.binary(max_size=40))
def test_arbitrary_fixed_payloads_fail_only_with_remote_protocol_error(raw: bytes) -> None:
    for decode in (F.decode_hello, F.decode_goaway, lambda p: F.decode_u32(p, "X")):
        try:
            decode(raw)
        except RemoteProtocolError as exc:
            assert exc.error_code is ErrorCode.FRAME_SIZE_ERROR


def test_decoders_accept_memoryviews() -> None:
    view = memoryview(b"!!" + _REQUEST)[2:]
    assert F.decode_request_head(view) == F.decode_request_head(_REQUEST)
    assert F.decode_hello(memoryview(F.encode_hello([(1, 2048)])[9:])) == (1, [(1, 2048)])


# -- through two connections: the exact octets reach the application ------------------------------


@given(methods, targets, dup_header_lists, header_lists, statuses.filter(lambda s: s >= 200), reasons)
def test_heads_cross_a_connection_verbatim(
    method: bytes,
    target: bytes,
    dup_headers: Headers,
    headers: Headers,
    status: int,
    reason: bytes,
) -> None:
    relay, agent = connected_pair()
    request = RequestHead(method, target, dup_headers + headers)
    sid = relay.open_stream(request)
    assert agent.receive_data(relay.data_to_send()) == [protocol.StreamOpened(sid, request)]
    response = ResponseHead(status, reason, headers + dup_headers)
    agent.send_reply(sid, response)
    agent.send_trailers(sid, dup_headers)
    events = relay.receive_data(agent.data_to_send())
    assert events == [
        protocol.ReplyReceived(sid, response),
        protocol.TrailersReceived(sid, dup_headers),
        protocol.StreamEnded(sid),
    ]


@given(
    method=st.binary(min_size=0, max_size=300),
    target=st.binary(min_size=0, max_size=70_000).filter(lambda t: len(t) < 300 or len(t) > 0xFFFF),
    headers=st.lists(st.tuples(st.binary(max_size=3), st.binary(max_size=3)), max_size=3),
)
def test_request_head_size_is_the_open_payload_size_or_names_the_part_that_does_not_fit(
    method: bytes, target: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    head = RequestHead(method, target, tuple(headers))
    try:
        size = protocol.request_head_size(head)
    except HeadNotEncodable as exc:
        with pytest.raises(HeadNotEncodable) as again:
            F.encode_request_head(head)
        assert again.value.part is exc.part
        expected = (
            protocol.HeadPart.METHOD
            if not 1 <= len(method) <= 255
            else protocol.HeadPart.TARGET
            if not 1 <= len(target) <= 0xFFFF
            else protocol.HeadPart.HEADER
        )
        assert exc.part is expected
    else:
        assert size == len(F.encode_request_head(head))
