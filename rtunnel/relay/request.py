"""A client's request head made into what the relay sends its agent, as pure steps (no I/O, no clock).

`check_request` refuses what the relay never forwards (versions, sizes, framing, CONNECT, an agent on the
wrong port); `plan_request` routes the request, builds the head the agent gets (hop-by-hop headers stripped,
one canonical Content-Length, X-Forwarded-*, Via, X-Request-Id) and refuses what the tunnel cannot carry.
Each refusal is an `ErrorReply`: the status, the reason, and whether the connection can go on.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import h11

from protocol import HeadNotEncodable, HeadPart, RequestHead, request_head_size

from ..http.passthrough import upgrade_offer, with_upgrade
from ..http.proxyheaders import add_forwarding
from ..link.wsterms import SUBPROTOCOL
from ..ops.logs import with_request_id
from .limits import HttpLimits
from .outcome import ErrorReply
from .registry import NoRoute, Route, TunnelRouter

__all__ = ["MISDIRECTED_AGENT", "Plan", "check_request", "has_body", "plan_request", "unencodable"]

# The answer to an agent's WebSocket upgrade on the clients' listener (421 Misdirected Request).
MISDIRECTED_AGENT = 421

# The status for each part of a request head the tunnel cannot carry. A method longer than any the relay
# knows is one it does not implement (RFC 9110 15.6.2); the wire's limits come from protocol alone.
_UNENCODABLE: dict[HeadPart, tuple[int, str]] = {
    HeadPart.METHOD: (501, "method too long"),
    HeadPart.TARGET: (414, "request-target too long"),
    HeadPart.HEADER: (431, "request header field too large"),
    HeadPart.HEADER_COUNT: (431, "too many request headers"),
    HeadPart.SIZE: (431, "request head too large"),
}


class Plan(NamedTuple):
    """A request the relay will forward: where to, and the head its agent gets."""

    route: Route
    head: RequestHead
    has_body: bool
    # The Upgrade offered onward (SPEC 5.5), or None: the request cannot switch protocols.
    offer: bytes | None


def check_request(request: h11.Request, limits: HttpLimits) -> ErrorReply | None:
    """What the relay refuses in a parsed head, before it looks for an agent (None: nothing)."""
    if request.http_version not in (b"1.0", b"1.1"):
        return ErrorReply(505, f"HTTP/{request.http_version.decode()} is not supported")
    names = [name for name, _ in request.headers]
    if len(names) > limits.max_header_count:
        return ErrorReply(431, "too many request headers")
    size = sum(len(n) + len(v) + 4 for n, v in request.headers) + len(request.target) + 16
    if size > limits.max_head_size:
        return ErrorReply(431, "request head too large")
    if b"transfer-encoding" in names and b"content-length" in names:
        # RFC 9112 6.1: a proxy must not forward both; refusing closes the smuggling vector outright.
        return ErrorReply(400, "both Transfer-Encoding and Content-Length")
    if request.method == b"CONNECT":
        return ErrorReply(405, "CONNECT is not supported")
    if _offers_rtunnel(request.headers):
        # An agent dialled the clients' port: refuse it here, before its token travels on to an upstream.
        return ErrorReply(
            MISDIRECTED_AGENT, "this is the relay's HTTP listener (--http); agents connect to --agents"
        )
    if limits.max_body_size is not None:
        for name, value in request.headers:
            if name == b"content-length" and int(value) > limits.max_body_size:
                return ErrorReply(413, "request body too large")
    return None


def has_body(request: h11.Request) -> bool:
    for name, value in request.headers:
        if name == b"transfer-encoding":
            return True
        if name == b"content-length":
            return int(value) > 0
    return False


def plan_request(
    request: h11.Request,
    router: TunnelRouter,
    *,
    body: bool,
    client_ip: str,
    scheme: str,
    request_id: str | None,
) -> Plan | ErrorReply:
    """Route a checked request and build its head; or why it cannot go (no such tunnel, not encodable)."""
    host = next((value for name, value in request.headers if name == b"host"), None)
    route = router.route(host, request.target)
    if isinstance(route, NoRoute):
        # A 404 is an answer like any other: the connection goes on (if the request was read whole).
        return ErrorReply(route.status, route.reason, close=route.status != 404)
    # A protocol switch (SPEC 5.5) is tunnelled for a bodiless HTTP/1.1 request only; otherwise its
    # Upgrade header is dropped like any hop-by-hop header and the request is ordinary HTTP.
    offer = None
    if not body and request.http_version == b"1.1":
        offer = upgrade_offer(request.headers.raw_items())
    head = _build_head(request, route, offer, client_ip, scheme, request_id)
    try:
        request_head_size(head)  # what the tunnel cannot carry is refused before waiting for an agent
    except HeadNotEncodable as exc:
        return unencodable(exc)
    return Plan(route, head, body, offer)


def unencodable(exc: HeadNotEncodable) -> ErrorReply:
    """A head the tunnel's wire format cannot carry (SPEC 5): the status that fits, and close."""
    status, reason = _UNENCODABLE.get(exc.part, (400, "request head cannot be forwarded"))
    return ErrorReply(status, f"{reason} ({exc})")


def _build_head(
    request: h11.Request,
    route: Route,
    offer: bytes | None,
    client_ip: str,
    scheme: str,
    request_id: str | None,
) -> RequestHead:
    raw = list(request.headers.raw_items())
    host = next((value for name, value in raw if name.lower() == b"host"), None)
    headers = with_upgrade(raw, offer)
    lengths = [value for name, value in request.headers if name == b"content-length"]
    if lengths:
        # h11 accepted only equal values ("3, 3", or the header twice): forward exactly one, in canonical
        # form, so no later hop can read a list or a leading zero differently.
        canonical = str(int(lengths[0])).encode()
        kept: list[tuple[bytes, bytes]] = []
        for name, value in headers:
            if name.lower() != b"content-length":
                kept.append((name, value))
            elif canonical:
                kept.append((name, canonical))
                canonical = b""
        headers = kept
    headers = add_forwarding(headers, client_ip=client_ip, proto=scheme, host=host)
    headers = route.forwarded(with_request_id(headers, request_id))
    return RequestHead(request.method, route.target, tuple(headers))


def _offers_rtunnel(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    offered = (
        token.strip()
        for name, value in headers
        if name == b"sec-websocket-protocol"
        for token in value.split(b",")
    )
    return SUBPROTOCOL.encode() in offered
