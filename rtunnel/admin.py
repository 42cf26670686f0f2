"""The admin endpoint (`--admin HOST:PORT`) and its client, `rtunnel status`.

Endpoints, GET or HEAD:
- /healthz: 200 while the process runs (liveness);
- /readyz: 200 once at least one tunnel connection is up (relay: an agent; agent: a relay), else 503;
  /readyz?tunnel=NAME: the same for one named tunnel;
- /metrics: Prometheus text format, from the process's own registry;
- /status.json: the live connections (what `rtunnel status` prints).

It is a deliberately small HTTP/1.1 server (h11 under trio, keep-alive, bounded connections and timeouts):
it shares the process with the tunnel, so it must never cost the tunnel anything when scraped or probed.
"""

from __future__ import annotations

import http
import json
import logging
import sys
import urllib.error
import urllib.request
from functools import partial
from typing import Any, Final
from urllib.parse import parse_qs

import h11
import trio
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .config import parse_address
from .metrics import Metrics
from .startup import listening

__all__ = ["DEFAULT_ADMIN", "AdminServer", "format_status", "parse_admin_address", "run_status"]

log = logging.getLogger("rtunnel.admin")

DEFAULT_ADMIN: Final = "127.0.0.1:9180"
MAX_CONNECTIONS: Final = 32
HEAD_TIMEOUT: Final = 10.0
IDLE_TIMEOUT: Final = 30.0
MAX_REQUEST_BODY: Final = 64 * 1024


def parse_admin_address(text: str, option: str = "--admin") -> tuple[str, int]:
    """'HOST:PORT', ':PORT' or 'PORT' (host 127.0.0.1: the admin endpoint is local unless asked otherwise)."""
    return parse_address(text, option, default_host="127.0.0.1")


class AdminServer:
    def __init__(self, metrics: Metrics, host: str = "127.0.0.1", port: int = 0) -> None:
        self.metrics = metrics
        self.host = host
        self.port = port
        self.address: tuple[str, int] | None = None
        self._slots = trio.CapacityLimiter(MAX_CONNECTIONS)

    async def run(self, *, task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            with listening("--admin", self.host, self.port):
                listeners = await nursery.start(
                    partial(trio.serve_tcp, self._on_connection, self.port, host=self.host)
                )
            sockname = listeners[0].socket.getsockname()
            self.address = (str(sockname[0]), int(sockname[1]))
            log.info(
                "admin listening on http://%s:%d (/healthz /readyz /metrics /status.json)",
                *self.address,
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
        while True:
            request = await _next_event(stream, conn, IDLE_TIMEOUT)
            if not isinstance(request, h11.Request):
                return
            # Read (and drop) any body, so that the connection can be kept alive.
            received = 0
            while True:
                event = await _next_event(stream, conn, HEAD_TIMEOUT)
                if isinstance(event, h11.Data):
                    received += len(event.data)
                    if received > MAX_REQUEST_BODY:
                        return
                elif isinstance(event, h11.EndOfMessage):
                    break
                else:
                    return
            status, content_type, body, extra = self._respond(request.method, request.target)
            headers = [
                (b"Content-Type", content_type),
                (b"Content-Length", str(len(body)).encode()),
                (b"Cache-Control", b"no-store"),
                *extra,
            ]
            reason = http.HTTPStatus(status).phrase.encode()
            out = conn.send(h11.Response(status_code=status, headers=headers, reason=reason))
            if request.method != b"HEAD":
                out = (out or b"") + (conn.send(h11.Data(data=body)) or b"")
            out = (out or b"") + (conn.send(h11.EndOfMessage()) or b"")
            await stream.send_all(out)
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()

    def _respond(self, method: bytes, target: bytes) -> tuple[int, bytes, bytes, list[tuple[bytes, bytes]]]:
        text = b"text/plain; charset=utf-8"
        if method not in (b"GET", b"HEAD"):
            return 405, text, b"method not allowed\n", [(b"Allow", b"GET, HEAD")]
        path, _, query = target.partition(b"?")
        metrics = self.metrics
        if path == b"/healthz":
            return 200, text, b"ok\n", []
        if path == b"/readyz":
            tunnels = parse_qs(query.decode("latin-1")).get("tunnel")
            if tunnels:  # /readyz?tunnel=NAME: an agent of that named tunnel is connected
                name = tunnels[0]
                if metrics.ready_for(name):
                    return 200, text, b"ready\n", []
                return 503, text, f"not ready: nothing connected for tunnel {name[:100]!r}\n".encode(), []
            if metrics.ready:
                return 200, text, b"ready\n", []
            what = "no agent connected" if metrics.role == "relay" else "not connected to any relay"
            return 503, text, f"not ready: {what}\n".encode(), []
        if path == b"/metrics":
            return 200, CONTENT_TYPE_LATEST.encode(), generate_latest(metrics.registry), []
        if path == b"/status.json":
            body = json.dumps(metrics.status(), indent=2).encode() + b"\n"
            return 200, b"application/json", body, []
        if path == b"/":
            return 200, text, b"rtunnel admin: /healthz /readyz /metrics /status.json\n", []
        return 404, text, b"not found (try /healthz /readyz /metrics /status.json)\n", []


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


def fetch_status(admin: str, timeout: float = 5.0) -> dict[str, Any]:
    """GET the admin endpoint's /status.json; raises OSError or ValueError."""
    # No proxy: the admin endpoint is normally local, and a proxy from the environment would break that.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(_status_url(admin), timeout=timeout) as response:
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


def run_status(admin: str) -> int:
    """`rtunnel status`: print the table; 1 if the admin endpoint cannot be reached or read."""
    url = _status_url(admin)
    try:
        document = fetch_status(admin)
    except urllib.error.HTTPError as exc:
        print(f"rtunnel status: {url} answered {exc.code} {exc.reason}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        print(f"rtunnel status: cannot reach the admin endpoint at {url}: {reason}", file=sys.stderr)
        return 1
    print(format_status(document, url.removesuffix("/status.json")))
    return 0
