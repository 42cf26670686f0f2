"""The PROXY protocol header (HAProxy's proxy-protocol.txt, versions 1 and 2), parsed sans-IO.

A TCP load balancer in front of the relay (HAProxy `send-proxy` / `send-proxy-v2`, nginx `proxy_protocol on`,
cloud network balancers) writes this header as the first bytes of each connection it opens to us, naming the
client it accepted the connection from. No clock, no socket: `ProxyHeaderParser.feed` takes bytes and says how
many of them belong to the header, so a caller can peek at a socket and consume exactly the header, leaving what
follows (HTTP, TLS) untouched in the kernel buffer.

Everything is checked strictly and as early as possible: a connection whose first bytes cannot start a header
is refused on those bytes, a v1 line longer than the spec's 107 bytes or a v2 length beyond `max_v2_size` on
the byte that shows it, so a peer that is not the balancer costs nothing and is never read to the end.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import struct
from typing import Final, Literal, NoReturn

__all__ = [
    "MAX_V1_SIZE",
    "MAX_V2_SIZE",
    "V2_SIGNATURE",
    "ProxyHeader",
    "ProxyHeaderParser",
    "ProxyProtocolError",
]

V1_PREFIX: Final = b"PROXY "
V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
# The spec's bound for a v1 line, CRLF included ("PROXY TCP6" and two full IPv6 addresses and ports).
MAX_V1_SIZE: Final = 107
# v2 may carry TLVs (cloud balancers add a few hundred bytes: AWS VPC endpoint ids, Azure link ids, SSL
# details). The 16-bit length allows 64 KiB; 4 KiB holds every real header with room to spare and bounds what
# a connection can make us buffer before it has proved anything.
MAX_V2_SIZE: Final = 4096
_V2_FIXED: Final = 16  # signature, version/command, family/protocol, length

_FAMILIES: Final = {0x0: "UNSPEC", 0x1: "INET", 0x2: "INET6", 0x3: "UNIX"}
_PROTOCOLS: Final = {0x0: "UNSPEC", 0x1: "STREAM", 0x2: "DGRAM"}
_ADDRESS_SIZES: Final = {"UNSPEC": 0, "INET": 12, "INET6": 36, "UNIX": 216}
_PORT: Final = re.compile(rb"0|[1-9][0-9]{0,4}")
# What may appear in a v1 line before its CRLF (the spec's grammar uses printable US-ASCII and spaces only).
_V1_BAD_BYTE: Final = re.compile(rb"[^\x20-\x7e\r]")

Address = tuple[str, int] | str | None


class ProxyProtocolError(ValueError):
    """The bytes are not a valid PROXY protocol header; str() says why, in one line."""


@dataclasses.dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A parsed header. `source` and `destination` are (ip, port) for INET/INET6, a path for UNIX, else None.

    `family` is INET, INET6, UNIX or UNSPEC (v1's TCP4 is INET, TCP6 INET6, UNKNOWN UNSPEC); `protocol` is
    STREAM, DGRAM or UNSPEC (v1 headers are STREAM, or UNSPEC for UNKNOWN)."""

    version: Literal[1, 2]
    command: Literal["PROXY", "LOCAL"]
    family: str
    protocol: str
    source: Address = None
    destination: Address = None
    tlvs: tuple[tuple[int, bytes], ...] = ()
    size: int = 0  # bytes the header took on the wire

    @property
    def client_address(self) -> str | None:
        """The client's IP address, or None when the header names none (a LOCAL health check of the
        balancer itself, UNKNOWN/UNSPEC, a UNIX socket): the connection's own peer is the client then."""
        if self.command == "PROXY" and isinstance(self.source, tuple):
            return self.source[0]
        return None


