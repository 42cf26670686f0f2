"""Request smuggling through the real relay and agent, over raw sockets (RFC 9112): every ambiguous framing is
refused with 400 (or 501/505) and the client connection closed, and the upstream sees exactly the requests
the relay saw, no more. The relay's own parser is tested case by case in tests/rtunnel/relay/test_relay_limits.py;
here the whole path runs, and the upstream's counters are the witness.

Each hostile request is followed, in the same write, by ``POST /count/smuggled``: if any hop read the
framing differently from the relay, that request would reach the upstream and bump its counter.
"""

from __future__ import annotations

import pytest

from .procs import Relay
from .rawhttp import open_raw
from .upstream import Upstream

pytestmark = pytest.mark.e2e

TAIL = b"POST /count/smuggled HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n"
POST = b"POST /count/victim HTTP/1.1\r\nHost: a\r\n"

REFUSED: list[tuple[str, bytes, int]] = [
    ("cl-te", POST + b"Content-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nX", 400),
    ("te-cl", POST + b"Transfer-Encoding: chunked\r\nContent-Length: 6\r\n\r\n0\r\n\r\nX", 400),
    ("duplicate-cl", POST + b"Content-Length: 0\r\nContent-Length: 70\r\n\r\n", 400),
    ("te-chunked-identity", POST + b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n", 400),
    (
        "te-identity-chunked-lines",
        POST + b"Transfer-Encoding: identity\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        501,  # "identity" is no transfer coding (RFC 9112): not implemented
    ),
    ("te-gzip", POST + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501),
    ("te-obs-fold", POST + b"Transfer-Encoding: identity\r\n chunked\r\n\r\n0\r\n\r\n", 400),
    ("obs-fold", POST + b"Content-Length: 0\r\nX-Folded: a\r\n b\r\n\r\n", 400),
    ("bare-lf", b"POST /count/victim HTTP/1.1\nHost: a\nContent-Length: 0\n\n", 400),
    ("bare-cr", POST + b"Content-Length: 0\r\nX-A: a\rb\r\n\r\n", 400),
    ("te-http10", b"POST /count/victim HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    ("underscore-cl", POST + b"Content-Length: 0\r\nContent_Length: 70\r\n\r\n", 400),
]


async def test_ambiguous_framing_is_refused_end_to_end(
    client: object, relay: Relay, upstream: Upstream
) -> None:
    # One relay for all cases (starting processes is the slow part); each case on its own connection.
    for name, raw, status in REFUSED:
        async with open_raw(relay.http_port) as conn:
            await conn.send(raw + TAIL)
            response = await conn.response("POST")
            assert response.status == status, name
            assert await conn.closed(), name
    assert upstream.counts == {}
    assert upstream.paths == []


BAD_CHUNKED: list[tuple[str, bytes]] = [
    ("size-not-hex", b"zz\r\n" + TAIL),
    ("size-0x", b"0x0\r\n\r\n" + TAIL),
    ("size-negative", b"-1\r\n" + TAIL),
    ("size-too-long", b"0" * 20 + b"1\r\nX\r\n0\r\n\r\n" + TAIL),
    ("data-longer-than-size", b"1\r\nXX\r\n0\r\n\r\n" + TAIL),
    ("chunk-line-bare-lf", b"0\n\r\n" + TAIL),
    ("extension-64k", b"1;" + b"e" * 65536 + b"\r\nX\r\n0\r\n\r\n" + TAIL),
]


async def test_a_malformed_chunked_body_never_completes_at_the_upstream(
    client: object, relay: Relay, upstream: Upstream
) -> None:
    for name, body in BAD_CHUNKED:
        async with open_raw(relay.http_port) as conn:
            await conn.send(POST + b"Transfer-Encoding: chunked\r\n\r\n" + body)
            response = await conn.response("POST")
            assert response.status == 400, name
            assert await conn.closed(), name
    # A head may have reached the upstream, but never a complete request: the counter never moved.
    assert upstream.counts == {}


async def test_bodies_on_keep_alive_and_pipelined_requests_reach_the_upstream_exactly(
    client: object, relay: Relay, upstream: Upstream
) -> None:
    smuggled = TAIL  # a whole request, as the *body* of another one
    async with open_raw(relay.http_port) as conn:
        await conn.send(
            b"POST /count/a HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % len(smuggled)
            + smuggled
            + b"POST /count/b HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"%x;ext=1\r\n" % len(smuggled)
            + smuggled
            + b"\r\n0\r\n\r\n"
            + b"POST /count/c HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n"
            + b"POST /count/d HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 3\r\n\r\nxyz"
        )
        for key in "abcd":
            response = await conn.response("POST")
            assert response.status == 200
            assert response.json()["key"] == key
    assert upstream.counts == {"a": 1, "b": 1, "c": 1, "d": 1}
    assert upstream.paths == ["/count/a", "/count/b", "/count/c", "/count/d"]
