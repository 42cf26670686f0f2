"""Who may use the admin endpoint: `--admin-token` (Bearer, or a session cookie from the login form), the
CSRF token every state-changing request needs, and, without a token, the Host check that keeps a web page
from reading the dashboard through DNS rebinding.

Sessions live in memory (a restart logs everyone out), at most MAX_SESSIONS of them, each expiring after
SESSION_IDLE seconds without use. Without --admin-token the pages still get a session (anonymous): it is what
the CSRF token is bound to, since a browser on the operator's machine is exactly what a hostile page would
use to reach a loopback endpoint.
"""

from __future__ import annotations

import dataclasses
import hmac
import ipaddress
import secrets
import time
from collections import OrderedDict
from collections.abc import Iterable
from typing import Final
from urllib.parse import urlsplit

from ..net.limits import AuthThrottle

__all__ = ["SESSION_COOKIE", "AdminAuth", "Principal", "Session", "is_loopback"]

SESSION_COOKIE: Final = "rtunnel_session"
SESSION_IDLE: Final = 12 * 3600.0
MAX_SESSIONS: Final = 64
CSRF_HEADER: Final = b"x-csrf-token"


def is_loopback(host: str) -> bool:
    """True for an address that only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclasses.dataclass
class Session:
    id: str
    csrf: str
    last_used: float


@dataclasses.dataclass(frozen=True)
class Principal:
    """An authenticated caller: by Bearer token (no cookie, so no CSRF risk), by session, or neither (an
    endpoint without a token, before the page got its session)."""

    session: Session | None
    bearer: bool = False


class AdminAuth:
    def __init__(self, token: str | None, *, bind_host: str = "127.0.0.1") -> None:
        self._token = None if token is None else token.encode()
        self._bind_host = bind_host.strip("[]").lower()
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._throttle = AuthThrottle(5, 60.0, what="admin logins")
        self.port = 0  # set once listening: cookies do not tell ports apart, so the name does

    @property
    def cookie_name(self) -> str:
        return f"{SESSION_COOKIE}_{self.port}"

    @property
    def required(self) -> bool:
        return self._token is not None

    def host_allowed(self, host: bytes | None) -> bool:
        """Without a token: only Host names that cannot be rebound (IP literals, localhost, the bind host)."""
        if self.required:
            return True
        if host is None:
            return False
        try:
            name = urlsplit("//" + host.decode("latin-1")).hostname or ""
        except ValueError:  # "Host: [": not a name at all
            return False
        if name == "localhost" or name.endswith(".localhost") or name == self._bind_host:
            return True
        try:
            ipaddress.ip_address(name)
        except ValueError:
            return False
        return True

    def authenticate(self, headers: Iterable[tuple[bytes, bytes]]) -> Principal | None:
        headers = list(headers)
        if self._token is not None:
            for name, value in headers:
                if name == b"authorization":
                    scheme, _, presented = value.partition(b" ")
                    if scheme.lower() == b"bearer" and hmac.compare_digest(presented.strip(), self._token):
                        return Principal(None, bearer=True)
        session = self.session_of(headers)
        if session is not None:
            return Principal(session)
        if self._token is None:
            return Principal(None)  # open endpoint; pages get an anonymous session for CSRF
        return None

    def session_of(self, headers: Iterable[tuple[bytes, bytes]]) -> Session | None:
        now = time.monotonic()
        for name, value in headers:
            if name != b"cookie":
                continue
            for part in value.decode("latin-1").split(";"):
                key, _, sid = part.strip().partition("=")
                if key != self.cookie_name:
                    continue
                session = self._sessions.get(sid)
                if session is not None and now - session.last_used < SESSION_IDLE:
                    session.last_used = now
                    self._sessions.move_to_end(sid)
                    return session
        return None

    def new_session(self) -> Session:
        session = Session(secrets.token_urlsafe(32), secrets.token_urlsafe(32), time.monotonic())
        self._sessions[session.id] = session
        while len(self._sessions) > MAX_SESSIONS:
            self._sessions.popitem(last=False)
        return session

    def end_session(self, session: Session) -> None:
        self._sessions.pop(session.id, None)

    def login(self, presented: str, client: str) -> Session | float | None:
        """A new session for the right token; the seconds to wait when throttled; None when wrong."""
        now = time.monotonic()
        wait = self._throttle.retry_after(client, now)
        if wait is not None:
            return wait
        if self._token is not None and hmac.compare_digest(presented.encode(), self._token):
            return self.new_session()
        self._throttle.failed(client, now)
        return None

    @staticmethod
    def csrf_ok(principal: Principal, headers: Iterable[tuple[bytes, bytes]]) -> bool:
        """A state-changing request: Bearer callers pass (a browser never adds that header by itself);
        session callers must echo their session's CSRF token in X-CSRF-Token; anyone else fails."""
        if principal.bearer:
            return True
        if principal.session is None:
            return False
        expected = principal.session.csrf.encode()
        return any(name == CSRF_HEADER and hmac.compare_digest(value, expected) for name, value in headers)

    def cookie(self, session: Session, *, secure: bool = False) -> bytes:
        """The Set-Cookie value; `secure` when the page was reached over TLS (through a reverse proxy)."""
        flags = "; Secure" if secure else ""
        return (
            f"{self.cookie_name}={session.id}; Path=/; HttpOnly; SameSite=Strict; "
            f"Max-Age={int(SESSION_IDLE)}{flags}"
        ).encode()
