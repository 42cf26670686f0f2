"""Header rewriting for a proxy hop: pure functions over ``(name, value)`` byte pairs.

Names keep their original case and are compared case-insensitively; headers the functions do not
touch keep their order and duplicates. Every function returns a new list and leaves its input alone.

Forwarding headers (the relay faces untrusted clients):

* ``X-Forwarded-For`` and ``Via`` are *appended to*: each hop adds itself to the chain, and an upstream that
  trusts N proxies reads the last N entries, so a client's own entries are harmless history.
* ``X-Forwarded-Proto`` and ``X-Forwarded-Host`` are *replaced*: they describe the connection this relay
  accepted, which only the relay knows; a client could otherwise claim ``https`` on a plain connection or
  pick a host name that the upstream builds redirects or cookies from.
* ``Forwarded`` (RFC 7239) is *regenerated*: the client's are dropped and one element with what this relay
  knows (``for``, ``host``, ``proto``) takes their place. A client's elements cannot be told from a proxy's,
  and upstreams that read this header mostly trust its first element, not its last.
* ``X-Real-IP`` and ``X-Forwarded-Prefix`` from the client are *dropped*: the first has no chain to append to,
  the second only the relay can set (for a tunnel whose prefix it strips, registry.Route).
* ``Host`` is never changed.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Iterable, Sequence
from typing import Final

__all__ = [
    "DEFAULT_VIA",
    "Header",
    "add_forwarding",
    "connection_tokens",
    "response_headers_for_client",
    "strip_hop_by_hop",
]

Header = tuple[bytes, bytes]

DEFAULT_VIA: Final = b"1.1 rtunnel"

# Always hop-by-hop (RFC 9110 section 7.6.1, plus the legacy Keep-Alive / Proxy-Connection).
_HOP_BY_HOP: Final = frozenset(
    [b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade"]
)
# A Connection option naming one of these is ignored: they are end-to-end by definition (RFC 9110 forbids
# listing them), the relay and agent frame and route by them, and dropping Host would make the upstream
# request invalid.
_NEVER_NAMED: Final = frozenset([b"host", b"content-length"])


def _lower(name: bytes) -> bytes:
    return name.lower()


def connection_tokens(headers: Iterable[Header]) -> frozenset[bytes]:
    """Lower-cased options of every ``Connection`` header (comma-separated, empty items skipped)."""
    tokens: set[bytes] = set()
    for name, value in headers:
        if _lower(name) == b"connection":
            for item in value.split(b","):
                token = item.strip(b" \t").lower()
                if token:
                    tokens.add(token)
    return frozenset(tokens)


def strip_hop_by_hop(headers: Iterable[Header], *, keep_upgrade: bool = False) -> list[Header]:
    """Remove hop-by-hop headers: Connection and every header it names, Keep-Alive, Proxy-Connection,
    any ``Proxy-*``, TE, Trailer, Transfer-Encoding and Upgrade.

    With ``keep_upgrade`` (a protocol-switch request or its 101 reply) the ``Upgrade`` headers stay and, when
    there is one, a single ``Connection: upgrade`` is appended, since the next hop needs both to switch.
    """
    items = list(headers)
    named = connection_tokens(items) - _NEVER_NAMED
    out: list[Header] = []
    kept_upgrade = False
    for name, value in items:
        lname = _lower(name)
        if keep_upgrade and lname == b"upgrade":
            out.append((name, value))
            kept_upgrade = True
            continue
        if lname in _HOP_BY_HOP or lname in named or lname.startswith(b"proxy-"):
            continue
        out.append((name, value))
    if kept_upgrade:
        out.append((b"Connection", b"upgrade"))
    return out


def _append_to_list_header(headers: list[Header], lname: bytes, item: bytes) -> None:
    """Add ``item`` to the last header named ``lname`` (comma-joined), or append a new header."""
    for i in range(len(headers) - 1, -1, -1):
        name, value = headers[i]
        if _lower(name) == lname:
            stripped = value.strip(b" \t")
            headers[i] = (name, stripped + b", " + item if stripped else item)
            return
    headers.append((_canonical(lname), item))


# Set by this hop alone: whatever the client sent under these names is removed.
_REPLACED: Final = frozenset(
    [b"x-forwarded-proto", b"x-forwarded-host", b"forwarded", b"x-real-ip", b"x-forwarded-prefix"]
)
# RFC 9110 5.6.2 token (tchar+): a Forwarded value like this may go unquoted (RFC 7239 4).
_TOKEN: Final = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def _forwarded_value(value: bytes) -> bytes:
    """A token, or a quoted-string with ``"`` and ``\\`` escaped (RFC 9110 5.6.4)."""
    if _TOKEN.fullmatch(value) is not None:
        return value
    return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


