"""Fixtures and helpers shared by the transport tests (test_transport.py: handshakes; test_wslink.py: links)."""

from __future__ import annotations

import contextlib
import hmac
import importlib
import ssl
import sys
from collections.abc import Awaitable, Callable
from functools import partial
from types import ModuleType

import pytest
import trio
import trio.testing
import trio_websocket
import trustme

from rtunnel.link.transport import Transport, parse_relay_url

# Every test takes the module under test from the `tr` fixture, so that a candidate replacement
# (same names, same behaviour) can run this suite side by side with the current one; that is how
# the move from trio-websocket to the websockets sans-IO core was checked.
IMPLEMENTATIONS = ["rtunnel.link.transport"]

TOKEN = "s3cret-token"
AUTH_HEADER = [(b"Authorization", b"Bearer " + TOKEN.encode())]


def _authenticate(token: bytes | None) -> bool:
    return token is not None and hmac.compare_digest(token, TOKEN.encode())


@pytest.fixture(params=IMPLEMENTATIONS)
def tr(request: pytest.FixtureRequest) -> ModuleType:
    """The transport module under test."""
    return importlib.import_module(request.param)


def _impl(t: Transport) -> ModuleType:
    """The module a Transport comes from (for handlers, which get no fixtures)."""
    return sys.modules[type(t).__module__]


async def _start_relay(
    tr: ModuleType,
    nursery: trio.Nursery,
    handler: Callable[[Transport], Awaitable[None]],
    scheme: str = "ws",
    **kwargs: object,
) -> str:
    host, port = await nursery.start(
        partial(tr.serve, handler, "127.0.0.1", 0, authenticate=_authenticate, **kwargs)
    )
    return f"{scheme}://{host}:{port}/agent"


async def _echo(t: Transport) -> None:
    with contextlib.suppress(_impl(t).TransportClosed):
        while True:
            await t.send(await t.receive())


@pytest.fixture
async def echo_url(tr: ModuleType, nursery: trio.Nursery) -> str:
    return await _start_relay(tr, nursery, _echo)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def server_ssl(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(ctx)
    return ctx


@pytest.fixture
def client_ssl(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


async def _raw_rejection(
    url: str, *, subprotocols: list[str], extra_headers: list[tuple[bytes, bytes]]
) -> trio_websocket.ConnectionRejected:
    """Probe our relay with plain trio-websocket and return its rejection. We open the socket
    ourselves: trio-websocket's own client leaks it when the upgrade is rejected."""
    _, host, port, path = parse_relay_url(url)
    rejections: list[trio_websocket.ConnectionRejected] = []
    async with await trio.open_tcp_stream(host, port) as stream:
        try:
            async with trio.open_nursery() as nursery:
                await trio_websocket.wrap_client_stream(
                    nursery, stream, host, path, subprotocols=subprotocols, extra_headers=extra_headers
                )
        except* trio_websocket.ConnectionRejected as group:
            rejections.extend(group.exceptions)  # type: ignore[arg-type]
    assert len(rejections) == 1
    return rejections[0]
