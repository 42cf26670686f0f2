"""The PROXY protocol header parser (rtunnel/net/proxyprotocol.py), byte by byte.

Headers are built here by an encoder written from the spec (HAProxy's proxy-protocol.txt), independently of the
parser, then fed in every split hypothesis finds: whole, truncated, oversized, corrupted, followed by the bytes
of the protocol that comes next (which must never be consumed).
"""

from __future__ import annotations

import ipaddress
import itertools
import struct

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from rtunnel.net.proxyprotocol import (
    MAX_V1_SIZE,
    MAX_V2_SIZE,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyHeaderParser,
    ProxyProtocolError,
)

ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).filter(lambda ip: ip.ipv4_mapped is None).map(str)
ports = st.integers(0, 65535)
FAMILY_CODES = {"UNSPEC": 0x0, "INET": 0x1, "INET6": 0x2, "UNIX": 0x3}
PROTOCOL_CODES = {"UNSPEC": 0x0, "STREAM": 0x1, "DGRAM": 0x2}


def v1(family: str, source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    proto = {"INET": "TCP4", "INET6": "TCP6"}[family]
    return f"PROXY {proto} {source[0]} {destination[0]} {source[1]} {destination[1]}\r\n".encode()


def v2(
    command: int,
    family: str,
    protocol: str,
    addresses: bytes,
    tlvs: list[tuple[int, bytes]] = (),  # type: ignore[assignment]
) -> bytes:
    payload = addresses + b"".join(struct.pack("!BH", kind, len(value)) + value for kind, value in tlvs)
    fam = FAMILY_CODES[family] << 4 | PROTOCOL_CODES[protocol]
    return V2_SIGNATURE + bytes([0x20 | command, fam]) + struct.pack("!H", len(payload)) + payload


def v2_addresses(family: str, source: object, destination: object) -> bytes:
    if family == "INET" or family == "INET6":
        assert isinstance(source, tuple) and isinstance(destination, tuple)
        packed = [ipaddress.ip_address(ip).packed for ip in (source[0], destination[0])]
        return packed[0] + packed[1] + struct.pack("!HH", source[1], destination[1])
    if family == "UNIX":
        assert isinstance(source, str) and isinstance(destination, str)
        return b"".join(path.encode().ljust(108, b"\x00") for path in (source, destination))
    return b""


@st.composite
def valid_headers(draw: st.DrawFn) -> tuple[bytes, ProxyHeader]:
    """A header's bytes and what the parser must make of them: both versions, every family, LOCAL too."""
    version = draw(st.sampled_from([1, 2]))
    if version == 1:
        kind = draw(st.sampled_from(["INET", "INET6", "UNKNOWN"]))
        if kind == "UNKNOWN":
            # Anything printable may follow UNKNOWN up to the CRLF; it is ignored.
            tail = draw(st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=80))
            data = b"PROXY UNKNOWN" + (b" " + tail.encode() if tail else b"") + b"\r\n"
            return data, ProxyHeader(1, "PROXY", "UNSPEC", "UNSPEC", size=len(data))
        addresses = ipv4 if kind == "INET" else ipv6
        source = (draw(addresses), draw(ports))
        destination = (draw(addresses), draw(ports))
        data = v1(kind, source, destination)
        return data, ProxyHeader(1, "PROXY", kind, "STREAM", source, destination, size=len(data))
    family = draw(st.sampled_from(list(FAMILY_CODES)))
    protocol = draw(st.sampled_from(list(PROTOCOL_CODES)))
    source: object = None
    destination: object = None
    if family == "INET":
        source, destination = (draw(ipv4), draw(ports)), (draw(ipv4), draw(ports))
    elif family == "INET6":
        source, destination = (draw(ipv6), draw(ports)), (draw(ipv6), draw(ports))
    elif family == "UNIX":
        paths = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=100)
        source, destination = draw(paths), draw(paths)
    tlvs = draw(st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=64)), max_size=4))
    local = draw(st.booleans())
    if local:
        # A health check: whatever address block it carries is ignored.
        data = v2(0x0, family, protocol, v2_addresses(family, source, destination), tlvs)
        return data, ProxyHeader(2, "LOCAL", "UNSPEC", "UNSPEC", size=len(data))
    data = v2(0x1, family, protocol, v2_addresses(family, source, destination), tlvs)
    if family == "UNSPEC":
        return data, ProxyHeader(2, "PROXY", "UNSPEC", protocol, size=len(data))
    expected = ProxyHeader(2, "PROXY", family, protocol, source, destination, tuple(tlvs), len(data))
    return data, expected


@st.composite
def splits(draw: st.DrawFn, data: bytes) -> list[bytes]:
    """`data` cut into pieces at points hypothesis picks (one byte at a time included)."""
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(data) - 1)), max_size=len(data))))
    bounds = [0, *[c for c in cuts if c < len(data)], len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]