# Per request, and parsing an address costs more than the rest of this header: a client's keep-alive
# requests, and most clients' next connections, come from an address seen just before.
@functools.lru_cache(maxsize=1024)
def _forwarded_node(client_ip: bytes) -> bytes:
    """RFC 7239 6: an IPv4 address, a bracketed IPv6 one, or ``unknown`` (a peer whose address was not read)."""
    try:
        address = ipaddress.ip_address(client_ip.decode("ascii"))
    except ValueError:
        return b"unknown"
    text = str(address)
    return (f"[{text}]" if address.version == 6 else text).encode("ascii")


def _forwarded_element(*, client_ip: bytes, proto: bytes, host: bytes | None) -> bytes:
    """This hop's ``Forwarded`` element (RFC 7239 4); an IPv6 node is bracketed, hence quoted."""
    pairs = [b"for=" + _forwarded_value(_forwarded_node(client_ip))]
    if host is not None:
        pairs.append(b"host=" + _forwarded_value(host))
    pairs.append(b"proto=" + _forwarded_value(proto))
    return b";".join(pairs)


def _canonical(lname: bytes) -> bytes:
    return b"-".join(part[:1].upper() + part[1:] for part in lname.split(b"-"))


def _ascii(text: str, what: str) -> bytes:
    data = text.encode("ascii")  # UnicodeEncodeError is a ValueError: callers pass socket data, not user text
    if not data or any(b <= 0x20 or b in b",\x7f" for b in data):
        raise ValueError(f"{what} {text!r} is not a valid header item")
    return data


def add_forwarding(
    headers: Iterable[Header],
    *,
    client_ip: str,
    proto: str,
    host: bytes | None,
    via: bytes = DEFAULT_VIA,
) -> list[Header]:
    """Add this hop's forwarding headers to a request (see the module docstring for append vs replace).

    ``client_ip`` is the peer address of the client connection, ``proto`` ``"http"`` or ``"https"`` as
    accepted by the relay, ``host`` the client's Host value (None: no X-Forwarded-Host and no ``host`` in
    Forwarded, and any the client sent is still removed).
    """
    ip = _ascii(client_ip, "client_ip")
    proto_bytes = _ascii(proto, "proto")
    out = [(name, value) for name, value in headers if _lower(name) not in _REPLACED]
    _append_to_list_header(out, b"x-forwarded-for", ip)
    out.append((b"X-Forwarded-Proto", proto_bytes))
    if host is not None:
        out.append((b"X-Forwarded-Host", host))
    out.append((b"Forwarded", _forwarded_element(client_ip=ip, proto=proto_bytes, host=host)))
    _append_to_list_header(out, b"via", via)
    return out


def response_headers_for_client(
    headers: Sequence[Header], *, keep_upgrade: bool = False, via: bytes = DEFAULT_VIA
) -> list[Header]:
    """Headers of an upstream response as the relay sends them to the client: hop-by-hop headers
    removed (``keep_upgrade`` for a 101) and this hop added to ``Via``."""
    out = strip_hop_by_hop(headers, keep_upgrade=keep_upgrade)
    _append_to_list_header(out, b"via", via)
    return out
