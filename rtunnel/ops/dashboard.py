"""The admin endpoint's web pages: the dashboard (/), the inspector (/inspector), their event stream (/events),
one capture in full (/api/exchanges/ID), replay (POST /api/exchanges/ID/replay) and the login form.

Everything a page needs ships in the package (rtunnel/ops/static: one HTML file, one script, one style sheet):
no CDN, no font, no build step, so the pages work in an air-gapped network. They update over one
server-sent-events stream: a snapshot when it opens, then what changed, at most once a second (and every
HEARTBEAT seconds when nothing did), so a page left open all day costs a few bytes a second.
"""

from __future__ import annotations

import html
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib import resources
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import parse_qs, urlsplit

import trio

from ..http.replay import IDEMPOTENT
from .adminhttp import AdminRequest, Reply
from .inspector import Capture, Inspector
from .logs import new_request_id
from .metrics import Metrics

if TYPE_CHECKING:
    from .adminauth import AdminAuth, Principal

__all__ = ["LOGIN_PATHS", "PAGES", "Dashboard", "Replayer"]

log = logging.getLogger("rtunnel.admin")

PAGES: Final = frozenset({"/", "/inspector"})
# What anyone may fetch without the admin token: the login form and its style sheet (no data in either).
LOGIN_STYLE: Final = "/static/style.css"
LOGIN_PATHS: Final = frozenset({"/login", "/logout", LOGIN_STYLE})
TICK: Final = 1.0
HEARTBEAT: Final = 15.0
MAX_ROWS: Final = 500  # rows a snapshot or an update carries at most (the page keeps as many)
MAX_REPLAYS: Final = 4  # replays in progress at once
_TYPES: Final = {
    ".html": b"text/html; charset=utf-8",
    ".js": b"text/javascript; charset=utf-8",
    ".css": b"text/css; charset=utf-8",
}
# Captured bodies are shown as text only (textContent, never markup), and nothing but our own files may run.
SECURITY_HEADERS: Final = [
    (
        b"Content-Security-Policy",
        b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
        b"form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    ),
    (b"X-Content-Type-Options", b"nosniff"),
    (b"X-Frame-Options", b"DENY"),
    # Not no-referrer: with it, a browser sends "Origin: null" on the login form's POST.
    (b"Referrer-Policy", b"same-origin"),
]

Replayer = Callable[[Capture, str], Awaitable[None]]


def _static_files() -> dict[str, bytes]:
    folder = resources.files("rtunnel.ops") / "static"
    return {item.name: item.read_bytes() for item in folder.iterdir() if item.name.endswith(tuple(_TYPES))}


class Dashboard:
    def __init__(
        self,
        metrics: Metrics,
        *,
        inspector: Inspector | None = None,
        replayer: Replayer | None = None,
        info: dict[str, Any] | None = None,
    ) -> None:
        self.metrics = metrics
        self.inspector = inspector
        self.replayer = replayer
        self.info = info or {}  # fixed facts the page shows (agent: the allowlist in force)
        self.nursery: trio.Nursery | None = None  # set by the admin server: where replays run
        self._replays = 0  # in progress
        self._files = _static_files()

    # -- pages ----------------------------------------------------------------------------------------

    def handle(self, request: AdminRequest, auth: AdminAuth, principal: Principal) -> Reply:
        path, method = request.path, request.method
        if path.startswith("/api/exchanges/") and path.endswith("/replay"):
            if method != b"POST":
                return Reply(405, b"method not allowed\n", headers=[(b"Allow", b"POST")])
            return self._replay(
                request, auth, principal, path.removeprefix("/api/exchanges/")[: -len("/replay")]
            )
        if method not in (b"GET", b"HEAD"):
            return Reply(405, b"method not allowed\n", headers=[(b"Allow", b"GET, HEAD")])
        if path in PAGES:
            headers = list(SECURITY_HEADERS)
            if principal.session is None and not principal.bearer:
                headers.append((b"Set-Cookie", auth.cookie(auth.new_session(), secure=_over_tls(request))))
            return Reply(200, self._files["index.html"], _TYPES[".html"], headers)
        if path.startswith("/static/"):
            name = path.removeprefix("/static/")
            if name in self._files:
                kind = _TYPES["." + name.rpartition(".")[2]]
                return Reply(200, self._files[name], kind, list(SECURITY_HEADERS))
        if path.startswith("/api/exchanges/"):
            capture = self._capture(path.removeprefix("/api/exchanges/"))
            if capture is None:
                return Reply(404, b"no such exchange (the inspector keeps the last ones only)\n")
            return _json(200, capture.detail())
        return Reply(404, b"not found (try / /inspector /healthz /readyz /metrics /status.json)\n")

    def _capture(self, text: str) -> Capture | None:
        if self.inspector is None or not (text.isascii() and text.isdigit() and len(text) <= 18):
            return None
        return self.inspector.get(int(text))

    def login(self, request: AdminRequest, auth: AdminAuth, principal: Principal | None) -> Reply:
        """/login (the form, and its POST), /logout, and the login page's style sheet."""
        if request.path == LOGIN_STYLE:
            return Reply(200, self._files["style.css"], _TYPES[".css"], list(SECURITY_HEADERS))
        if request.path == "/logout":
            if request.method != b"POST":
                return Reply(405, b"method not allowed\n", headers=[(b"Allow", b"POST")])
            if (
                principal is not None
                and principal.session is not None
                and auth.csrf_ok(principal, request.headers)
            ):
                auth.end_session(principal.session)
            expire = f"{auth.cookie_name}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0".encode()
            return Reply(303, b"logged out\n", headers=[(b"Location", b"/login"), (b"Set-Cookie", expire)])
        if not auth.required:
            return Reply(303, b"no login needed\n", headers=[(b"Location", b"/")])
        if request.method in (b"GET", b"HEAD"):
            return _login_page(200, "")
        if request.method != b"POST":
            return Reply(405, b"method not allowed\n", headers=[(b"Allow", b"GET, HEAD, POST")])
        if not _same_origin(request):
            return Reply(403, b"cross-origin login refused\n")
        form = parse_qs(request.body.decode("utf-8", "replace"))
        result = auth.login((form.get("token") or [""])[0], request.client)
        if isinstance(result, float):
            return _login_page(429, f"Too many wrong tokens: try again in {result:.0f} s.")
        if result is None:
            log.warning("admin: wrong token at the login form from %s", request.client)
            return _login_page(401, "Wrong token.")
        return Reply(
            303,
            b"logged in\n",
            headers=[(b"Location", b"/"), (b"Set-Cookie", auth.cookie(result, secure=_over_tls(request)))],
        )

    # -- the event stream -----------------------------------------------------------------------------

    def events(self, principal: Principal, login: bool) -> Reply:
        def chunks() -> AsyncIterator[bytes]:
            return self._events(principal, login)

        headers = [(b"X-Accel-Buffering", b"no")]  # a reverse proxy in front must not hold events back
        return Reply(200, content_type=b"text/event-stream; charset=utf-8", headers=headers, stream=chunks)

    async def _events(self, principal: Principal, login: bool) -> AsyncIterator[bytes]:
        activity = self.metrics.activity
        # Taken with the snapshot, not after sending it: a change in between must still count as one.
        fingerprint = self._fingerprint()
        snapshot = self.snapshot(principal, login)
        last_bucket = snapshot["series"]["last"]
        last_event = activity.events
        last_row = self._newest()
        yield b"retry: 3000\n\n" + _event("snapshot", snapshot)
        quiet_since = time.monotonic()
        while True:
            await trio.sleep(TICK)
            now = self._fingerprint()
            if now == fingerprint and time.monotonic() - quiet_since < HEARTBEAT:
                continue
            fingerprint, quiet_since = now, time.monotonic()
            series = activity.series(since=last_bucket)
            update: dict[str, Any] = {
                "status": self.metrics.status(),
                "series": series,
                **activity.events_since(last_event),
                "rows": self._rows(last_row),
            }
            last_bucket, last_event, last_row = series["last"], activity.events, self._newest()
            yield _event("update", update)

    def _fingerprint(self) -> tuple[object, ...]:
        activity = self.metrics.activity
        links = tuple((link.peer, link.mux.in_flight) for link in self.metrics.links.values())
        return activity.current(), activity.events, self._newest(), links

    def _newest(self) -> int:
        return self.inspector.newest if self.inspector is not None else 0

    def _rows(self, after: int) -> list[dict[str, Any]]:
        if self.inspector is None:
            return []
        return [capture.summary() for capture in self.inspector.since(after)[-MAX_ROWS:]]

    def snapshot(self, principal: Principal, login: bool) -> dict[str, Any]:
        """Everything a page shows; `login`: sessions come from the login form (the page offers to log out)."""
        activity = self.metrics.activity
        inspector = self.inspector
        return {
            "role": self.metrics.role,
            "status": self.metrics.status(),
            "series": activity.series(),
            "errors": list(activity.errors),
            "refusals": list(activity.refusals),
            "info": self.info,
            "inspector": {
                "enabled": inspector is not None,
                "limit": inspector.limit if inspector else 0,
                "max_body": inspector.max_body if inspector else 0,
                "replay": self.replayer is not None,
                "rows": self._rows(0),
            },
            "csrf": principal.session.csrf if principal.session is not None else None,
            "logout": login and principal.session is not None,
        }

    # -- replay ---------------------------------------------------------------------------------------

    def _replay(self, request: AdminRequest, auth: AdminAuth, principal: Principal, ident: str) -> Reply:
        if self.replayer is None or self.inspector is None:
            return Reply(404, b"replay is available on the relay with --inspect only\n")
        if not _same_origin(request) or not auth.csrf_ok(principal, request.headers):
            return Reply(403, b"missing or wrong CSRF token (reload the page)\n")
        capture = self._capture(ident)
        if capture is None:
            return Reply(404, b"no such exchange (the inspector keeps the last ones only)\n")
        if not capture.replayable:
            why = "its request body was not captured whole" if not capture.request.complete else "trailers"
            return _json(409, {"error": f"this exchange cannot be replayed: {why}"})
        if capture.method.encode("latin-1") not in IDEMPOTENT and request.query.get("confirm") != ["1"]:
            return _json(409, {"error": f"{capture.method} is not idempotent: confirm", "confirm": True})
        if self.nursery is None:
            return Reply(503, b"the admin endpoint is not running\n")
        if self._replays >= MAX_REPLAYS:
            return Reply(429, b"too many replays in progress\n", headers=[(b"Retry-After", b"1")])
        self._replays += 1
        request_id = new_request_id()
        self.inspector.expect_replay(request_id, capture.id)
        self.nursery.start_soon(self._run_replay, self.replayer, capture, request_id)
        return _json(202, {"request_id": request_id, "replay_of": capture.id})

    async def _run_replay(self, replayer: Replayer, capture: Capture, request_id: str) -> None:
        try:
            await replayer(capture, request_id)
        except Exception as exc:  # a replay that fails shows as its exchange (or not at all): log why
            log.warning("replay of exchange %d failed: %s", capture.id, exc)
        finally:
            self._replays -= 1


def _event(name: str, data: object) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def _json(status: int, document: object) -> Reply:
    return Reply(status, json.dumps(document).encode(), b"application/json", list(SECURITY_HEADERS))


def _same_origin(request: AdminRequest) -> bool:
    """A browser names the page a request comes from in Origin: it must be this endpoint (when given), as
    the client addressed it (Host, or X-Forwarded-Host from a reverse proxy that rewrites Host)."""
    origin = request.header(b"origin")
    if origin is None:
        return True
    netloc = urlsplit(origin.decode("latin-1")).netloc.lower()
    names = (request.header(b"host"), request.header(b"x-forwarded-host"))
    return any(name is not None and netloc == name.decode("latin-1").lower() for name in names)


def _over_tls(request: AdminRequest) -> bool:
    """The admin endpoint speaks plain HTTP: TLS, if any, ended at a reverse proxy, which says so."""
    return request.header(b"x-forwarded-proto") == b"https" or (request.header(b"origin") or b"").startswith(
        b"https://"
    )


def _login_page(status: int, message: str) -> Reply:
    note = f'<p class="error" role="alert">{html.escape(message)}</p>' if message else ""
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>rtunnel admin: log in</title><link rel="stylesheet" href="/static/style.css"></head>
<body class="login"><main><h1>rtunnel admin</h1>{note}
<form method="post" action="/login"><label for="token">Admin token</label>
<input id="token" name="token" type="password" autocomplete="current-password" required autofocus>
<button type="submit">Log in</button></form>
<p class="hint">The token is the one given with <code>--admin-token</code> or <code>$RTUNNEL_ADMIN_TOKEN</code>.</p>
</main></body></html>
"""
    return Reply(status, page.encode(), _TYPES[".html"], list(SECURITY_HEADERS))
