"""The relay's HTTP side against hostile clients: request smuggling (RFC 9112) and the abuse limits.

Every case runs the real `relay.connection.ClientConnection` over in-memory streams in front of a fake agent
(relay_rig.py) that records what it was sent: what the upstream would have seen. Timeouts run on trio's
autojump clock, so a 30 s slowloris costs no wall time.
"""

from __future__ import annotations

import logging

import h11
import pytest
import trio
import trio.testing

from protocol import ErrorCode, RequestHead, ResponseHead, Settings
from rtunnel.link.mux import Multiplexer, MuxStream, StreamReset
from rtunnel.net.limits import AuthThrottle
from rtunnel.relay.limits import HttpLimits
from rtunnel.relay.server import Relay, RelayConfig
from tests.ports import connect_from
from tests.trio_helpers import wait_until

from ..memtransport import start_pair
from ..relay_rig import relay_rig

POST = b"POST /x HTTP/1.1\r\nHost: a\r\n"

# --- smuggling: refused before anything reaches the agent -------------------------------------------------

REFUSED_HEADS: list[tuple[str, bytes, int]] = [
    ("cl-then-te", POST + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    ("te-then-cl", POST + b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n", 400),
    ("two-different-cl", POST + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!", 400),
    ("cl-list-differs", POST + b"Content-Length: 5, 6\r\n\r\nhello!", 400),
    ("cl-plus-sign", POST + b"Content-Length: +5\r\n\r\nhello", 400),
    ("cl-negative", POST + b"Content-Length: -5\r\n\r\n", 400),
    ("cl-hex", POST + b"Content-Length: 0x5\r\n\r\nhello", 400),
    ("te-chunked-identity", POST + b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n", 400),
    ("te-identity", POST + b"Transfer-Encoding: identity\r\n\r\nhello", 400),
    ("te-xchunked", POST + b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n", 400),
    (
        "te-chunked-twice",
        POST + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    ("te-gzip-chunked", POST + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501),
    ("te-space-before-colon", POST + b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n", 400),
    ("te-obs-fold", POST + b"Transfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n", 400),
    ("obs-fold-space", POST + b"X-A: 1\r\n 2\r\nContent-Length: 0\r\n\r\n", 400),
    ("obs-fold-tab", POST + b"X-A: 1\r\n\t2\r\nContent-Length: 0\r\n\r\n", 400),
    ("bare-lf-head", b"POST /x HTTP/1.1\nHost: a\nContent-Length: 0\n\n", 400),
    ("bare-lf-one-line", POST + b"X-A: 1\nContent-Length: 0\r\n\r\n", 400),
    ("bare-lf-end", POST + b"Content-Length: 0\r\n\n", 400),
    ("bare-cr-value", POST + b"X-A: 1\r2\r\nContent-Length: 0\r\n\r\n", 400),
    ("bare-cr-line", b"POST /x HTTP/1.1\rHost: a\r\n\r\n", 400),
    ("nul-in-value", POST + b"X-A: a\x00b\r\n\r\n", 400),
    ("te-on-http10", b"POST /x HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    ("underscore-content-length", POST + b"Content_Length: 5\r\n\r\nhello", 400),
    ("underscore-transfer-encoding", POST + b"Transfer_Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    ("underscore-x-forwarded-for", b"GET /x HTTP/1.1\r\nHost: a\r\nX_Forwarded_For: 10.0.0.1\r\n\r\n", 400),
    ("http2-request-line", b"GET /x HTTP/2.0\r\nHost: a\r\n\r\n", 505),
    ("space-in-target", b"GET /a b HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("two-hosts", b"GET /x HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    ("connect", b"CONNECT internal:443 HTTP/1.1\r\nHost: internal:443\r\n\r\n", 405),
]


@pytest.mark.parametrize(("raw", "status"), [c[1:] for c in REFUSED_HEADS], ids=[c[0] for c in REFUSED_HEADS])
async def test_ambiguous_framing_is_refused_and_the_connection_closed(raw: bytes, status: int) -> None:
    async with relay_rig() as rig:
        await rig.assert_refused(raw, status)


TRICKLED = [
    "te-chunked-identity",
    "obs-fold-space",
    "bare-lf-one-line",
    "bare-cr-value",
    "underscore-content-length",
]


@pytest.mark.parametrize("case", TRICKLED)
async def test_the_strict_head_checks_hold_when_the_head_arrives_byte_by_byte(case: str) -> None:
    raw, status = next((raw, status) for name, raw, status in REFUSED_HEADS if name == case)
    async with relay_rig() as rig:
        client = await rig.connect()
        for i in range(len(raw)):
            if not await client.send(raw[i : i + 1]):
                break  # refused before the end: fine
        assert (await client.response())[0] == status
        assert rig.agent.seen == []


# Bodies that turn out malformed after the head was forwarded: 400, closed, and the agent's stream never
# completes, so the upstream never gets a complete request out of them.
BAD_BODIES: list[tuple[str, bytes]] = [
    ("chunk-size-not-hex", b"zz\r\nhello\r\n0\r\n\r\n"),
    ("chunk-size-negative", b"-5\r\nhello\r\n0\r\n\r\n"),
    ("chunk-size-0x", b"0x5\r\nhello\r\n0\r\n\r\n"),
    ("chunk-size-empty", b"\r\nhello\r\n0\r\n\r\n"),
    ("chunk-size-21-digits", b"0" * 20 + b"5\r\nhello\r\n0\r\n\r\n"),
    # Sizes beyond what a body can be (over 2^63 - 1), which h11 accepts up to 20 hex digits: these also
    # show that http.strict.chunk_left still reads h11's declared chunk size.
    ("chunk-size-2^64-1", b"ffffffffffffffff\r\nhello\r\n0\r\n\r\n"),
    ("chunk-size-2^63", b"8000000000000000\r\nhello\r\n0\r\n\r\n"),
    ("chunk-size-20-digits", b"f" * 20 + b"\r\nhello\r\n0\r\n\r\n"),
    ("chunk-size-huge-after-a-chunk", b"5\r\nhello\r\nFFFFFFFFFFFFFFFFF\r\nhello\r\n0\r\n\r\n"),
    ("chunk-line-bare-lf", b"5\nhello\r\n0\r\n\r\n"),
    ("chunk-longer-than-size", b"5\r\nhelloXX\r\n0\r\n\r\n"),
    ("chunk-extension-64k", b"5;" + b"x" * 65536 + b"\r\nhello\r\n0\r\n\r\n"),
    # relay.wire.MAX_CHUNK_LINE is 8 KiB: well under h11's own limit (the head size limit, 32 KiB).
    ("chunk-extension-12k", b"5;" + b"x" * 12 * 1024 + b"\r\nhello\r\n0\r\n\r\n"),
]


@pytest.mark.parametrize("body", [c[1] for c in BAD_BODIES], ids=[c[0] for c in BAD_BODIES])
async def test_a_malformed_chunked_body_is_refused_and_never_completes_upstream(body: bytes) -> None:
    async with relay_rig() as rig:
        client = await rig.connect()
        await client.send(POST + b"Transfer-Encoding: chunked\r\n\r\n" + body)
        await client.send(b"GET /second HTTP/1.1\r\nHost: a\r\n\r\n")
        status, headers, _ = await client.response()
        assert status == 400
        assert (b"connection", b"close") in headers
        assert await client.closed()
        assert [s.complete for s in rig.agent.seen] in ([], [False])
        assert b"/second" not in rig.agent.targets


async def test_small_chunk_extensions_are_ignored_as_rfc_9112_says() -> None:
    async with relay_rig() as rig:
        client = await rig.connect()
        await client.send(
            POST + b'Transfer-Encoding: chunked\r\n\r\n5;name=value;q="x"\r\nhello\r\n0\r\n\r\n'
        )
        status, _, body = await client.response()
        assert (status, body) == (200, b"POST /x 5")
        (seen,) = rig.agent.seen
        assert seen.body == b"hello" and seen.complete
        # Framing is not forwarded: the agent frames the upstream request itself.
        assert not [n for n, _ in seen.head.headers if n.lower() in (b"transfer-encoding", b"content-length")]


@pytest.mark.parametrize(
    "lengths", [[b"5"], [b"5", b"5"], [b"5, 5"], [b"005"]], ids=["one", "repeated", "list", "leading-zeros"]
)
async def test_equal_content_lengths_are_forwarded_as_one_canonical_value(lengths: list[bytes]) -> None:
    async with relay_rig() as rig:
        client = await rig.connect()
        head = POST + b"".join(b"Content-Length: " + v + b"\r\n" for v in lengths)
        await client.send(head + b"\r\nhello")
        status, _, body = await client.response()
        assert (status, body) == (200, b"POST /x 5")
        (seen,) = rig.agent.seen
        assert [v for n, v in seen.head.headers if n.lower() == b"content-length"] == [b"5"]


async def test_a_body_on_keep_alive_then_a_second_request_are_two_requests_exactly() -> None:
    async with relay_rig() as rig:
        client = await rig.connect()
        smuggled = b"GET /admin HTTP/1.1\r\nHost: a\r\n\r\n"
        # A body that looks like a request is data; the request after it is a request. Both sent in one write.
        await client.send(
            POST
            + b"Content-Length: %d\r\n\r\n" % len(smuggled)
            + smuggled
            + b"GET /two HTTP/1.1\r\nHost: a\r\n\r\n"
        )
        assert (await client.response())[2] == b"POST /x %d" % len(smuggled)
        assert (await client.response())[2] == b"GET /two 0"
        assert [(s.head.method, s.head.target, s.body) for s in rig.agent.seen] == [
            (b"POST", b"/x", smuggled),
            (b"GET", b"/two", b""),
        ]
        # Chunked body, then a pipelined request: the same.
        await client.send(
            POST
            + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\nGET /three HTTP/1.1\r\nHost: a\r\n\r\n"
        )
        assert (await client.response())[2] == b"POST /x 3"
        assert (await client.response())[2] == b"GET /three 0"
        assert rig.agent.targets == [b"/x", b"/two", b"/x", b"/three"]


async def test_a_malformed_request_after_a_good_one_stops_the_connection_there() -> None:
    async with relay_rig() as rig:
        client = await rig.connect()
        await client.send(
            b"GET /one HTTP/1.1\r\nHost: a\r\n\r\n"
            + POST
            + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
            + b"GET /three HTTP/1.1\r\nHost: a\r\n\r\n"
        )
        assert (await client.response())[0] == 200
        assert (await client.response())[0] == 400
        assert await client.closed()
        assert rig.agent.targets == [b"/one"]


# --- limits --------------------------------------------------------------------------------------------------


async def test_too_many_headers_is_431() -> None:
    async with relay_rig(HttpLimits(max_header_count=5)) as rig:
        many = b"".join(b"X-%d: v\r\n" % i for i in range(6))
        out = await rig.roundtrip(b"GET /x HTTP/1.1\r\nHost: a\r\n" + many + b"\r\n")
        assert out.startswith(b"HTTP/1.1 431 ")
        assert (await rig.request(b"GET /y HTTP/1.1\r\nHost: a\r\nX-1: v\r\n\r\n"))[0] == 200
        assert rig.agent.targets == [b"/y"]


@pytest.mark.parametrize("pieces", [1, 64], ids=["one-write", "trickled"])
async def test_a_head_over_the_size_limit_is_431(pieces: int) -> None:
    async with relay_rig(HttpLimits(max_head_size=2048)) as rig:
        head = b"GET /x HTTP/1.1\r\nHost: a\r\nX-Big: " + b"v" * 4000 + b"\r\n\r\n"
        client = await rig.connect()
        step = -(-len(head) // pieces)
        for i in range(0, len(head), step):
            await client.send(head[i : i + step])
        status, _, _ = await client.response()
        assert status == 431
        assert await client.closed()
        assert rig.agent.seen == []


async def test_a_declared_body_over_the_limit_is_413_before_anything_is_forwarded() -> None:
    async with relay_rig(HttpLimits(max_body_size=10)) as rig:
        out = await rig.roundtrip(POST + b"Content-Length: 11\r\n\r\nhello world")
        assert out.startswith(b"HTTP/1.1 413 ")
        assert rig.agent.seen == []


async def test_a_chunked_body_over_the_limit_is_413_and_never_completes_upstream() -> None:
    async with relay_rig(HttpLimits(max_body_size=10)) as rig:
        out = await rig.roundtrip(
            POST + b"Transfer-Encoding: chunked\r\n\r\n6\r\nhello \r\n6\r\nworld!\r\n0\r\n\r\n"
        )
        assert out.startswith(b"HTTP/1.1 413 ")
        assert [s.complete for s in rig.agent.seen] in ([], [False])
        ok = await rig.request(POST + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
        assert ok == (200, b"POST /x 5")


async def test_a_chunk_declared_over_the_body_limit_is_413_before_any_of_it_is_forwarded() -> None:
    async with relay_rig(HttpLimits(max_body_size=1000)) as rig:
        client = await rig.connect()
        await client.send(POST + b"Transfer-Encoding: chunked\r\n\r\n" + b"%x\r\n" % 5000 + b"x" * 100)
        status, _, _ = await client.response()
        assert status == 413
        assert [(s.body, s.complete) for s in rig.agent.seen] in ([], [(b"", False)])


async def test_slowloris_gets_408_at_the_head_timeout_and_others_are_served(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limits = HttpLimits(head_timeout=10, idle_timeout=1000)
    async with relay_rig(limits) as rig:
        slow = await rig.connect("198.51.100.7")
        started = trio.current_time()
        # One byte at a time, each well inside any per-read timeout: only a deadline on the whole head helps.
        head = b"GET /slow HTTP/1.1\r\nHost: a\r\nX-Padding: " + b"p" * 1000

        async def trickle() -> None:
            for i in range(len(head)):
                await trio.sleep(1)
                await slow.send(head[i : i + 1])

        async with trio.open_nursery() as nursery:
            nursery.start_soon(trickle)
            other = await rig.connect("203.0.113.9")
            for i in range(3):
                await other.send(b"GET /ok/%d HTTP/1.1\r\nHost: a\r\n\r\n" % i)
                assert (await other.response())[0] == 200
            status, _, _ = await slow.response(timeout=100)
            assert status == 408
            # Measured on the mock clock: the head clock started with the first byte, not at 1000 s.
            assert trio.current_time() - started <= limits.head_timeout + 2
            assert await slow.closed()
            nursery.cancel_scope.cancel()
        assert rig.agent.targets == [b"/ok/0", b"/ok/1", b"/ok/2"]


async def test_an_idle_keep_alive_connection_is_closed_quietly(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with relay_rig(HttpLimits(idle_timeout=5, head_timeout=100)) as rig:
        client = await rig.connect()
        await client.send(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
        assert (await client.response())[0] == 200
        started = trio.current_time()
        assert await client.closed(timeout=1000)  # no 408: nothing was in progress
        assert 5 <= trio.current_time() - started < 100


async def test_exchanges_per_ip_are_limited_with_429_and_other_ips_go_on() -> None:
    async with relay_rig(HttpLimits(max_exchanges_per_ip=2)) as rig:
        held = []
        for key in ("a", "b"):
            client = await rig.connect("198.51.100.7")
            await client.send(b"GET /hold/%s HTTP/1.1\r\nHost: a\r\n\r\n" % key.encode())
            held.append(client)
        await wait_until(lambda: len(rig.agent.seen) >= 2)  # both exchanges reached the agent
        flood = await rig.connect("198.51.100.7")
        await flood.send(b"GET /third HTTP/1.1\r\nHost: a\r\n\r\n")
        status, headers, _ = await flood.response()
        assert status == 429
        assert any(name == b"retry-after" for name, _ in headers)
        other = await rig.connect("203.0.113.9")
        await other.send(b"GET /other HTTP/1.1\r\nHost: a\r\n\r\n")
        assert (await other.response())[0] == 200
        # The 429 kept the connection (nothing unread): once a slot is free, the same client gets in.
        rig.agent.release("a")
        assert (await held[0].response())[0] == 200
        await flood.send(b"GET /fourth HTTP/1.1\r\nHost: a\r\n\r\n")
        assert (await flood.response())[0] == 200
        rig.agent.release("b")
        assert (await held[1].response())[0] == 200
        assert b"/third" not in rig.agent.targets


async def test_over_the_memory_budget_new_exchanges_get_503_until_it_drains() -> None:
    async with relay_rig(HttpLimits(max_buffered_bytes=64 * 1024)) as rig:
        assert rig.relay_mux is not None
        # A client that asks for a big body and does not read it: the relay holds up to a window of it.
        hog = await rig.connect("198.51.100.7", lockstep=True)
        await hog.send(b"GET /big/200000 HTTP/1.1\r\nHost: a\r\n\r\n")
        await wait_until(lambda: rig.relay_mux.buffered_bytes > 64 * 1024)
        other = await rig.connect("203.0.113.9")
        await other.send(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
        status, headers, _ = await other.response()
        assert status == 503
        assert any(name == b"retry-after" for name, _ in headers)
        # The hog reads its body: memory drains, service resumes.
        status, _, body = await hog.response()
        assert (status, len(body)) == (200, 200000)
        await other.send(b"GET /y HTTP/1.1\r\nHost: a\r\n\r\n")
        assert (await other.response())[0] == 200
        assert b"/x" not in rig.agent.targets


async def test_a_client_that_stops_reading_is_dropped_after_the_send_timeout(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    # Nothing on the tunnel side notices a client whose TCP window stays shut: the relay's write must give up
    # by itself, or the connection and its per-address exchange slot are held forever.
    caplog.set_level(logging.INFO, logger="rtunnel.relay")
    async with relay_rig(HttpLimits(send_timeout=5.0, max_exchanges_per_ip=1)) as rig:
        hog = await rig.connect("198.51.100.7", lockstep=True)  # takes no byte unless it reads
        await hog.send(b"GET /big/200000 HTTP/1.1\r\nHost: a\r\n\r\n")
        await wait_until(lambda: len(rig.agent.seen) == 1)
        with trio.fail_after(30):  # virtual time: the agent's stall reaper (60 s) would come later
            await hog.done.wait()
        assert "took no response bytes for 5 s" in caplog.text
        # Its exchange slot is free again: the same address is served.
        assert (await rig.request(b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n", "198.51.100.7"))[0] == 200


# --- zero-window stall reaper (rtunnel.link.mux) ---------------------------------------------------------------


async def _open_pair(
    nursery: trio.Nursery, agent_settings: Settings, handler: object, stall_timeout: float
) -> Multiplexer:
    relay_options = {"settings": Settings(max_concurrent_streams=0), "stall_timeout": stall_timeout}
    pair = await start_pair(
        nursery,
        handler,  # type: ignore[arg-type]
        relay_options=relay_options,
        agent_options={"settings": agent_settings},
    )
    return pair.relay


async def test_a_stream_whose_peer_never_opens_its_window_is_reset(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    async def never_reads(stream: MuxStream) -> None:
        await trio.sleep_forever()

    # The agent grants no stream window at all: the relay's request body can never leave.
    relay = await _open_pair(nursery, Settings(initial_stream_window=0), never_reads, stall_timeout=60)
    stream = await relay.open_stream(RequestHead(b"POST", b"/up", ()))
    await stream.send_data(b"x" * 1000)
    started = trio.current_time()
    with pytest.raises(StreamReset) as caught, trio.fail_after(1000):
        await stream.receive_reply()
    assert caught.value.error_code is ErrorCode.CANCEL and not caught.value.remote
    assert 60 <= trio.current_time() - started <= 60 + 30
    assert relay.in_flight == 1  # its owner still has it
    stream.close()
    assert relay.in_flight == 0 and not relay.is_closed  # the connection lives on


async def test_a_slow_but_progressing_stream_is_not_reaped(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    async def slow_reader(stream: MuxStream) -> None:
        received = 0
        while chunk := await stream.receive_data(4096):
            received += len(chunk)
            await trio.sleep(20)  # one 4 KiB read every 20 s: always some window back within the timeout
        await stream.send_reply(ResponseHead(200, b"OK", ()), end_stream=True)

    relay = await _open_pair(nursery, Settings(initial_stream_window=8192), slow_reader, stall_timeout=60)
    stream = await relay.open_stream(RequestHead(b"POST", b"/up", ()))
    started = trio.current_time()
    await stream.send_data(b"x" * 64 * 1024, end_stream=True)
    head = await stream.receive_reply()
    assert head.status == 200
    assert trio.current_time() - started > 3 * 60  # far longer than the stall timeout, yet not reset


# --- connections on the relay's HTTP listener (real sockets, in-process relay) -----------------------------


async def _status(stream: trio.SocketStream) -> tuple[int, bool]:
    """Send a request and read the status of the answer; also whether the relay then closed."""
    await stream.send_all(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
    data = b""
    with trio.fail_after(10):
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some()
            if not chunk:
                break
            data += chunk
    return int(data.split(b" ", 2)[1]), b"connection: close" in data.lower()


async def test_the_http_listener_limits_connections_in_total_and_per_address(nursery: trio.Nursery) -> None:
    limits = HttpLimits(max_connections=3, max_connections_per_ip=2)
    relay = Relay(RelayConfig(http_port=0, agents_port=0, agent_wait=0, http_limits=limits))
    await nursery.start(relay.run)
    assert relay.http_address is not None
    port = relay.http_address[1]
    held = []
    # Each sends part of a head and stops: busy, not idle, so never reclaimed for a newcomer.
    for source in ("127.0.0.1", "127.0.0.1", "127.0.0.2"):
        stream = await connect_from(source, port)
        await stream.send_all(b"GET /x HTTP/1.1\r\n")
        held.append(stream)
    await _until_counted(relay, 3)
    over_address = await connect_from("127.0.0.1", port)  # third from one address
    assert await _status(over_address) == (503, True)
    over_total = await connect_from("127.0.0.3", port)  # fourth in total
    assert await _status(over_total) == (503, True)
    # No agent: a request is answered 503 "no agent" and the connection stays open (and counted).
    # Closing one frees its slot (the relay notices the close when its handler ends).
    await held.pop().aclose()
    with trio.fail_after(10):
        while True:
            retry = await connect_from("127.0.0.3", port)
            if await _status(retry) == (503, False):
                break
            await trio.sleep(0.01)
    for stream in (*held, over_address, over_total, retry):
        await stream.aclose()


async def _until_counted(relay: Relay, connections: int) -> None:
    await wait_until(lambda: relay.connection_count >= connections)  # the count is polled, not signalled


async def _answered(stream: trio.SocketStream) -> tuple[int, bool]:
    """Like _status, reading the whole response (its body too), so the connection can go on."""
    client = h11.Connection(h11.CLIENT)
    await stream.send_all(client.send(h11.Request(method="GET", target="/x", headers=[("Host", "a")])) or b"")
    client.send(h11.EndOfMessage())
    status, close = 0, False
    with trio.fail_after(10):
        while not isinstance(event := client.next_event(), h11.EndOfMessage):
            if event is h11.NEED_DATA:
                client.receive_data(await stream.receive_some())
            elif isinstance(event, h11.Response):
                status, close = event.status_code, (b"connection", b"close") in event.headers
    return status, close


async def test_at_the_connection_limit_the_longest_idle_connection_makes_room(nursery: trio.Nursery) -> None:
    limits = HttpLimits(max_connections=2, max_connections_per_ip=None)
    relay = Relay(RelayConfig(http_port=0, agents_port=0, agent_wait=0, http_limits=limits))
    await nursery.start(relay.run)
    assert relay.http_address is not None
    port = relay.http_address[1]
    # Two keep-alive connections, each idle after one exchange (503: no agent; the connection stays open).
    oldest = await connect_from("127.0.0.1", port)
    assert await _answered(oldest) == (503, False)
    newer = await connect_from("127.0.0.1", port)
    assert await _answered(newer) == (503, False)
    # A third client, from another address: the relay closes the longest idle connection and serves it.
    newcomer = await connect_from("127.0.0.2", port)
    assert await _answered(newcomer) == (503, False)
    with trio.fail_after(10):
        while await oldest.receive_some():  # the rest of its last response, if any, then the close
            pass
    assert await _answered(newer) == (503, False)  # the other idle connection was left alone
    # With every connection busy (a head in progress), nothing is reclaimed: the newcomer is refused.
    for stream in (newer, newcomer):
        await stream.send_all(b"GET /x HTTP/1.1\r\n")
    refused = await connect_from("127.0.0.3", port)
    assert await _answered(refused) == (503, True)
    for stream in (oldest, newer, newcomer, refused):
        await stream.aclose()


# --- the failed-authentication throttle (rtunnel.net.limits) ----------------------------------------------------


def test_the_auth_throttle_blocks_an_address_for_its_window_only() -> None:
    throttle = AuthThrottle(max_failures=3, window=60)
    for now in (0.0, 10.0, 20.0):
        assert throttle.retry_after("198.51.100.7", now) is None
        throttle.failed("198.51.100.7", now)
    assert throttle.retry_after("198.51.100.7", 21.0) == 39.0  # until the first failure is 60 s old
    assert throttle.retry_after("203.0.113.9", 21.0) is None  # other addresses are not affected
    assert throttle.retry_after("198.51.100.7", 60.0) is None  # the oldest failure aged out
    throttle.failed("198.51.100.7", 61.0)
    assert throttle.retry_after("198.51.100.7", 61.0) == 9.0  # failures at 10, 20, 61: blocked until 70


def test_the_auth_throttle_forgets_the_oldest_addresses_first() -> None:
    throttle = AuthThrottle(max_failures=1, window=60, max_addresses=100)
    for i in range(1000):
        throttle.failed(f"10.0.{i // 256}.{i % 256}", 0.0)
    assert throttle.retry_after("10.0.3.231", 1.0) is not None  # the most recent one is still blocked
    assert throttle.retry_after("10.0.0.0", 1.0) is None  # memory is bounded: the oldest were dropped


async def test_a_request_body_that_stops_arriving_gets_408(autojump_clock: trio.testing.MockClock) -> None:
    """Slowloris on the body: the head is complete, the body stops; the relay gives up after body_timeout
    instead of holding the exchange (and the agent's stream) forever."""
    async with relay_rig(HttpLimits(body_timeout=5)) as rig:
        client = await rig.connect()
        await client.send(b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc")
        status, _, body = await client.response()
        assert status == 408
        assert b"stalled" in body
