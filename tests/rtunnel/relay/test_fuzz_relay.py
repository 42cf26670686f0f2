"""Fuzzing the relay's request-head path: arbitrary bytes, and HTTP-shaped inputs with every smuggling
ingredient mixed in, fed to `relay.exchange.ClientConnection` (relay_rig.py) with and without an agent.

Properties: nothing escapes as an exception (the rig's nursery would re-raise it); the relay only ever
answers with well-formed HTTP/1.1 error or agent responses, or closes; it closes every connection within its
own timeouts; and the agent only ever sees requests that are literally in the input, with framing headers
gone (the upstream gets the agent's own framing).

Runs on trio's autojump clock, so head and idle timeouts cost nothing. The example count follows the suite's
hypothesis profile (tests/conftest.py): quick by default; for a long run by hand:

    HYPOTHESIS_PROFILE=thorough python -m pytest tests/rtunnel/relay/test_fuzz_relay.py
"""

from __future__ import annotations

import re

import trio
import trio.testing
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from rtunnel.relay.exchange import HttpLimits

from ..relay_rig import relay_rig

LIMITS = HttpLimits(
    max_head_size=4096, max_header_count=20, max_body_size=4096, head_timeout=10, idle_timeout=20
)
STATUSES = {200, 400, 405, 408, 413, 429, 431, 501, 502, 503, 505}
STATUS_LINE = re.compile(rb"HTTP/1\.1 (\d{3}) ")
# Generous in virtual time: every path through the relay ends within its head/idle timeouts.
DEADLINE = 10_000

# --- HTTP-shaped inputs --------------------------------------------------------------------------------------