def feed_all(parser: ProxyHeaderParser, pieces: list[bytes]) -> list[int]:
    return [parser.feed(piece) for piece in pieces]


@given(st.data(), valid_headers(), st.binary(max_size=64))
def test_a_valid_header_split_anywhere_is_parsed_and_nothing_after_it_is_consumed(
    data: st.DataObject, case: tuple[bytes, ProxyHeader], after: bytes
) -> None:
    raw, expected = case
    pieces = data.draw(splits(raw + after))
    parser = ProxyHeaderParser()
    consumed = feed_all(parser, pieces)
    assert parser.header == expected
    assert sum(consumed) == len(raw)  # the next protocol's bytes stay where they are
    assert parser.received == len(raw)
    assert parser.feed(b"more") == 0


@given(valid_headers(), st.data())
def test_a_truncated_header_is_incomplete_not_an_error(
    case: tuple[bytes, ProxyHeader], data: st.DataObject
) -> None:
    raw, _ = case
    cut = data.draw(st.integers(1, len(raw) - 1))
    parser = ProxyHeaderParser()
    assert sum(feed_all(parser, data.draw(splits(raw[:cut])))) == cut  # every byte so far is header
    assert parser.header is None
    assert parser.feed(raw[cut:]) == len(raw) - cut
    assert parser.header is not None


@given(valid_headers(), st.data())
def test_a_corrupted_signature_is_refused_on_the_byte_that_shows_it(
    case: tuple[bytes, ProxyHeader], data: st.DataObject
) -> None:
    raw, _ = case
    signature = 6 if raw.startswith(b"PROXY ") else len(V2_SIGNATURE)
    index = data.draw(st.integers(0, signature - 1))
    # The corrupted byte must not start the other version's signature instead (b"\r" in place of the "P" of
    # "PROXY " begins a v2 header): that would be a different header, not a corrupted one.
    byte = data.draw(
        st.integers(0, 255).filter(
            lambda b: not any(sig.startswith(raw[:index] + bytes([b])) for sig in (b"PROXY ", V2_SIGNATURE))
        )
    )
    corrupted = raw[:index] + bytes([byte]) + raw[index + 1 :]
    parser = ProxyHeaderParser()
    for i in range(index):
        assert parser.feed(corrupted[i : i + 1]) == 1
    with pytest.raises(ProxyProtocolError):
        parser.feed(corrupted[index : index + 1])
    with pytest.raises(ProxyProtocolError):
        parser.feed(b"anything")  # refused for good: nothing more is read


def test_a_v1_signature_corrupted_into_the_start_of_v2_is_refused_where_it_stops_matching() -> None:
    # The case the property above leaves out: "\rROXY ..." is refused on its second byte, not its first.
    parser = ProxyHeaderParser()
    assert parser.feed(b"\r") == 1  # still the start of the v2 signature
    with pytest.raises(ProxyProtocolError):
        parser.feed(b"R")


@given(st.binary(min_size=1, max_size=200))
def test_arbitrary_bytes_are_refused_within_the_size_bounds_or_are_a_header(data: bytes) -> None:
    parser = ProxyHeaderParser()
    fed = 0
    try:
        for i in range(len(data)):
            fed += parser.feed(data[i : i + 1])
            if parser.header is not None:
                break
    except ProxyProtocolError:
        assert fed <= MAX_V2_SIZE
        return
    assert parser.header is not None or fed == len(data)
    if not data.startswith(V2_SIGNATURE[:1]):
        assert fed < MAX_V1_SIZE or parser.header is not None  # a v1 header never takes more than 107 bytes


@given(st.data())
def test_a_v1_line_longer_than_107_bytes_is_refused_at_byte_107(data: st.DataObject) -> None:
    line = b"PROXY UNKNOWN " + b"x" * 200
    parser = ProxyHeaderParser()
    fed = 0
    with pytest.raises(ProxyProtocolError, match="longer than 107"):
        for piece in data.draw(splits(line)):
            fed += len(piece)
            parser.feed(piece)
    assert fed - len(piece) < MAX_V1_SIZE  # refused on the piece that reached the limit


def test_the_longest_v1_header_is_accepted() -> None:
    address = "ffff:" * 7 + "ffff"
    longest = f"PROXY UNKNOWN {address} {address} 65535 65535\r\n".encode()  # the spec's worst case
    assert len(longest) == MAX_V1_SIZE
    parser = ProxyHeaderParser()
    assert parser.feed(longest) == MAX_V1_SIZE
    assert parser.header is not None and parser.header.client_address is None
    tcp6 = v1("INET6", (address, 65535), (address, 65535))
    parser = ProxyHeaderParser()
    assert parser.feed(tcp6) == len(tcp6)
    assert parser.header is not None and parser.header.client_address == address


