"""Tests for rtunnel.http.proxyheaders: hop-by-hop stripping and forwarding headers."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rtunnel.http.proxyheaders import (
    Header,
    add_forwarding,
    connection_tokens,
    response_headers_for_client,
    strip_hop_by_hop,
)

STRIP_CASES: list[tuple[str, list[Header], list[Header]]] = [
    ("nothing to strip", [(b"Host", b"a"), (b"Accept", b"*/*")], [(b"Host", b"a"), (b"Accept", b"*/*")]),
    (
        "fixed hop-by-hop set, any case",
        [
            (b"Host", b"a"),
            (b"connection", b"keep-alive"),
            (b"Keep-Alive", b"timeout=5"),
            (b"PROXY-CONNECTION", b"keep-alive"),
            (b"TE", b"trailers"),
            (b"Trailer", b"X-Sum"),
            (b"Transfer-Encoding", b"chunked"),
            (b"Upgrade", b"websocket"),
            (b"X-Keep", b"1"),
        ],
        [(b"Host", b"a"), (b"X-Keep", b"1")],
    ),
    (
        "any Proxy-* header",
        [(b"Proxy-Authorization", b"Basic x"), (b"proxy-foo", b"1"), (b"Proxyish", b"kept")],
        [(b"Proxyish", b"kept")],
    ),
    (
        "headers named by several Connection headers",
        [
            (b"Connection", b"close, X-A"),
            (b"X-A", b"1"),
            (b"X-B", b"2"),
            (b"x-c", b"3"),
            (b"Connection", b" x-B ,,\tX-C "),
            (b"X-D", b"4"),
        ],
        [(b"X-D", b"4")],
    ),
    (
        "Connection naming Host or Content-Length is ignored for those",
        [
            (b"Host", b"a"),
            (b"Connection", b"host, Content-Length, Authorization"),
            (b"Content-Length", b"3"),
            (b"Authorization", b"Bearer t"),
        ],
        [(b"Host", b"a"), (b"Content-Length", b"3")],
    ),
    (
        "order and duplicates of other headers kept",
        [(b"X-A", b"1"), (b"Te", b"x"), (b"x-a", b"2"), (b"Set-Cookie", b"a"), (b"Set-Cookie", b"b")],
        [(b"X-A", b"1"), (b"x-a", b"2"), (b"Set-Cookie", b"a"), (b"Set-Cookie", b"b")],
    ),
]


@pytest.mark.parametrize(("name", "headers", "expected"), STRIP_CASES, ids=[c[0] for c in STRIP_CASES])
def test_strip_hop_by_hop(name: str, headers: list[Header], expected: list[Header]) -> None:
    original = list(headers)
    assert strip_hop_by_hop(headers) == expected
    assert headers == original  # input untouched


def test_keep_upgrade_request() -> None:
    headers = [
        (b"Host", b"a"),
        (b"Connection", b"Upgrade, HTTP2-Settings"),
        (b"HTTP2-Settings", b"xyz"),
        (b"upgrade", b"websocket"),
        (b"Sec-WebSocket-Key", b"k"),
        (b"Keep-Alive", b"1"),
    ]
    assert strip_hop_by_hop(headers, keep_upgrade=True) == [
        (b"Host", b"a"),
        (b"upgrade", b"websocket"),
        (b"Sec-WebSocket-Key", b"k"),
        (b"Connection", b"upgrade"),
    ]
    # Without keep_upgrade the same request loses Upgrade.
    assert strip_hop_by_hop(headers) == [(b"Host", b"a"), (b"Sec-WebSocket-Key", b"k")]


def test_keep_upgrade_without_upgrade_header_adds_no_connection() -> None:
    headers = [(b"Connection", b"keep-alive"), (b"X", b"1")]
    assert strip_hop_by_hop(headers, keep_upgrade=True) == [(b"X", b"1")]


def test_connection_tokens() -> None:
    headers = [(b"Connection", b"Close, X-A"), (b"X", b"y"), (b"CONNECTION", b" ,upgrade,")]
    assert connection_tokens(headers) == frozenset({b"close", b"x-a", b"upgrade"})
    assert connection_tokens([]) == frozenset()


FORWARD_CASES: list[tuple[str, list[Header], bytes | None, list[Header]]] = [
    (
        "fresh request",
        [(b"Host", b"example.com"), (b"Accept", b"*/*")],
        b"example.com",
        [
            (b"Host", b"example.com"),
            (b"Accept", b"*/*"),
            (b"X-Forwarded-For", b"192.0.2.7"),
            (b"X-Forwarded-Proto", b"https"),
            (b"X-Forwarded-Host", b"example.com"),
            (b"Forwarded", b"for=192.0.2.7;host=example.com;proto=https"),
            (b"Via", b"1.1 rtunnel"),
        ],
    ),
    (
        "append to the last X-Forwarded-For and Via, replace Proto and Host",
        [
            (b"x-forwarded-for", b"10.0.0.1"),
            (b"Host", b"example.com"),
            (b"X-Forwarded-For", b"10.0.0.2, 10.0.0.3"),
            (b"X-Forwarded-Proto", b"http"),
            (b"x-forwarded-host", b"evil.example"),
            (b"via", b"1.0 fred"),
            (b"X-Forwarded-Proto", b"ftp"),
        ],
        b"example.com",
        [
            (b"x-forwarded-for", b"10.0.0.1"),
            (b"Host", b"example.com"),
            (b"X-Forwarded-For", b"10.0.0.2, 10.0.0.3, 192.0.2.7"),
            (b"via", b"1.0 fred, 1.1 rtunnel"),
            (b"X-Forwarded-Proto", b"https"),
            (b"X-Forwarded-Host", b"example.com"),
            (b"Forwarded", b"for=192.0.2.7;host=example.com;proto=https"),
        ],
    ),
    (
        "no host: client X-Forwarded-Host still removed",
        [(b"X-Forwarded-Host", b"evil"), (b"X-Forwarded-For", b" "), (b"Via", b"")],
        None,
        [
            (b"X-Forwarded-For", b"192.0.2.7"),
            (b"Via", b"1.1 rtunnel"),
            (b"X-Forwarded-Proto", b"https"),
            (b"Forwarded", b"for=192.0.2.7;proto=https"),
        ],
    ),
    (
        "Forwarded, X-Real-IP and X-Forwarded-Prefix are the relay's to say",
        [
            (b"Forwarded", b"for=10.0.0.1;host=admin"),
            (b"X-Real-IP", b"10.0.0.1"),
            (b"x-forwarded-prefix", b"/admin"),
            (b"FORWARDED", b"for=unknown"),
            (b"Host", b'a"b\\c:81'),
        ],
        b'a"b\\c:81',
        [
            (b"Host", b'a"b\\c:81'),
            (b"X-Forwarded-For", b"192.0.2.7"),
            (b"X-Forwarded-Proto", b"https"),
            (b"X-Forwarded-Host", b'a"b\\c:81'),
            (b"Forwarded", b'for=192.0.2.7;host="a\\"b\\\\c:81";proto=https'),
            (b"Via", b"1.1 rtunnel"),
        ],
    ),
]


@pytest.mark.parametrize(
    ("name", "headers", "host", "expected"), FORWARD_CASES, ids=[c[0] for c in FORWARD_CASES]
)
def test_add_forwarding(name: str, headers: list[Header], host: bytes | None, expected: list[Header]) -> None:
    original = list(headers)
    assert add_forwarding(headers, client_ip="192.0.2.7", proto="https", host=host) == expected
    assert headers == original


def test_add_forwarding_ipv6_and_custom_via() -> None:
    out = add_forwarding([], client_ip="2001:db8::1", proto="http", host=b"h", via=b"1.1 relay-1")
    assert out == [
        (b"X-Forwarded-For", b"2001:db8::1"),
        (b"X-Forwarded-Proto", b"http"),
        (b"X-Forwarded-Host", b"h"),
        (b"Forwarded", b'for="[2001:db8::1]";host=h;proto=http'),
        (b"Via", b"1.1 relay-1"),
    ]


def test_forwarded_names_an_unknown_peer_as_unknown() -> None:
    out = add_forwarding([], client_ip="?", proto="http", host=None)
    assert (b"Forwarded", b"for=unknown;proto=http") in out


@pytest.mark.parametrize(
    ("client_ip", "proto"),
    [("1.2.3.4, 6.6.6.6", "http"), ("", "http"), ("1.2.3.4", "ht tp"), ("1.2.3.4", "é")],
)
def test_add_forwarding_rejects_bad_items(client_ip: str, proto: str) -> None:
    with pytest.raises(ValueError):
        add_forwarding([], client_ip=client_ip, proto=proto, host=None)


def test_response_headers_for_client() -> None:
    headers = [
        (b"Content-Type", b"text/plain"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Connection", b"close, X-Internal"),
        (b"X-Internal", b"1"),
        (b"Proxy-Authenticate", b"Basic"),
        (b"Via", b"1.1 upstream"),
        (b"Content-Length", b"5"),
    ]
    assert response_headers_for_client(headers) == [
        (b"Content-Type", b"text/plain"),
        (b"Via", b"1.1 upstream, 1.1 rtunnel"),
        (b"Content-Length", b"5"),
    ]


def test_response_headers_for_101() -> None:
    headers = [(b"Upgrade", b"websocket"), (b"Connection", b"Upgrade"), (b"Sec-WebSocket-Accept", b"x")]
    assert response_headers_for_client(headers, keep_upgrade=True) == [
        (b"Upgrade", b"websocket"),
        (b"Sec-WebSocket-Accept", b"x"),
        (b"Connection", b"upgrade"),
        (b"Via", b"1.1 rtunnel"),
    ]


_names = st.sampled_from(
    [b"Connection", b"connection", b"Upgrade", b"TE", b"Proxy-X", b"X-A", b"x-a", b"Host", b"Keep-Alive"]
)
_values = st.sampled_from([b"", b"x-a", b"X-A, host", b"upgrade", b"close", b"1"])


@given(st.lists(st.tuples(_names, _values), max_size=12), st.booleans())
def test_strip_is_idempotent_and_leaves_no_hop_by_hop(headers: list[Header], keep: bool) -> None:
    out = strip_hop_by_hop(headers, keep_upgrade=keep)
    names = [n.lower() for n, _ in out]
    assert not {b"te", b"keep-alive", b"proxy-x"} & set(names)
    if keep:
        assert names.count(b"connection") == (1 if b"upgrade" in names else 0)
    else:
        assert b"connection" not in names
        assert b"upgrade" not in names
    assert strip_hop_by_hop(out, keep_upgrade=keep) == out
    # Headers that survive keep their relative order (Connection is never passed through, only re-emitted).
    survivors = [h for h in headers if h in out and h[0].lower() != b"connection"]
    assert [h for h in out if h[0].lower() != b"connection"] == survivors
