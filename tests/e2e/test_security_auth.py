"""Agent authentication on the real relay: failed attempts are rate-limited per source address, a token file
holds one token per agent group and is re-read on SIGHUP (a revoked group is disconnected at once and
refused afterwards, the others keep serving), and no token ever appears in any log, even at debug level.
"""

from __future__ import annotations

import base64
import os
import re
import signal
from pathlib import Path

import pytest
import trio

from ..ports import connect_from
from .procs import REFUSED_TOKEN_RE, RTUNNEL_CMD, http_client, new_token, run_agent, run_relay
from .upstream import Upstream

pytestmark = pytest.mark.e2e

DEBUG_CMD = (*RTUNNEL_CMD, "--log-level", "debug")


async def upgrade_status(port: int, token: str, *, source: str = "127.0.0.1") -> int:
    """One raw WebSocket upgrade to the relay's agent port from `source`; the HTTP status it got."""
    key = base64.b64encode(os.urandom(16))
    request = (
        b"GET / HTTP/1.1\r\nHost: relay\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Protocol: rtunnel.v1\r\nAuthorization: Bearer " + token.encode() + b"\r\n\r\n"
    )
    async with await connect_from(source, port) as stream:
        await stream.send_all(request)
        data = b""
        with trio.fail_after(10):
            while b"\r\n" not in data:
                chunk = await stream.receive_some()
                assert chunk, "the relay closed without answering"
                data += chunk
    return int(data.split(b" ", 2)[1])


async def test_failed_logins_are_rate_limited_per_address(upstream: Upstream) -> None:
    token = new_token()
    async with run_relay(token, command=DEBUG_CMD) as relay:
        wrong = [new_token() for _ in range(5)]
        for guess in wrong:
            assert await upgrade_status(relay.agents_port, guess, source="127.0.0.2") == 401
        # Blocked now: even the right token is not checked from that address, and more guesses cost nothing.
        for guess in (token, new_token(), new_token()):
            assert await upgrade_status(relay.agents_port, guess, source="127.0.0.2") == 429
        # Another address is not affected: the real agent connects and serves.
        async with run_agent(relay.agents_url, upstream.url, token=token), http_client(relay.http_url) as c:
            assert (await c.get("/after")).status_code == 200
        # The block is logged once, not once per attempt.
        assert relay.count_lines(re.compile(r"failed agent authentications from 127\.0\.0\.2")) == 1
    text = relay.log_text()
    for secret in (token, *wrong):
        assert secret not in text


async def test_token_file_groups_and_revocation_on_sighup(upstream: Upstream, tmp_path: Path) -> None:
    keep, revoke, wrong = new_token(), new_token(), new_token()
    token_file = tmp_path / "tokens"
    token_file.write_text(f"# agent groups\n\n{keep}  # blue\n{revoke} # green\n")
    async with (
        run_relay(None, extra_args=["--token-file", str(token_file)], command=DEBUG_CMD) as relay,
        run_agent(relay.agents_url, upstream.url, token=keep, command=DEBUG_CMD) as blue,
        run_agent(relay.agents_url, upstream.url, token=revoke, command=DEBUG_CMD) as green,
        run_agent(
            relay.agents_url, upstream.url, token=wrong, command=DEBUG_CMD, wait_connected=False
        ) as bad,
        http_client(relay.http_url) as c,
    ):
        await bad.wait_for_line(REFUSED_TOKEN_RE)
        assert relay.count_lines("agent connected") == 2
        for i in range(4):
            assert (await c.get(f"/before/{i}")).status_code == 200
        # Revoke "green": rewrite the file and send SIGHUP.
        mark = green.mark()
        token_file.write_text(f"{keep}  # blue\n")
        relay.send_signal(signal.SIGHUP)
        await relay.wait_for_line("tokens reloaded")
        await relay.wait_for_line(re.compile(r"token 'green' was revoked"))
        await green.wait_for_line("connection lost", since=mark)
        await green.wait_for_line(REFUSED_TOKEN_RE, since=mark)  # its next attempt is refused
        # "blue" was never interrupted and serves everything now.
        for i in range(4):
            assert (await c.get(f"/after/{i}")).status_code == 200
        assert blue.count_lines("connection lost") == 0
        # A token file that cannot be read changes nothing.
        token_file.unlink()
        relay.send_signal(signal.SIGHUP)
        await relay.wait_for_line("keeping the current tokens")
        assert (await c.get("/still")).status_code == 200
    for proc in (relay, blue, green, bad):
        text = proc.log_text()
        for secret in (keep, revoke, wrong):
            assert secret not in text, f"a token leaked into the {proc.name} log"
