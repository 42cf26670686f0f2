"""Request heads the tunnel's wire format cannot carry (SPEC 5: a method over 255 octets, a target or a header
field over 65535, a head over the agent's MAX_HEAD_SIZE) are refused by the relay with an HTTP status, and the
relay goes on serving everyone else.

Such a head once made the relay loop forever without yielding (the encoding error was taken for a closed
agent link, and the same agent was picked again at once): these tests run under `unless_frozen`, so a loop
that never yields fails them instead of hanging the suite.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from protocol import Settings
from rtunnel.relay.exchange import HttpLimits

from ..relay_rig import Rig, relay_rig, unless_frozen

# `--max-head-size 0 --max-headers 0` (0 disables a limit): what the CLI turns them into.
DISABLED = HttpLimits(max_head_size=1 << 30, max_header_count=1 << 30)
SMALL_AGENT = Settings(max_head_size=1024)  # the smallest MAX_HEAD_SIZE an agent may declare


def _request(
    method: bytes = b"GET", target: bytes = b"/x", headers: list[tuple[bytes, bytes]] | None = None
) -> bytes:
    lines = [method + b" " + target + b" HTTP/1.1", b"Host: a"]
    lines += [name + b": " + value for name, value in headers or []]
    return b"\r\n".join(lines) + b"\r\n\r\n"


CASES = [
    ("method-256", HttpLimits(), None, _request(b"A" * 256), 501),
    ("target-70000", DISABLED, None, _request(target=b"/" + b"t" * 70_000), 414),
    ("header-value-70000", DISABLED, None, _request(headers=[(b"X-Big", b"v" * 70_000)]), 431),
    ("header-name-70000", DISABLED, None, _request(headers=[(b"X" * 70_000, b"v")]), 431),
    ("65536-headers", DISABLED, None, _request(headers=[(b"X-%d" % i, b"") for i in range(65_536)]), 431),
    (
        "head-over-agent-default",
        DISABLED,
        None,
        _request(headers=[(b"X-%d" % i, b"v" * 30_000) for i in range(3)]),
        431,
    ),
    ("head-over-small-agent", HttpLimits(), SMALL_AGENT, _request(headers=[(b"X-Big", b"v" * 2000)]), 431),
]


async def _second_client_is_served(rig: Rig) -> None:
    status, body = await rig.request(b"GET /second HTTP/1.1\r\nHost: a\r\n\r\n", client_ip="192.0.2.2")
    assert (status, body) == (200, b"GET /second 0")


@pytest.mark.parametrize(
    ("limits", "agent", "raw", "status"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
async def test_a_head_the_tunnel_cannot_carry_is_refused_and_others_are_served(
    limits: HttpLimits, agent: Settings | None, raw: bytes, status: int
) -> None:
    with unless_frozen():
        async with relay_rig(limits, agent_settings=agent, agent_wait=5) as rig:
            await rig.assert_refused(raw, status)
            await _second_client_is_served(rig)


async def test_a_method_of_255_octets_still_reaches_the_agent() -> None:
    with unless_frozen():
        async with relay_rig() as rig:
            status, body = await rig.request(_request(b"A" * 255))
            assert (status, body) == (200, b"A" * 255 + b" /x 0")


# --- the property: every head is answered, and the relay stays responsive -------------------------------

TCHAR = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
VCHAR = bytes(range(0x21, 0x7F)) + b" \t"
PCHAR = b"abcXYZ0189-._~%!$&'()*+,;=:@/?"
# Lengths around every wire limit (255, 65535) and the relay's default head limit (32 KiB), and anything.
lengths = st.one_of(
    st.integers(1, 300),
    st.sampled_from([254, 255, 256, 32_000, 32_768, 65_534, 65_535, 65_536, 70_000]),
    st.integers(1, 80_000),
)


def _repeated(alphabet: bytes, size: st.SearchStrategy[int]) -> st.SearchStrategy[bytes]:
    """A drawn pattern of `alphabet` octets repeated to a drawn length (big values without big draws)."""
    pattern = st.lists(st.sampled_from(alphabet), min_size=1, max_size=8).map(bytes)
    return st.tuples(pattern, size).map(lambda t: (t[0] * (t[1] // len(t[0]) + 1))[: t[1]])


def _value(raw: bytes) -> bytes:
    return raw.strip(b" \t") or b"v"  # h11 strips the edges; keep the drawn length meaningful


heads = st.tuples(
    _repeated(TCHAR, lengths),
    _repeated(PCHAR, lengths).map(lambda t: b"/" + t),
    st.lists(
        st.tuples(_repeated(TCHAR, lengths), _repeated(VCHAR, lengths).map(_value)).filter(
            lambda h: h[0].lower() not in (b"host", b"content-length", b"transfer-encoding")
        ),
        max_size=3,
    ),
)
ANSWERS = {200, 400, 405, 414, 431, 501}


async def _answered(
    head: tuple[bytes, bytes, list[tuple[bytes, bytes]]], limits: HttpLimits, agent: Settings
) -> None:
    with unless_frozen():
        async with relay_rig(limits, agent_settings=agent, agent_wait=5) as rig:
            client = await rig.connect()
            await client.send(_request(*head))
            status, _, _ = await client.response(timeout=100)
            event(f"status {status}")
            assert status in ANSWERS
            await _second_client_is_served(rig)


@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(
    head=heads,
    limits=st.sampled_from([HttpLimits(), DISABLED]),
    agent=st.sampled_from([Settings(), SMALL_AGENT]),
)
def test_every_request_head_is_answered_and_a_second_client_stays_served(
    head: tuple[bytes, bytes, list[tuple[bytes, bytes]]], limits: HttpLimits, agent: Settings
) -> None:
    trio.run(lambda: _answered(head, limits, agent), clock=trio.testing.MockClock(autojump_threshold=0))
