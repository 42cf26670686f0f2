"""Start-up failures as one line, whatever trio wraps them in; the relay's connect hints."""

from __future__ import annotations

import errno
import socket

import pytest
import trio

from rtunnel.cli import commands as cli
from rtunnel.startup import ListenError, connect_hints, listening


async def nested_failure(error: BaseException) -> None:
    """`error` two nurseries deep, as a listener failing inside the relay's tasks arrives."""
    async with trio.open_nursery() as outer:

        async def inner() -> None:
            async with trio.open_nursery() as nursery:

                async def fail() -> None:
                    raise error

                nursery.start_soon(fail)

        outer.start_soon(inner)


@pytest.mark.parametrize(
    ("error", "line"),
    [
        (OSError(errno.EMFILE, "Too many open files"), "rtunnel serve: error: too many open files"),
        (
            PermissionError(errno.EACCES, "Permission denied", "/var/lib/rtunnel/x"),
            "rtunnel serve: error: /var/lib/rtunnel/x: permission denied",
        ),
        (
            ListenError("--http", "0.0.0.0", 80, "permission denied"),
            "rtunnel serve: error: cannot listen on 0.0.0.0:80 (--http): permission denied",
        ),
    ],
)
async def test_an_error_at_start_is_one_line(
    capsys: pytest.CaptureFixture[str], error: BaseException, line: str
) -> None:
    async def runner() -> None:
        await nested_failure(error)

    assert await cli._until_signal(runner, "serve") == cli.EXIT_RUNTIME
    assert capsys.readouterr().err == line + "\n"


def test_listening_names_the_listener() -> None:
    with pytest.raises(ListenError) as info, listening("--agents", "::1", 8443):
        raise OSError(errno.EADDRINUSE, "Address already in use")
    assert str(info.value) == "cannot listen on [::1]:8443 (--agents): address already in use"


def test_connect_hints() -> None:
    assert connect_hints(
        ("127.0.0.1", 8080), ("127.0.0.1", 8443), tls=False, token_set=False, ca_file=None
    ) == [
        "clients connect to http://127.0.0.1:8080/",
        "agents connect to ws://127.0.0.1:8443, e.g.: rtunnel dial ws://127.0.0.1:8443 --upstream PORT",
    ]
    # A wildcard address is no place to connect to: the machine's name is given instead.
    lines = connect_hints(
        ("0.0.0.0", 80), ("::", 443), tls=True, token_set=True, ca_file="ca.pem", tunnels=["shop"]
    )
    host = socket.gethostname()
    assert lines[0] == f"clients connect to http://{host}:80/"
    assert lines[1] == (
        f"agents connect to wss://{host}:443, e.g.: RTUNNEL_TOKEN=... rtunnel dial wss://{host}:443 "
        "--upstream PORT --ca ca.pem --tunnel shop"
    )
