"""What the agent decides about a request before any I/O (SPEC.md 5.4): pure functions of the head the relay
sent, so each rule is testable without a stream or an upstream.

`prepare` checks the allowlist (the relay is not trusted to have done so) and the headers, and gives either the
upstream request's target and headers or the refusal to answer with. Once it is known whether a body follows
(`Prepared.has_body`, or the first chunk read when only that can tell), `upstream_request` frames the body and
builds the head h11 sends.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Final

import h11

from protocol import RequestHead

from ..http.bridge import BODY_METHODS, parse_content_length, transfer_encoded, without_content_length
from ..http.passthrough import upgrade_offer, with_upgrade
from ..http.proxyheaders import Header
from .allowlist import Allowlist

__all__ = ["Prepared", "Refusal", "log_path", "prepare", "upstream_request"]

# Host as a plain host[:port]: a DNS name or IPv4 address, or an IPv6 literal in brackets, and up to five port
# digits. RFC 9110 7.2 allows more (percent-encodings, sub-delims, IPvFuture), but an upstream that builds its URL
# as "http://" + Host + target could then act on another authority or path than the allowlist checked
# ("127.0.0.1%2fadmin", "evil.example:80:90").
_PLAIN_HOST: Final = re.compile(
    rb"(?:[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*\.?|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?"
)
# Headers some frameworks honour to replace the method or the path after routing (Symfony, Express's
# method-override, IIS URL rewrite): through a restricted agent they would run what the allowlist never checked.
_OVERRIDE_HEADERS: Final = frozenset(
    {b"x-http-method-override", b"x-http-method", b"x-method-override", b"x-original-url", b"x-rewrite-url"}
)


@dataclasses.dataclass(frozen=True, slots=True)
class Refusal:
    """A request the agent answers itself, with a text/plain `status` response."""

    status: int
    text: str  # the body: one line for the client
    note: str  # for the access log
    log_path: str


@dataclasses.dataclass(slots=True)  # not frozen: a frozen __init__, run for every request, costs much more
class Prepared:
    """A request that passed the checks: what to send upstream, the body's framing still open."""

    target: bytes  # normalized: exactly what the allowlist checked
    log_path: str
    headers: list[Header]  # without hop-by-hop headers (an upgrade's own excepted), Host always present
    content_length: int | None  # declared by the request (None: absent)
    chunked: bool  # the request declared Transfer-Encoding: it has a body, whatever its first chunk says
    upgrade: bool  # a protocol-switch request (SPEC 5.5), forwarded with its Upgrade header

    def has_body(self, body_ended: bool) -> bool | None:
        """Whether a body goes upstream; None if only the first chunk can tell (`body_ended`: the relay's
        direction of the stream has already ended)."""
        if self.upgrade:
            # No body, and the relay keeps its direction open for the switched protocol: peeking for a body
            # there would wait for bytes that come only after a 101.
            return False
        if self.content_length is not None:
            return self.content_length > 0
        if body_ended:
            return False
        expects_continue = any(
            name.lower() == b"expect" and value.strip().lower() == b"100-continue"
            for name, value in self.headers
        )
        if expects_continue or self.chunked:
            # A client that sent Expect waits for 100 before its body: peeking would wait for it forever.
            return True
        # Without Content-Length the body length is unknown until END_STREAM: the first chunk tells "no body"
        # (END right away) from "a body of unknown length" (chunked).
        return None


def log_path(target: bytes) -> str:
    """The path for the access log: no query (it may carry secrets), no raw control characters."""
    path = target.split(b"?", 1)[0][:512]
    return path.decode("latin-1").encode("unicode_escape").decode("ascii")


def prepare(head: RequestHead, allowlist: Allowlist, default_host: bytes) -> Prepared | Refusal:
    """The allowlist's and the header rules' verdict on `head`; `default_host` is the Host of a request that
    has none (an HTTP/1.0 client's)."""
    decision = allowlist.check(head.method, head.target)
    path = log_path(head.target if decision.target is None else decision.target)
    if not decision.allowed:
        if decision.status == 403:
            what = f"{head.method.decode('latin-1')} {path}"
            text = f"rtunnel agent: {what} is not allowed here ({decision.reason})\n"
        else:
            text = f"rtunnel agent: request refused: {decision.reason}\n"
        return Refusal(decision.status, text, "denied", path)
    assert decision.target is not None
    checked = _upstream_headers(head, restricted=not allowlist.unrestricted, default_host=default_host)
    if isinstance(checked, str):
        return Refusal(400, f"rtunnel agent: {checked}\n", "bad request", path)
    headers, content_length, chunked, upgrade = checked
    return Prepared(decision.target, path, headers, content_length, chunked, upgrade)


def _upstream_headers(
    head: RequestHead, *, restricted: bool, default_host: bytes
) -> tuple[list[Header], int | None, bool, bool] | str:
    """The upstream request headers, the Content-Length (None if absent), whether Transfer-Encoding was
    declared and whether it is a protocol switch; or a reason to answer 400."""
    raw = head.headers
    had_te = transfer_encoded(raw)
    # The relay already removed hop-by-hop headers; doing it again costs nothing and means a relay bug
    # cannot smuggle Connection/Transfer-Encoding through to the upstream. Upgrade is kept (with a single
    # Connection: upgrade) only for a bodiless protocol-switch request, h2c never (http/passthrough.py).
    has_length = any(
        name.lower() == b"content-length" and value.strip(b" \t") not in (b"0", b"") for name, value in raw
    )
    offer = None if had_te or has_length or head.method == b"CONNECT" else upgrade_offer(raw)
    headers = with_upgrade(raw, offer)
    lengths = [value for name, value in headers if name.lower() == b"content-length"]
    content_length: int | None = None
    if had_te:
        headers = without_content_length(headers)
    elif lengths:
        parsed = parse_content_length(lengths)
        if isinstance(parsed, str):
            return parsed
        content_length = parsed
    if restricted:
        # Compared as CGI/WSGI-style servers read names: "_" and "-" alike, any case.
        override = next(
            (name for name, _ in headers if name.lower().replace(b"_", b"-") in _OVERRIDE_HEADERS), None
        )
        if override is not None:
            return f"{override.decode('latin-1')} is not accepted: it would bypass the allowlist"
    hosts = [value for name, value in headers if name.lower() == b"host"]
    if len(hosts) > 1:
        return "more than one Host header"
    if hosts and _PLAIN_HOST.fullmatch(hosts[0]) is None:
        return "invalid Host header"
    if not hosts:
        # HTTP/1.1 requires Host; an HTTP/1.0 client may have sent none.
        headers.insert(0, (b"Host", default_host))
    return headers, content_length, had_te, offer is not None


def upstream_request(method: bytes, prepared: Prepared, has_body: bool) -> h11.Request | Refusal:
    """The head h11 sends upstream, its body framed: a body of unknown length goes chunked, and an empty one
    of a method that defines content gets Content-Length: 0 (some servers answer 411 without any length)."""
    headers = prepared.headers
    if prepared.content_length is None and not prepared.upgrade:
        if has_body:
            headers = [*headers, (b"Transfer-Encoding", b"chunked")]
        elif method in BODY_METHODS:
            headers = [*headers, (b"Content-Length", b"0")]
    try:
        return h11.Request(method=method, target=prepared.target, headers=headers)
    except h11.LocalProtocolError as exc:
        return Refusal(400, f"rtunnel agent: invalid request head: {exc}\n", "bad request", prepared.log_path)
