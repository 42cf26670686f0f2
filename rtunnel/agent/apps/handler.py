"""The seam between the agent's exchange handling and an application it runs in-process (`dial --app`).

`AppExchangeHandler` is the agent's stream handler for an app: the same `ExchangeHandler` that forwards to an
`--upstream` (so the allowlist, the header rules, request ids, the access log and the metrics apply unchanged),
except that once a request has passed those checks it goes to an `AppService` (apps.wsgi, apps.asgi)
instead of an upstream connection. What the app sees of the request is an `AppRequest`: what a server behind a
proxy sees, with the client's address, scheme and the tunnel's stripped prefix taken from the headers the relay
set (it replaces any a client sent: rtunnel.http.proxyheaders).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final, Protocol
from urllib.parse import unquote_to_bytes

import trio

from protocol import ErrorCode, LocalProtocolError, ResponseHead

from ...http.proxyheaders import Header, response_headers_for_client
from ...http.replies import phrase
from ...link.mux import MuxStream
from ..allowlist import Allowlist
from ..exchange import ExchangeHandler

if TYPE_CHECKING:
    from ..exchange import _Exchange

__all__ = [
    "AppExchangeHandler",
    "AppRequest",
    "AppService",
    "BodyLength",
    "ClientDisconnected",
    "Exchange",
    "HeadTimer",
]

log = logging.getLogger("rtunnel.agent.app")

_MAX_REASON: Final = 255


class ClientDisconnected(OSError):
    """The client went away (its stream was reset): what an app's send or write raises from then on."""


class Exchange(Protocol):
    """What a service may do with the exchange the agent's handler runs (agent.exchange._Exchange)."""

    stream: MuxStream
    method: bytes
    status: int | None
    note: str
    finished: bool

    async def reply_error(self, status: int, text: str) -> None: ...

    def reset(self, code: ErrorCode) -> None: ...


@dataclasses.dataclass(frozen=True)
class AppRequest:
    """One request as an app sees it (the allowlist has passed it; hop-by-hop headers are gone)."""

    method: str
    raw_path: bytes  # percent-encoded, no query
    query: bytes
    headers: Sequence[Header]  # names as sent
    upgrade: bool  # a bodiless protocol-switch request (SPEC 5.5)
    content_length: int | None
    client: tuple[str, int] | None
    scheme: str  # "http" or "https", as the relay accepted the client
    server: tuple[str, int]  # from Host
    prefix: bytes  # the named tunnel's path prefix the relay stripped, percent-decoded (b"" if none)

    @property
    def root_path(self) -> str:
        return self.prefix.decode("utf-8", "replace")

    @property
    def path_bytes(self) -> bytes:
        return unquote_to_bytes(self.raw_path)

    @property
    def upgrade_to(self) -> bytes:
        """The Upgrade value (lower case) of a protocol-switch request, else b""."""
        if not self.upgrade:
            return b""
        return b", ".join(v.strip().lower() for n, v in self.headers if n.lower() == b"upgrade")


class AppService(Protocol):
    """An app the agent runs: `run` until cancelled (startup before `task_status.started()`), `serve` one
    exchange, `shutdown` once the agent has drained."""

    kind: str

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None: ...

    async def serve(self, exchange: Exchange, request: AppRequest) -> None: ...

    async def shutdown(self) -> None: ...


def build_request(
    method: bytes, target: bytes, headers: Sequence[Header], *, upgrade: bool, content_length: int | None
) -> AppRequest:
    """The app's view of a request the relay forwarded (`target` is the one the allowlist checked)."""
    raw_path, _, query = target.partition(b"?")
    forwarded_for = proto = prefix = host = b""
    for name, value in headers:
        lname = name.lower()
        if lname == b"x-forwarded-for":
            forwarded_for = value  # the relay appends its client last
        elif lname == b"x-forwarded-proto":
            proto = value.strip().lower()
        elif lname == b"x-forwarded-prefix":
            prefix = value.strip()
        elif lname == b"host":
            host = value.strip()
    scheme = "https" if proto == b"https" else "http"
    return AppRequest(
        method=method.decode("latin-1"),
        raw_path=raw_path,
        query=query,
        headers=headers,
        upgrade=upgrade,
        content_length=content_length,
        client=_client(forwarded_for),
        scheme=scheme,
        server=_server(host, scheme),
        prefix=unquote_to_bytes(prefix).rstrip(b"/"),
    )