methods = st.sampled_from([b"GET", b"POST", b"HEAD", b"PUT", b"OPTIONS", b"get", b"CONNECT", b"G\x00T", b""])
targets = st.one_of(
    st.sampled_from(
        [b"/", b"/x", b"*", b"http://h/x", b"/a b", b"/%2e%2e/x", b"h:1", b"//x", b"/x?a=%0d%0a"]
    ),
    st.binary(min_size=1, max_size=40).map(lambda b: b"/" + b),
)
versions = st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"http/1.1", b"HTTP/1.1x", b""])
framing = st.sampled_from(
    [
        (b"Content-Length", b"5"),
        (b"Content-Length", b"0"),
        (b"Content-Length", b"5, 5"),
        (b"Content-Length", b"5, 6"),
        (b"Content-Length", b"+5"),
        (b"Content-Length", b"99999999999999999999999"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Transfer-Encoding", b"Chunked"),
        (b"Transfer-Encoding", b"chunked, identity"),
        (b"Transfer-Encoding", b"gzip, chunked"),
        (b"Transfer-Encoding ", b"chunked"),
        (b"Transfer_Encoding", b"chunked"),
        (b"Content_Length", b"5"),
        (b"Expect", b"100-continue"),
        (b"Connection", b"close"),
        (b"Connection", b"keep-alive, Upgrade"),
        (b"Upgrade", b"websocket"),
        (b"Host", b"a"),
        (b"Host", b""),
        (b"X-Forwarded-For", b"10.0.0.1"),
    ]
)
other_headers = st.tuples(st.binary(min_size=0, max_size=12), st.binary(max_size=30))
line_ends = st.sampled_from([b"\r\n"] * 8 + [b"\n", b"\r", b"\r\r\n"])


@st.composite
def chunked_bodies(draw: st.DrawFn) -> bytes:
    out = b""
    for _ in range(draw(st.integers(0, 3))):
        data = draw(st.binary(max_size=20))
        size = draw(
            st.sampled_from([b"%x" % len(data), b"%X" % len(data), b"%x" % (len(data) + 1), b"zz", b"-1"])
        )
        ext = draw(st.sampled_from([b"", b";a=b", b";" + b"e" * 100, b" "]))
        out += size + ext + draw(line_ends) + data + b"\r\n"
    if draw(st.booleans()):
        out += b"0\r\n" + draw(st.sampled_from([b"", b"X-Trailer: 1\r\n"])) + b"\r\n"
    return out


@st.composite
def http_requests(draw: st.DrawFn) -> bytes:
    out = b""
    for _ in range(draw(st.integers(1, 3))):  # pipelined requests
        # Half the requests are well-formed apart from their framing headers and body, so that the agent
        # side is exercised too; the rest mix in every malformation.
        clean = draw(st.booleans())
        crlf = st.just(b"\r\n") if clean else line_ends
        method = draw(st.sampled_from([b"GET", b"POST", b"PUT", b"HEAD"]) if clean else methods)
        version = b"HTTP/1.1" if clean else draw(versions)
        line = method + b" " + draw(st.just(b"/x") if clean else targets) + b" " + version
        fields = [(b"Host", b"a")] if clean or draw(st.booleans()) else []
        if clean:
            # Correct framing: the body matches its Content-Length or is validly chunked.
            payload = draw(st.binary(max_size=30))
            kind = draw(st.sampled_from(["none", "length", "chunked"]))
            if kind == "length":
                fields.append((b"Content-Length", b"%d" % len(payload)))
                body = payload
            elif kind == "chunked":
                fields.append((b"Transfer-Encoding", b"chunked"))
                body = (b"%x\r\n%s\r\n" % (len(payload), payload) if payload else b"") + b"0\r\n\r\n"
            else:
                body = b""
            fields += draw(st.lists(st.sampled_from([(b"X-A", b"1"), (b"Accept", b"*/*")]), max_size=2))
        else:
            fields += draw(st.lists(st.one_of(framing, other_headers), max_size=4))
            body = draw(st.one_of(st.binary(max_size=30), chunked_bodies()))
        head = line + draw(crlf)
        for name, value in fields:
            head += name + b":" + draw(st.sampled_from([b" ", b"", b"\t"])) + value + draw(crlf)
            if not clean and draw(st.integers(0, 15)) == 0:
                head += b" folded" + draw(line_ends)  # obs-fold
        head += draw(crlf)
        out += head + body
    return out


# --- the property --------------------------------------------------------------------------------------------


async def _feed(data: bytes, *, with_agent: bool, eof: bool) -> None:
    async with relay_rig(LIMITS, with_agent=with_agent) as rig:
        client = await rig.connect()
        await client.send(data)
        if eof:
            await client.send_eof()
        output = await client.read_all(timeout=DEADLINE)
        assert output == b"" or output.startswith(b"HTTP/1.1 "), output[:200]
        statuses = {int(s) for s in STATUS_LINE.findall(output)}
        # Coverage evidence: pytest --hypothesis-show-statistics lists these.
        event(f"statuses {sorted(statuses)}")
        event(f"agent saw {min(len(rig.agent.seen), 2)}+ requests")
        assert statuses <= STATUSES, (statuses, output[:500])
        if not with_agent:
            assert 200 not in statuses
        for seen in rig.agent.seen:
            head = seen.head
            assert head.method + b" " + head.target + b" " in data
            names = [name.lower() for name, _ in head.headers]
            assert b"transfer-encoding" not in names
            assert names.count(b"content-length") <= 1
            assert len(seen.body) <= LIMITS.max_body_size  # type: ignore[operator]


def _run(data: bytes, with_agent: bool, eof: bool) -> None:
    trio.run(
        lambda: _feed(data, with_agent=with_agent, eof=eof),
        clock=trio.testing.MockClock(autojump_threshold=0),
    )


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=3000), with_agent=st.booleans(), eof=st.booleans())
def test_arbitrary_bytes_get_an_http_error_or_a_close(data: bytes, with_agent: bool, eof: bool) -> None:
    _run(data, with_agent, eof)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(data=http_requests(), with_agent=st.sampled_from([True, True, True, False]), eof=st.booleans())
def test_http_shaped_inputs_never_smuggle_anything_to_the_agent(
    data: bytes, with_agent: bool, eof: bool
) -> None:
    _run(data, with_agent, eof)
