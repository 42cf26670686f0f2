"""What a process says when it starts: one-line start-up failures, and where clients and agents connect.

A listener that cannot bind raises `ListenError`, which names the address, the option that set it and the OS's
reason (`cannot listen on 127.0.0.1:8080 (--http): address already in use`). The CLI prints any
`StartupError` as one line instead of the exception groups trio wraps it in.
"""

from __future__ import annotations

import contextlib
import shlex
import socket
from collections.abc import Iterator, Sequence

__all__ = ["ListenError", "StartupError", "connect_hints", "describe_os_error", "host_port", "listening"]


class StartupError(Exception):
    """A failure while starting (not bad configuration): str() is the whole one-line message."""


class ListenError(StartupError):
    def __init__(self, option: str, host: str | None, port: int, reason: str) -> None:
        super().__init__(f"cannot listen on {host_port(host or '*', port)} ({option}): {reason}")
        self.option = option


def host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def describe_os_error(exc: OSError) -> str:
    """'address already in use', 'permission denied', 'name or service not known': the OS's reason, in the
    lower case of the rest of a one-line message (and the file, when the error names one)."""
    text = exc.strerror or str(exc) or type(exc).__name__
    text = text[:1].lower() + text[1:]
    return f"{exc.filename}: {text}" if exc.filename else text


@contextlib.contextmanager
def listening(option: str, host: str | None, port: int) -> Iterator[None]:
    """Turn an OSError while binding the listener `option` sets into a ListenError naming it."""
    try:
        yield
    except OSError as exc:
        raise ListenError(option, host, port, describe_os_error(exc)) from None


_WILDCARDS = ("", "0.0.0.0", "::")


def _reachable_host(host: str) -> str:
    # A wildcard address is not something to connect to: name this machine instead.
    return socket.gethostname() if host in _WILDCARDS else host


def connect_hints(
    http: tuple[str, int],
    agents: tuple[str, int],
    *,
    tls: bool,
    token_set: bool,
    ca_file: str | None,
    tunnels: Sequence[str] = (),
) -> list[str]:
    """The lines a relay logs once it listens: the URL clients use, the URL agents dial and the command an
    agent would run (the token is never printed: the agent reads it from its own $RTUNNEL_TOKEN)."""
    client_url = f"http://{host_port(_reachable_host(http[0]), http[1])}/"
    agent_url = f"{'wss' if tls else 'ws'}://{host_port(_reachable_host(agents[0]), agents[1])}"
    command = ["rtunnel", "dial", agent_url, "--upstream", "PORT"]
    if ca_file is not None:
        command += ["--ca", ca_file]
    if tunnels:
        command += ["--tunnel", tunnels[0]]
    prefix = "RTUNNEL_TOKEN=... " if token_set else ""
    return [
        f"clients connect to {client_url}",
        f"agents connect to {agent_url}, e.g.: {prefix}{shlex.join(command)}",
    ]
