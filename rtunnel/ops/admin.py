"""The admin endpoint (`--admin HOST:PORT`) and its client, `rtunnel status`.

Endpoints, GET or HEAD:
- /healthz: 200 while the process runs (liveness);
- /readyz: 200 once at least one tunnel connection is up (relay: an agent; agent: a relay), else 503;
  /readyz?tunnel=NAME: the same for one named tunnel;
- /metrics: Prometheus text format, from the process's own registry;
- /status.json: the live connections (what `rtunnel status` prints);
- / and /inspector: the dashboard and the request inspector (dashboard.py), live over /events (server-sent
  events), with /api/exchanges/ID (one capture) and POST /api/exchanges/ID/replay (relay);
- /login, /logout: the session of `--admin-token` (adminauth.py), which every path but the probes requires.

It is a deliberately small HTTP/1.1 server (h11 under trio, keep-alive, bounded connections and timeouts):
it shares the process with the tunnel, so it must never cost the tunnel anything when scraped or probed.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import Any, Final

import h11
import trio
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..config import parse_address
from ..http.replies import phrase
from ..startup import listening
from .adminauth import AdminAuth
from .adminhttp import AdminRequest, Reply
from .dashboard import LOGIN_PATHS, PAGES, Dashboard
from .metrics import Metrics

__all__ = ["DEFAULT_ADMIN", "AdminServer", "format_status", "parse_admin_address", "run_status"]

log = logging.getLogger("rtunnel.admin")

DEFAULT_ADMIN: Final = "127.0.0.1:9180"
MAX_CONNECTIONS: Final = 32
# Event streams stay open as long as their page: they get a share of the connections, never all of them,
# so a few forgotten tabs cannot lock out the Prometheus scraper.
MAX_EVENT_STREAMS: Final = 8
HEAD_TIMEOUT: Final = 10.0
IDLE_TIMEOUT: Final = 30.0
MAX_REQUEST_BODY: Final = 64 * 1024
# Paths anyone may ask (probes run without credentials).
PUBLIC_PATHS: Final = frozenset({"/healthz", "/readyz"})


def parse_admin_address(text: str, option: str = "--admin") -> tuple[str, int]:
    """'HOST:PORT', ':PORT' or 'PORT' (host 127.0.0.1: the admin endpoint is local unless asked otherwise)."""
    return parse_address(text, option, default_host="127.0.0.1")


class AdminServer:
    def __init__(
        self,
        metrics: Metrics,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        token: str | None = None,
        dashboard: Dashboard | None = None,
    ) -> None:
        self.metrics = metrics
        self.host = host
        self.port = port
        self.address: tuple[str, int] | None = None
        self._slots = trio.CapacityLimiter(MAX_CONNECTIONS)
        self._event_streams = trio.CapacityLimiter(MAX_EVENT_STREAMS)
        self.auth = AdminAuth(token, bind_host=host)
        self.dashboard = dashboard or Dashboard(metrics)

    async def run(self, *, task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self.dashboard.nursery = nursery  # replays run here, beside the connections
            with listening("--admin", self.host, self.port):
                listeners = await nursery.start(
                    partial(trio.serve_tcp, self._on_connection, self.port, host=self.host)
                )
            sockname = listeners[0].socket.getsockname()
            self.address = (str(sockname[0]), int(sockname[1]))
            self.auth.port = self.address[1]
            log.info(
                "admin listening on http://%s:%d (/ /healthz /readyz /metrics /status.json)%s",
                *self.address,
                " with --admin-token" if self.auth.required else "",
            )
            task_status.started(self.address)

    async def _on_connection(self, stream: trio.SocketStream) -> None:
        try:
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            return  # over the limit: close at once rather than hold sockets open
        try:
            await self._serve(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, h11.ProtocolError):
            pass
        except Exception:
            log.exception("admin: unexpected error")
        finally:
            self._slots.release()

    async def _serve(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            client = str(stream.socket.getpeername()[0])
        except OSError:
            return
        while True:
            event = await _next_event(stream, conn, IDLE_TIMEOUT)
            if not isinstance(event, h11.Request):
                return
            body = bytearray()
            while True:
                more = await _next_event(stream, conn, HEAD_TIMEOUT)
                if isinstance(more, h11.Data):
                    body += more.data
                    if len(body) > MAX_REQUEST_BODY:
                        return
                elif isinstance(more, h11.EndOfMessage):
                    break
                else:
                    return
            request = AdminRequest(event.method, event.target, list(event.headers), bytes(body), client)
            reply = self._respond(request)
            headers = [
                (b"Content-Type", reply.content_type),
                (b"Cache-Control", b"no-store"),
                *reply.headers,
            ]
            if reply.stream is None:
                headers.append((b"Content-Length", str(len(reply.body)).encode()))
            response = h11.Response(status_code=reply.status, headers=headers, reason=phrase(reply.status))
            out = conn.send(response) or b""
            if reply.stream is not None:  # /events, which holds one of the event-stream slots
                try:
                    await stream.send_all(out)
                    await self._stream_events(stream, conn, reply.stream)
                finally:
                    self._event_streams.release()
                return
            if request.method != b"HEAD":
                out += conn.send(h11.Data(data=reply.body)) or b""
            out += conn.send(h11.EndOfMessage()) or b""
            await stream.send_all(out)
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()

    async def _stream_events(
        self, stream: trio.SocketStream, conn: h11.Connection, chunks: Callable[[], AsyncIterator[bytes]]
    ) -> None:
        """Send the chunks until the client goes away (its EOF ends the stream at once, not at the next
        write) or the stream ends."""
        async with trio.open_nursery() as nursery:

            async def watch_eof() -> None:
                while await stream.receive_some(4096):
                    pass
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch_eof)
            async for chunk in chunks():
                await stream.send_all(conn.send(h11.Data(data=chunk)) or b"")
            nursery.cancel_scope.cancel()

    def _respond(self, request: AdminRequest) -> Reply:
        path = request.path
        if path in PUBLIC_PATHS:
            if request.method not in (b"GET", b"HEAD"):
                return Reply(405, b"method not allowed\n", headers=[(b"Allow", b"GET, HEAD")])
            return self._probe(path, request)
        auth = self.auth
        dashboard_path = path not in ("/metrics", "/status.json")
        if dashboard_path and not auth.host_allowed(request.header(b"host")):
            # Without a token, a name that DNS could rebind to this address would let any web page read it.
            return Reply(
                403, b"unexpected Host header: use an IP address or localhost, or set --admin-token\n"
            )
        principal = auth.authenticate(request.headers)
        if path in LOGIN_PATHS:
            return self.dashboard.login(request, auth, principal)
        if principal is None:
            if request.method == b"GET" and path in PAGES:
                return Reply(303, b"log in first\n", headers=[(b"Location", b"/login")])
            return Reply(
                401, b"admin token required\n", headers=[(b"WWW-Authenticate", b'Bearer realm="rtunnel"')]
            )
        if path == "/metrics" or path == "/status.json":
            if request.method not in (b"GET", b"HEAD"):
                return Reply(405, b"method not allowed\n", headers=[(b"Allow", b"GET, HEAD")])
            if path == "/metrics":
                return Reply(200, generate_latest(self.metrics.registry), CONTENT_TYPE_LATEST.encode())
            body = json.dumps(self.metrics.status(), indent=2).encode() + b"\n"
            return Reply(200, body, b"application/json")
        if path == "/events":
            try:
                self._event_streams.acquire_nowait()
            except trio.WouldBlock:
                return Reply(503, b"too many event streams open\n", headers=[(b"Retry-After", b"10")])
            return self.dashboard.events(principal, auth.required)
        return self.dashboard.handle(request, auth, principal)

    def _probe(self, path: str, request: AdminRequest) -> Reply:
        metrics = self.metrics
        if path == "/healthz":
            return Reply(200, b"ok\n")
        tunnels = request.query.get("tunnel")
        if tunnels:  # /readyz?tunnel=NAME: an agent of that named tunnel is connected
            name = tunnels[0]
            if metrics.ready_for(name):
                return Reply(200, b"ready\n")
            return Reply(503, f"not ready: nothing connected for tunnel {name[:100]!r}\n".encode())
        if metrics.ready:
            return Reply(200, b"ready\n")
        what = "no agent connected" if metrics.role == "relay" else "not connected to any relay"
        return Reply(503, f"not ready: {what}\n".encode())


async def _next_event(stream: trio.SocketStream, conn: h11.Connection, seconds: float) -> h11.Event | None:
    with trio.move_on_after(seconds):
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
                continue
            if event is h11.PAUSED:
                return None
            return event  # type: ignore[return-value]
    return None


# -- rtunnel status -----------------------------------------------------------------------------------------


def _status_url(admin: str) -> str:
    base = admin if "://" in admin else "http://" + (admin if ":" in admin else f"127.0.0.1:{admin}")
    return base.rstrip("/") + "/status.json"


def fetch_status(admin: str, timeout: float = 5.0, token: str | None = None) -> dict[str, Any]:
    """GET the admin endpoint's /status.json (with the admin token, if any); raises OSError or ValueError."""
    # No proxy: the admin endpoint is normally local, and a proxy from the environment would break that.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(_status_url(admin))
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with opener.open(request, timeout=timeout) as response:
        document = json.loads(response.read())
    if not isinstance(document, dict) or "role" not in document:
        raise ValueError("the answer is not an rtunnel status document")
    return document