def _client(forwarded_for: bytes) -> tuple[str, int] | None:
    last = forwarded_for.rsplit(b",", 1)[-1].strip().decode("latin-1")
    try:
        return (str(ipaddress.ip_address(last)), 0)  # the relay does not forward the client's port
    except ValueError:
        return None


def _server(host: bytes, scheme: str) -> tuple[str, int]:
    default = 443 if scheme == "https" else 80
    text = host.decode("latin-1")
    if text.startswith("["):  # [v6]:port (agent/exchange.py checked the syntax)
        name, _, rest = text[1:].partition("]")
        port = rest.removeprefix(":")
    else:
        name, _, port = text.partition(":")
    return (name or "localhost", int(port) if port else default)


class HeadTimer:
    """`--response-timeout` for an app: the time it has to start its response (504 after that), counted from
    the later of the exchange's start and the last request body bytes it read, as for an upstream (whose
    clock starts once the request is sent), so that a slow upload is not cut."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.scope = trio.CancelScope(deadline=trio.current_time() + timeout)

    def activity(self) -> None:
        if self.scope.deadline != math.inf:
            self.scope.deadline = trio.current_time() + self.timeout

    def head_sent(self) -> None:
        self.scope.deadline = math.inf

    @property
    def expired(self) -> bool:
        return self.scope.cancelled_caught


async def send_head(
    exchange: Exchange, status: int, headers: Sequence[Header], *, end_stream: bool = False
) -> None:
    """The app's response head to the relay (hop-by-hop headers dropped, Via added, as for an upstream's)."""
    head = ResponseHead(
        status, phrase(status)[:_MAX_REASON], tuple(response_headers_for_client(list(headers)))
    )
    await exchange.stream.send_reply(head, end_stream=end_stream)
    exchange.status = status
    if end_stream:
        exchange.finished = True


class BodyLength:
    """Counts a response body against the Content-Length the app declared: the relay frames by it, so a
    body that is longer or shorter is the app's error (a cut response), never a corrupted exchange."""

    def __init__(self, headers: Sequence[Header]) -> None:
        self.declared: int | None = None
        self.sent = 0
        for name, value in headers:
            if name.lower() == b"content-length" and value.strip().isdigit():
                self.declared = int(value)

    def add(self, size: int) -> None:
        if self.declared is not None and self.sent + size > self.declared:
            raise ValueError(f"the response body is longer than its Content-Length {self.declared}")
        self.sent += size

    def check_end(self) -> None:
        if self.declared is not None and self.sent < self.declared:
            raise ValueError(
                f"the response body ended after {self.sent} of its Content-Length {self.declared} bytes"
            )


async def fail(exchange: Exchange, what: str, *, head_sent: bool) -> None:
    """The app failed (already logged): 500 if nothing was sent yet, else cut the response (RESET)."""
    exchange.note = f"app failed: {what}"
    if exchange.finished:
        return
    if head_sent:
        exchange.reset(ErrorCode.INTERNAL_ERROR)
    else:
        try:
            await exchange.reply_error(500, "rtunnel agent: the application failed\n")
        except LocalProtocolError:
            exchange.reset(ErrorCode.INTERNAL_ERROR)


async def timed_out(exchange: Exchange, seconds: float) -> None:
    exchange.note = "app timeout"
    log.warning("%s: the app sent no response within %g s", exchange.method.decode("latin-1"), seconds)
    await exchange.reply_error(504, f"rtunnel agent: the application sent no response within {seconds:g} s\n")


class AppExchangeHandler(ExchangeHandler):
    """The agent's stream handler for `--app`: ExchangeHandler's checks and records, then `service.serve`."""

    def __init__(self, service: AppService, allowlist: Allowlist, *, response_timeout: float = 60) -> None:
        # A request without Host (HTTP/1.0) gets "Host: localhost", as the upstream path adds the upstream's.
        super().__init__("http://localhost", allowlist, response_timeout=response_timeout)
        self.app = service
        self.app_call = self._serve_app

    async def _serve_app(
        self, exchange: _Exchange, target: bytes, headers: list[Header], content_length: int | None
    ) -> None:
        request = build_request(
            exchange.method, target, headers, upgrade=exchange.upgrade, content_length=content_length
        )
        await self.app.serve(exchange, request)

    async def run(self) -> None:
        await trio.sleep_forever()  # no upstream connections to expire

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()
