"""Forwarding headers as the agent receives them from the relay (relay_rig: the real ClientConnection over memory
streams, a fake agent recording each head): a client cannot speak for the relay in any of them."""

from __future__ import annotations

import pytest

from ..relay_rig import relay_rig

SPOOFS = (
    b"Forwarded: for=10.0.0.1;proto=https;host=admin.example\r\n"
    b"forwarded: for=10.0.0.2\r\n"
    b"X-Real-IP: 10.0.0.3\r\n"
    b"x-real-ip: 10.0.0.4\r\n"
    b"X-Forwarded-Prefix: /admin\r\n"
)


async def test_client_forwarded_real_ip_and_prefix_never_reach_the_agent() -> None:
    async with relay_rig() as rig:
        status, _ = await rig.request(
            b"GET /x HTTP/1.1\r\nHost: shop.example:8080\r\n" + SPOOFS + b"X-Kept: 1\r\n\r\n",
            client_ip="192.0.2.9",
        )
    assert status == 200
    (seen,) = rig.agent.seen
    names = [name.lower() for name, _ in seen.head.headers]
    assert b"x-real-ip" not in names and b"x-forwarded-prefix" not in names
    forwarded = [value for name, value in seen.head.headers if name.lower() == b"forwarded"]
    # Only what the relay knows, one element (RFC 7239): a host with a port is a quoted-string.
    assert forwarded == [b'for=192.0.2.9;host="shop.example:8080";proto=http']
    assert (b"X-Kept", b"1") in seen.head.headers


async def test_an_ipv6_client_is_quoted_in_forwarded() -> None:
    async with relay_rig() as rig:
        status, _ = await rig.request(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n", client_ip="2001:db8::7")
    assert status == 200
    forwarded = [value for name, value in rig.agent.seen[0].head.headers if name.lower() == b"forwarded"]
    assert forwarded == [b'for="[2001:db8::7]";host=a;proto=http']


@pytest.mark.parametrize("name", [b"X_Forwarded_Prefix", b"X_Real_IP", b"forwarded_"])
async def test_underscore_spellings_of_forwarding_headers_are_refused(name: bytes) -> None:
    async with relay_rig() as rig:
        status, _ = await rig.request(b"GET /x HTTP/1.1\r\nHost: a\r\n" + name + b": /admin\r\n\r\n")
    expected = 200 if name == b"forwarded_" else 400  # "forwarded-" is no header anyone reads
    assert status == expected
    assert len(rig.agent.seen) == (1 if expected == 200 else 0)