def _duration(seconds: float) -> str:
    total = int(seconds)
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def format_status(document: dict[str, Any], source: str) -> str:
    role = document.get("role", "?")
    key, label = ("agents", "AGENT") if role == "relay" else ("relays", "RELAY")
    links: list[dict[str, Any]] = document.get(key) or []
    ready = "ready" if document.get("ready") else "NOT ready"
    lines = [
        f"{role} at {source} (rtunnel {document.get('version', '?')}, up "
        f"{_duration(float(document.get('uptime_s', 0)))}, {ready}): "
        f"{len(links)} {key[:-1] if len(links) == 1 else key} connected"
    ]
    if links:
        rows = [[label, "TUNNEL", "UPTIME", "RTT", "IN FLIGHT"]]
        for link in links:
            rtt = link.get("rtt_ms")
            rows.append(
                [
                    str(link.get("peer", "?")),
                    str(link.get("tunnel") or "-"),
                    _duration(float(link.get("uptime_s", 0))),
                    "-" if rtt is None else f"{float(rtt):.1f} ms",
                    str(link.get("in_flight", 0)),
                ]
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        for row in rows:
            lines.append(
                "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
            )
    return "\n".join(lines)


def run_status(admin: str, token: str | None = None) -> int:
    """`rtunnel status`: print the table; 1 if the admin endpoint cannot be reached or read."""
    url = _status_url(admin)
    try:
        document = fetch_status(admin, token=token or os.environ.get("RTUNNEL_ADMIN_TOKEN") or None)
    except urllib.error.HTTPError as exc:
        print(f"rtunnel status: {url} answered {exc.code} {exc.reason}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        print(f"rtunnel status: cannot reach the admin endpoint at {url}: {reason}", file=sys.stderr)
        return 1
    print(format_status(document, url.removesuffix("/status.json")))
    return 0