class ProxyHeaderParser:
    """Incremental parser of one header. Feed it the connection's first bytes until `header` is set.

    `feed(data)` returns how many leading bytes of `data` are part of the header (all of them until the
    header is complete, then only those up to its end; 0 once it is done) and raises ProxyProtocolError at the
    first byte that proves the input is not a valid header. After an error the parser refuses further input.
    """

    def __init__(self, *, max_v2_size: int = MAX_V2_SIZE) -> None:
        self.max_v2_size = max(max_v2_size, _V2_FIXED)
        self.header: ProxyHeader | None = None
        self._buffer = bytearray()
        self._failed: ProxyProtocolError | None = None

    @property
    def received(self) -> int:
        """Header bytes consumed so far."""
        return len(self._buffer)

    def feed(self, data: bytes) -> int:
        if self._failed is not None:
            raise self._failed
        if self.header is not None or not data:
            return 0
        try:
            return self._feed(data)
        except ProxyProtocolError as exc:
            self._failed = exc
            raise

    def _feed(self, data: bytes) -> int:
        before = len(self._buffer)
        first = self._buffer[:1] or data[:1]
        if first == V1_PREFIX[:1]:
            return self._feed_v1(data)
        if first == V2_SIGNATURE[:1]:
            return self._feed_v2(data, before)
        raise ProxyProtocolError(f"not a PROXY protocol header (starts with {bytes(first)!r})")

    # -- version 1 --------------------------------------------------------------------------------------

    def _feed_v1(self, data: bytes) -> int:
        end = data.find(b"\n")
        taken = data if end < 0 else data[: end + 1]
        line = bytes(self._buffer) + taken
        prefix = min(len(line), len(V1_PREFIX))
        if line[:prefix] != V1_PREFIX[:prefix]:
            raise ProxyProtocolError("not a PROXY protocol header (bad v1 signature)")
        body = line[:-1] if end >= 0 else line
        bad = _V1_BAD_BYTE.search(body)
        if bad is not None:
            raise ProxyProtocolError(f"v1 header contains byte {body[bad.start()]:#04x}")
        if len(line) > MAX_V1_SIZE or (end < 0 and len(line) == MAX_V1_SIZE):
            raise ProxyProtocolError(f"v1 header longer than {MAX_V1_SIZE} bytes")
        if b"\r" in body[:-1] or (end >= 0 and body[-1:] != b"\r"):
            raise ProxyProtocolError("v1 header line does not end with CRLF")
        self._buffer += taken
        if end >= 0:
            self.header = _parse_v1(line)
        return len(taken)

    # -- version 2 --------------------------------------------------------------------------------------

    def _feed_v2(self, data: bytes, before: int) -> int:
        taken = 0
        if before < _V2_FIXED:
            taken = min(len(data), _V2_FIXED - before)
            self._buffer += data[:taken]
            fixed = bytes(self._buffer)
            signature = fixed[: len(V2_SIGNATURE)]
            if signature != V2_SIGNATURE[: len(signature)]:
                raise ProxyProtocolError("not a PROXY protocol header (bad v2 signature)")
            if len(fixed) > 12:
                _check_v2_version(fixed[12])
            if len(fixed) > 13 and fixed[12] & 0xF:  # LOCAL: the family byte is to be ignored
                _v2_family(fixed[13])
            if len(fixed) < _V2_FIXED:
                return taken
        length: int = struct.unpack_from("!H", self._buffer, 14)[0]
        total = _V2_FIXED + length
        if total > self.max_v2_size:
            raise ProxyProtocolError(f"v2 header of {total} bytes exceeds the limit of {self.max_v2_size}")
        more = min(len(data) - taken, total - len(self._buffer))
        self._buffer += data[taken : taken + more]
        taken += more
        if len(self._buffer) == total:
            self.header = _parse_v2(bytes(self._buffer))
        return taken


def _check_v2_version(byte: int) -> None:
    if byte >> 4 != 2:
        raise ProxyProtocolError(f"v2 header with version {byte >> 4} (expected 2)")
    if byte & 0xF not in (0x0, 0x1):
        raise ProxyProtocolError(f"v2 header with unknown command {byte & 0xF:#x}")


def _v2_family(byte: int) -> tuple[str, str]:
    family, protocol = _FAMILIES.get(byte >> 4), _PROTOCOLS.get(byte & 0xF)
    if family is None or protocol is None:
        raise ProxyProtocolError(f"v2 header with unknown address family/protocol {byte:#04x}")
    return family, protocol