@given(st.integers(MAX_V2_SIZE - 16 + 1, 65535), st.data())
def test_an_oversized_v2_header_is_refused_once_its_length_is_read(length: int, data: st.DataObject) -> None:
    fixed = V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", length)
    parser = ProxyHeaderParser()
    assert parser.feed(fixed[:15]) == 15
    with pytest.raises(ProxyProtocolError, match="exceeds the limit"):
        parser.feed(fixed[15:] + data.draw(st.binary(max_size=100)))


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", "not a PROXY protocol header"),
        (b"\x16\x03\x01\x02\x00", "not a PROXY protocol header"),  # a TLS ClientHello
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "CRLF"),
        (b"PROXY TCP4 1.2.3.4\r 5.6.7.8 1 2\r\n", "CRLF"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "four fields"),
        (b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n", "four fields"),
        (b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", "TCP4, TCP6 or UNKNOWN"),
        (b"PROXY TCP4 ::1 ::1 1 2\r\n", "not an INET address"),
        (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "not an INET6 address"),
        (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "not an INET6 address"),
        (b"PROXY TCP4 1.2.3.04 5.6.7.8 1 2\r\n", "not an INET address"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", "not a port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", "not a port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n", "not a port"),
        (b"PROXY TCP4 1.2.3.4\x00 5.6.7.8 1 2\r\n", "contains byte 0x00"),
        (b"PROXY UNKNOWN \xff\r\n", "contains byte 0xff"),
        (V2_SIGNATURE + b"\x11\x11\x00\x0c" + b"\x00" * 12, "version 1"),
        (V2_SIGNATURE + b"\x22\x11\x00\x0c" + b"\x00" * 12, "unknown command"),
        (V2_SIGNATURE + b"\x21\x41\x00\x0c" + b"\x00" * 12, "unknown address family"),
        (V2_SIGNATURE + b"\x21\x13\x00\x0c" + b"\x00" * 12, "unknown address family"),
        (V2_SIGNATURE + b"\x21\x11\x00\x0b" + b"\x00" * 11, "too short for an INET address"),
        (V2_SIGNATURE + b"\x21\x21\x00\x0c" + b"\x00" * 12, "too short for an INET6 address"),
        (V2_SIGNATURE + b"\x21\x31\x00\x0c" + b"\x00" * 12, "too short for an UNIX address"),
        (V2_SIGNATURE + b"\x21\x11\x00\x0e" + b"\x00" * 14, "ends inside a TLV"),
        (V2_SIGNATURE + b"\x21\x11\x00\x10" + b"\x00" * 12 + b"\x04\x00\x09\x00", "runs past the end"),
    ],
)
def test_malformed_headers_are_refused_with_a_reason(raw: bytes, reason: str) -> None:
    with pytest.raises(ProxyProtocolError, match=reason):
        ProxyHeaderParser().feed(raw)


def test_the_specs_examples_and_what_the_client_address_is() -> None:
    cases = [
        (b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n", "192.168.0.1"),
        (b"PROXY TCP6 ::ffff:192.0.2.7 2001:db8::1 1 2\r\n", "192.0.2.7"),  # mapped: one key per client
        (b"PROXY TCP6 2001:DB8:0:0::1 ::1 1 2\r\n", "2001:db8::1"),  # canonical form
        (b"PROXY UNKNOWN\r\n", None),
        (b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n", None),
        (v2(0x1, "INET", "STREAM", bytes([10, 0, 0, 1, 10, 0, 0, 2]) + b"\x30\x39\x01\xbb"), "10.0.0.1"),
        (v2(0x0, "INET", "STREAM", b""), None),  # LOCAL without addresses: a health check
        (v2(0x0, "UNSPEC", "UNSPEC", b"anything at all"), None),
        (v2(0x1, "UNIX", "STREAM", b"/run/a".ljust(108, b"\0") + b"/run/b".ljust(108, b"\0")), None),
    ]
    for raw, client in cases:
        parser = ProxyHeaderParser()
        assert parser.feed(raw) == len(raw), raw
        assert parser.header is not None
        assert parser.header.client_address == client, raw
    header = ProxyHeaderParser()
    header.feed(v2(0x1, "INET", "STREAM", bytes([10, 0, 0, 1, 10, 0, 0, 2]) + b"\x30\x39\x01\xbb"))
    assert header.header is not None
    assert header.header.source == ("10.0.0.1", 12345)
    assert header.header.destination == ("10.0.0.2", 443)


@given(valid_headers(), st.data())
def test_a_smaller_v2_limit_is_enforced(case: tuple[bytes, ProxyHeader], data: st.DataObject) -> None:
    raw, _ = case
    assume(raw.startswith(V2_SIGNATURE))
    limit = data.draw(st.integers(16, len(raw)))
    parser = ProxyHeaderParser(max_v2_size=limit)
    if len(raw) <= limit:
        parser.feed(raw)
        assert parser.header is not None
    else:
        with pytest.raises(ProxyProtocolError, match="exceeds the limit"):
            parser.feed(raw)
