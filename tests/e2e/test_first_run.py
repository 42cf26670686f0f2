"""End to end: what a new user meets in the first minutes, each as one readable line.

A port already taken (one test per listener), unusable TLS and token files, the relay saying where clients and
agents connect (and the agent command it prints working as printed), an agent dialling the relay's HTTP port,
and the relay's own responses (reason phrase, logged body size).
"""

from __future__ import annotations

import re
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import pytest
import trio

from rtunnel.cli.certs import make_relay_cert

from .procs import RTUNNEL_CMD, Agent, http_client, run_agent, run_process, run_relay
from .upstream import Upstream

pytestmark = pytest.mark.e2e


@contextmanager
def port_in_use() -> Iterator[int]:
    """A port some other program holds (listening), as a user would find it."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


async def run_cli(*args: str) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(30):
        return await trio.run_process(
            [*RTUNNEL_CMD, *args], capture_stdout=True, capture_stderr=True, check=False
        )


def one_line(result: subprocess.CompletedProcess[bytes]) -> str:
    err = result.stderr.decode("utf-8", "replace")
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize(
    ("command", "option"),
    [("serve", "--http"), ("serve", "--agents"), ("serve", "--admin"), ("dial", "--admin")],
)
async def test_listener_in_use_is_one_line_naming_address_option_and_reason(
    command: str, option: str
) -> None:
    with port_in_use() as port:
        address = f"127.0.0.1:{port}"
        if command == "serve":
            args = {"--http": "127.0.0.1:0", "--agents": "127.0.0.1:0"} | {option: address}
            result = await run_cli("serve", *(text for pair in args.items() for text in pair))
        else:
            quiet = ["--allow", "GET /**", "--token", "t"]  # no start-up warnings before the error
            result = await run_cli("dial", "ws://127.0.0.1:9", "--upstream", "9", *quiet, "--admin", address)
    assert result.returncode == 1
    assert one_line(result) == (
        f"rtunnel {command}: error: cannot listen on {address} ({option}): address already in use"
    )


async def test_unresolvable_listen_host_is_one_line() -> None:
    result = await run_cli("serve", "--http", "no-such-host.invalid:0", "--agents", "127.0.0.1:0")
    assert result.returncode == 1
    line = one_line(result)
    assert line.startswith("rtunnel serve: error: cannot listen on no-such-host.invalid:0 (--http): "), line


async def test_unusable_tls_and_token_files_are_one_line(tmp_path: Path) -> None:
    make_relay_cert(["localhost"], tmp_path)
    make_relay_cert(["localhost"], tmp_path / "other")
    cert, key, other_key = (
        tmp_path / "relay.pem",
        tmp_path / "relay-key.pem",
        tmp_path / "other/relay-key.pem",
    )
    missing, unreadable = tmp_path / "missing.pem", tmp_path  # a directory cannot be read as a file
    serve = ["serve", "--http", "127.0.0.1:0", "--agents", "127.0.0.1:0"]
    dial = ["dial", "wss://127.0.0.1:9", "--upstream", "9"]
    cases = {
        "missing cert": (
            [*serve, "--tls-cert", str(missing), "--tls-key", str(key)],
            f"--tls-cert {missing}: cannot read it: no such file or directory (`rtunnel cert --host NAME` makes",
        ),
        "key is a certificate": (
            [*serve, "--tls-cert", str(cert), "--tls-key", str(cert)],
            f"--tls-key {cert}: not a PEM private key",
        ),
        "key of another certificate": (
            [*serve, "--tls-cert", str(cert), "--tls-key", str(other_key)],
            f"--tls-key {other_key} is not the key of --tls-cert {cert}",
        ),
        "unreadable token file": (
            [*serve, "--token-file", str(unreadable)],
            f"--token-file: cannot read {unreadable}: is a directory",
        ),
        "missing CA": ([*dial, "--ca", str(missing)], f"--ca {missing}: cannot read it: no such file"),
        "CA is a key": ([*dial, "--ca", str(key)], f"--ca {key}: not a PEM certificate bundle"),
    }
    results: dict[str, subprocess.CompletedProcess[bytes]] = {}

    async def run(name: str, args: list[str]) -> None:
        results[name] = await run_cli(*args)

    async with trio.open_nursery() as nursery:
        for name, (args, _) in cases.items():
            nursery.start_soon(run, name, args)
    for name, (_, expected) in cases.items():
        line = one_line(results[name])
        assert results[name].returncode == 2, (name, line)
        assert expected.lower() in line.lower(), (name, line)
        assert line.startswith("rtunnel "), (name, line)


async def test_relay_tells_where_to_connect_and_its_agent_command_works(
    upstream: Upstream, token: str
) -> None:
    async with run_relay(token=None, env={"RTUNNEL_TOKEN": token}, extra_args=["--agent-wait", "0"]) as relay:
        hint = await relay.wait_for_line(re.compile(r"agents connect to (\S+), e\.g\.: (.*)$"))
        clients = await relay.wait_for_line(re.compile(r"clients connect to (\S+)"))
        assert clients.group(1) == f"{relay.http_url}/"
        assert hint.group(1) == relay.agents_url
        assert token not in relay.log_text()  # the token is elided
        command = hint.group(2)
        assert command == f"RTUNNEL_TOKEN=... rtunnel dial {relay.agents_url} --upstream PORT"

        async with http_client(relay.http_url) as client:
            # Before any agent: the relay's own 503, with its reason phrase, logged with its body's size.
            refused = await client.get("/api/items")
            assert (refused.status_code, refused.reason_phrase) == (503, "Service Unavailable")
            access = await relay.wait_for_line(re.compile(r"GET /api/items 503 in=0 out=(\d+)"))
            assert int(access.group(1)) == len(refused.content) > 0

            # The printed command as a user runs it: PORT is the service's port, the token in the env.
            args = command.removeprefix("RTUNNEL_TOKEN=... rtunnel ").replace("PORT", str(upstream.port))
            env = {"RTUNNEL_TOKEN": token}
            async with run_process(Agent, "agent", [*RTUNNEL_CMD, *args.split()], env=env) as agent:
                await agent.wait_connected()
                await relay.wait_for_line("agent connected from")  # --agent-wait 0: registered, not racing
                reply = await client.get("/api/items")
                assert (reply.status_code, reply.text) == (200, "/api/items")


async def test_agent_dialling_the_relays_http_port_is_told_so(upstream: Upstream, token: str) -> None:
    """The issue's case: another agent is connected, so the upgrade used to go through it to the upstream
    (token included) and come back as that upstream's answer."""
    async with run_relay(token) as relay, run_agent(relay.agents_url, upstream.url, token=token):
        wrong_url = relay.http_url.replace("http://", "ws://")
        async with run_agent(wrong_url, upstream.url, token=token, wait_connected=False) as lost:
            line = await lost.wait_for_line(re.compile(r"(\S+) is a relay's HTTP listener .*"))
            assert line.group(1) == wrong_url.removeprefix("ws://")
            assert "not its agents listener: dial the address of `rtunnel serve --agents`" in line.group(0)
            await relay.wait_for_line(re.compile(r"GET / 421 in=0 out=[1-9]"))
        assert "Traceback" not in lost.log_text()
    assert upstream.paths == []  # the misdirected agent's upgrade, and its token, never reached the service


async def test_agent_reaching_a_plain_web_server_is_told_so(token: str) -> None:
    """Any server that is not an rtunnel acceptor (here: one answering 200 to everything)."""

    async def plain_http(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nConnection: close\r\n\r\nhello\n")

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, plain_http, 0, host="127.0.0.1"))
        url = f"ws://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        async with run_agent(url, "http://127.0.0.1:9", token=token, wait_connected=False) as lost:
            line = await lost.wait_for_line(
                re.compile(r"is not an rtunnel relay's agents listener \(it answered (.*?)\)")
            )
            assert line.group(1) == "200 OK: hello"
        nursery.cancel_scope.cancel()