def _parse_v1(line: bytes) -> ProxyHeader:
    parts = line[len(V1_PREFIX) : -2].split(b" ")
    if parts[0] == b"UNKNOWN":
        # The spec: everything after UNKNOWN up to the CRLF is to be ignored; the peer is the client.
        return ProxyHeader(1, "PROXY", "UNSPEC", "UNSPEC", size=len(line))
    if len(parts) != 5 or parts[0] not in (b"TCP4", b"TCP6"):
        raise ProxyProtocolError("malformed v1 header (expected TCP4, TCP6 or UNKNOWN and four fields)")
    family = "INET" if parts[0] == b"TCP4" else "INET6"
    source_ip, destination_ip = (_v1_ip(text, family) for text in parts[1:3])
    source_port, destination_port = (_v1_port(text) for text in parts[3:5])
    return ProxyHeader(
        1,
        "PROXY",
        family,
        "STREAM",
        (source_ip, source_port),
        (destination_ip, destination_port),
        size=len(line),
    )


def _v1_ip(text: bytes, family: str) -> str:
    kind = ipaddress.IPv4Address if family == "INET" else ipaddress.IPv6Address
    try:
        # No zone ids ("%eth0"): they name an interface of the balancer's host, not a client.
        return _normal(kind(text.decode("ascii"))) if b"%" not in text else _bad_ip(text, family)
    except ValueError:
        return _bad_ip(text, family)


def _bad_ip(text: bytes, family: str) -> NoReturn:
    raise ProxyProtocolError(f"malformed v1 header: {text[:45]!r} is not an {family} address")


def _v1_port(text: bytes) -> int:
    if _PORT.fullmatch(text) is None or int(text) > 65535:
        raise ProxyProtocolError(f"malformed v1 header: {text[:8]!r} is not a port")
    return int(text)


def _normal(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """The canonical text of an address; an IPv4-mapped IPv6 address as the IPv4 one it stands for, so one
    client is one key whichever way the balancer spelled it."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def _parse_v2(data: bytes) -> ProxyHeader:
    if not data[12] & 0xF:
        # LOCAL (the balancer's own health check): the receiver must discard the whole address block,
        # family included, and treat the connection as the balancer's.
        return ProxyHeader(2, "LOCAL", "UNSPEC", "UNSPEC", size=len(data))
    family, protocol = _v2_family(data[13])
    payload = data[_V2_FIXED:]
    if family == "UNSPEC":
        return ProxyHeader(
            2, "PROXY", family, protocol, size=len(data)
        )  # unknown origin: the block is ignored
    size = _ADDRESS_SIZES[family]
    if len(payload) < size:
        raise ProxyProtocolError(f"v2 header too short for an {family} address ({len(payload)} bytes)")
    source: Address = None
    destination: Address = None
    if family == "INET":
        source_ip, destination_ip, source_port, destination_port = struct.unpack_from("!4s4sHH", payload)
        source = (str(ipaddress.IPv4Address(source_ip)), source_port)
        destination = (str(ipaddress.IPv4Address(destination_ip)), destination_port)
    elif family == "INET6":
        source_ip, destination_ip, source_port, destination_port = struct.unpack_from("!16s16sHH", payload)
        source = (_normal(ipaddress.IPv6Address(source_ip)), source_port)
        destination = (_normal(ipaddress.IPv6Address(destination_ip)), destination_port)
    else:
        source, destination = (_unix_path(payload[i : i + 108]) for i in (0, 108))
    return ProxyHeader(
        2, "PROXY", family, protocol, source, destination, _parse_tlvs(payload[size:]), len(data)
    )


def _unix_path(raw: bytes) -> str:
    return raw.split(b"\x00", 1)[0].decode("utf-8", "replace")


def _parse_tlvs(data: bytes) -> tuple[tuple[int, bytes], ...]:
    tlvs: list[tuple[int, bytes]] = []
    offset = 0
    while offset < len(data):
        if len(data) - offset < 3:
            raise ProxyProtocolError("v2 header ends inside a TLV")
        kind, length = struct.unpack_from("!BH", data, offset)
        offset += 3
        if length > len(data) - offset:
            raise ProxyProtocolError(f"v2 TLV {kind:#04x} runs past the end of the header")
        tlvs.append((kind, data[offset : offset + length]))
        offset += length
    return tuple(tlvs)
