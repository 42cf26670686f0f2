"""Who the client is when the relay sits behind a balancer or a proxy.

- `read_proxy_header`: a PROXY protocol header (proxyprotocol.py) read off a fresh TCP connection, exactly:
  the header's bytes are peeked at and consumed, what follows them (HTTP, TLS) stays in the kernel buffer, so
  the socket goes on to h11 or TLS as if the header had never been there.
- `TrustedProxies`: `--trusted-proxy CIDR`; for connections from those networks the client is the rightmost
  X-Forwarded-For address outside them.
- `OncePer`: refusals logged once per address and interval, so a flood does not flood the log too.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections import OrderedDict
from collections.abc import Iterable, Sequence

import trio

from .proxyprotocol import MAX_V2_SIZE, ProxyHeader, ProxyHeaderParser, ProxyProtocolError

__all__ = [
    "OncePer",
    "ProxyHeaderGate",
    "ProxyHeaderMissing",
    "TrustedProxies",
    "peer_ip",
    "read_proxy_header",
]

log = logging.getLogger("rtunnel.relay")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ProxyHeaderMissing(Exception):
    """The connection closed or timed out before sending a whole PROXY protocol header."""


def peer_ip(sock: trio.socket.SocketType) -> str | None:
    """The peer's IP address (an IPv4-mapped IPv6 one as IPv4), or None when the socket is gone."""
    try:
        host = str(sock.getpeername()[0])
    except OSError:
        return None
    if host.startswith("::ffff:") and "." in host:
        return host[len("::ffff:") :]
    return host


async def read_proxy_header(sock: trio.socket.SocketType) -> ProxyHeader:
    """The connection's PROXY header, consumed from `sock` and nothing after it (the caller sets a deadline).

    Raises ProxyProtocolError at the first byte that cannot belong to a header (the rest is never read),
    ProxyHeaderMissing on EOF."""
    parser = ProxyHeaderParser()
    while parser.header is None:
        try:
            peeked = await sock.recv(MAX_V2_SIZE, socket.MSG_PEEK)
        except OSError as exc:
            raise ProxyHeaderMissing(f"connection failed ({exc.strerror or exc})") from None
        if not peeked:
            raise ProxyHeaderMissing(f"connection closed after {parser.received} bytes of a PROXY header")
        # Bytes peeked but not part of the header stay queued for whoever reads next. While the header is
        # incomplete every peeked byte is header, and consuming them makes the next peek wait for more.
        await _consume(sock, parser.feed(peeked))
    return parser.header


class ProxyHeaderGate:
    """`--proxy-protocol` on one listener: every connection must start with a valid PROXY header within
    `timeout` seconds, or it is closed. Refusals are logged once per peer address and `log_interval`."""

    def __init__(self, listener: str, timeout: float, *, log_interval: float = 60.0) -> None:
        self.listener = listener
        self.timeout = timeout
        self._refusals = OncePer(log_interval)

    async def accept(self, sock: trio.socket.SocketType, peer: str) -> ProxyHeader | None:
        """The connection's header (its `client_address` None: `peer` speaks for itself, as in a LOCAL health
        check), or None when the connection must be closed (logged)."""
        why = f"no valid PROXY protocol header within {self.timeout:g} s"
        with trio.move_on_after(self.timeout):
            try:
                header = await read_proxy_header(sock)
            except (ProxyProtocolError, ProxyHeaderMissing) as exc:
                why = str(exc)
            else:
                return header
        log_now, skipped = self._refusals.should_log(peer, trio.current_time())
        if log_now:
            more = f" ({skipped} more refused since the last line)" if skipped else ""
            log.warning(
                "%s: closing a connection from %s: %s%s; logged once per %g s per address",
                self.listener,
                peer,
                why,
                more,
                self._refusals.interval,
            )
        return None


async def _consume(sock: trio.socket.SocketType, count: int) -> None:
    while count > 0:
        data = await sock.recv(count)  # already queued (peeked), so this returns at once
        if not data:
            raise ProxyHeaderMissing("connection closed inside the PROXY header")
        count -= len(data)


class OncePer:
    """Says whether to log about `key` now: once per `interval` seconds per key, for at most `max_keys` keys
    (the least recently logged are forgotten first). `suppressed(key)` counts the lines skipped since."""

    def __init__(self, interval: float = 60.0, *, max_keys: int = 1024) -> None:
        self.interval = interval
        self.max_keys = max_keys
        self._last: OrderedDict[str, tuple[float, int]] = OrderedDict()

    def should_log(self, key: str, now: float) -> tuple[bool, int]:
        """(log now?, how many were skipped for this key since its last line)."""
        last = self._last.get(key)
        if last is not None and now - last[0] < self.interval:
            self._last[key] = (last[0], last[1] + 1)
            return False, 0
        self._last[key] = (now, 0)
        self._last.move_to_end(key)
        while len(self._last) > self.max_keys:
            self._last.popitem(last=False)
        return True, 0 if last is None else last[1]


class TrustedProxies:
    """`--trusted-proxy` networks. Connections from them carry other clients' requests, named in
    X-Forwarded-For; anyone else's X-Forwarded-For is history a client may have made up, never believed."""

    def __init__(self, cidrs: Iterable[str] = ()) -> None:
        self.networks: tuple[Network, ...] = tuple(
            ipaddress.ip_network(c.strip(), strict=False) for c in cidrs
        )

    def __bool__(self) -> bool:
        return bool(self.networks)

    def contains(self, address: str) -> bool:
        ip = _ip(address)
        return ip is not None and any(ip in network for network in self.networks)

    def client_of(self, forwarded_for: Sequence[bytes], peer: str) -> str:
        """The client behind trusted proxy `peer`: the rightmost X-Forwarded-For entry that is not a trusted
        proxy itself (`forwarded_for`: the header's values in order). An entry that is no address stops the
        walk: it may have been written by anyone, so the last trusted hop is the client as far as we know."""
        client = peer
        entries = [item for value in forwarded_for for item in value.split(b",")]
        for raw in reversed(entries):
            ip = _ip(_strip_port(raw.strip(b" \t").decode("latin-1")))
            if ip is None:
                break
            client = str(ip)
            if not any(ip in network for network in self.networks):
                break
        return client


def _strip_port(item: str) -> str:
    """'[2001:db8::1]:443' -> '2001:db8::1', '192.0.2.1:80' -> '192.0.2.1' (some proxies add the port)."""
    if item.startswith("["):
        return item[1:].partition("]")[0]
    if item.count(":") == 1:
        return item.partition(":")[0]
    return item


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip
