"""Log output (human-readable or JSON lines) and the access record both sides write once per exchange.

Access lines carry their fields twice: in the message, for people, and as typed fields (record attributes,
`extra=`), so the JSON format emits them as fields that log pipelines can filter on without parsing text.

Access lines are the one log line per exchange, so they skip the logging module's per-record machinery once
`setup` configured the process (the CLI does): `AccessLog.write` formats the line exactly as the handler
would and appends it to a buffer that `flush_periodically` writes every FLUSH_INTERVAL (one write instead
of one per line), before any other log line (so lines stay in order) and at exit. Without `setup` (tests
that run a relay in-process) they go through `logging` as before, so caplog sees them.
"""

from __future__ import annotations

import atexit
import dataclasses
import datetime
import json
import logging
import re
import sys
import time
from collections.abc import Iterable
from typing import Any, Final, TextIO

import trio

from ..net.entropy import random_bytes

__all__ = [
    "LOG_FORMATS",
    "REQUEST_ID_HEADER",
    "Access",
    "AccessLog",
    "JsonFormatter",
    "TextFormatter",
    "new_request_id",
    "pick_request_id",
    "request_id_of",
    "sanitize_request_id",
    "flush_periodically",
    "setup",
    "with_request_id",
]

LOG_FORMATS: Final = ("text", "json")
HUMAN_FORMAT: Final = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
REQUEST_ID_HEADER: Final = b"X-Request-Id"
# Long enough for a UUID, a W3C trace id plus span, or most vendors' ids; short enough that a hostile client
# cannot bloat every log line and upstream request with it.
MAX_REQUEST_ID: Final = 128
# Characters that are safe in a header, a log line and a shell: anything else is dropped.
_UNSAFE_ID_CHARS: Final = re.compile(rb"[^A-Za-z0-9._:/+=@-]")

# C0 and C1 control characters (tab aside) and Unicode's line separators. Logged values come from peers too (a
# WebSocket close reason, a hostile relay's method in the agent's access line): raw, a line break among them
# would end the line and start one of the peer's making. Text lines show them escaped; JSON escapes them itself.
_CONTROL: Final = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")

# Attributes every LogRecord has: anything else on a record came from `extra=` and goes into the JSON line.
_STANDARD_ATTRS: Final = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "taskName",
}


def new_request_id() -> str:
    return random_bytes(16).hex()  # as secrets.token_hex(16), without a getrandom call per exchange


def sanitize_request_id(value: bytes) -> str | None:
    """A client's X-Request-Id made safe to log and forward (unsafe characters dropped, length bounded);
    None if nothing usable is left."""
    cleaned = _UNSAFE_ID_CHARS.sub(b"", value)[:MAX_REQUEST_ID]
    return cleaned.decode("ascii") or None


def request_id_of(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The (sanitized) X-Request-Id among `headers`, for logging on a side that does not set it."""
    for name, value in headers:
        if name.lower() == b"x-request-id":
            return sanitize_request_id(value)
    return None


@dataclasses.dataclass(slots=True)  # not frozen: that makes __init__ a setattr call per field
class Access:
    """One exchange as the access log and the metrics see it.

    bytes_in is the request body (client to upstream), bytes_out the response body; status is None when no
    response head was sent (the exchange was reset first). note says why it failed or was refused, when this
    end knows (the dashboard's last errors); the access line carries it separately.
    """

    method: str
    path: str
    status: int | None
    bytes_in: int
    bytes_out: int
    duration_ms: float
    request_id: str | None
    note: str | None = None

    def extra(self, **more: object) -> dict[str, object]:
        # Built by hand: dataclasses.asdict deep-copies and showed up in profiles of small requests.
        fields: dict[str, object] = {
            "method": self.method,
            "path": self.path,
            "status": self.status,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "duration_ms": self.duration_ms,
            "request_id": self.request_id,
        }
        fields.update((key, value) for key, value in more.items() if value is not None)
        return fields


def _escaped(text: str) -> str:
    """`text` with its control characters as Python writes them in a string ("\\n", "\\x1b")."""
    if _CONTROL.search(text) is None:
        return text
    return _CONTROL.sub(lambda match: repr(match.group())[1:-1], text)


class TextFormatter(logging.Formatter):
    """HUMAN_FORMAT's lines, one per record: control characters escaped (a traceback after it keeps its lines)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return _escaped(super().formatMessage(record))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, then any `extra=` fields."""

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.datetime.fromtimestamp(record.created, tz=datetime.UTC)
        line: dict[str, Any] = {
            "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and key not in line:
                line[key] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exception"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, default=str, ensure_ascii=False)


def setup(
    level: str = "info", fmt: str = "text", stream: TextIO | None = None, *, access: bool = True
) -> None:
    """Configure the root logger once, for the whole process: `fmt` is "text" or "json"; `access` False
    turns the access lines off (`--access-log off`)."""
    global _sink
    if _sink is not None:
        _sink.flush()
    out = stream or sys.stderr
    _sink = _AccessSink(out, fmt)
    handler = _sink.handler = _Handler(out, _sink)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter(HUMAN_FORMAT))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler], force=True)
    AccessLog.enabled_by_option = access
    atexit.register(_flush_at_exit)


def _flush_at_exit() -> None:
    if _sink is not None:
        _sink.flush()


# Buffered access lines are written at least this often (and before any other line, and at exit).
FLUSH_INTERVAL: Final = 0.1
# ... and at once beyond this much text, so a burst never holds more than this in memory.
FLUSH_SIZE: Final = 64 * 1024
_JSON: Final = json.JSONEncoder(default=str, ensure_ascii=False)  # json.dumps(**options) builds one per call


class _AccessSink:
    """Access lines formatted as `setup`'s handler would, buffered until `flush`."""

    def __init__(self, stream: TextIO, fmt: str) -> None:
        self.stream = stream
        self.json = fmt == "json"
        self._lines: list[str] = []
        self._size = 0
        self._pending = trio.Event()  # set while lines wait (for flush_periodically)
        self.handler: logging.Handler | None = None
        self._second = -1  # the whole second the cached time prefix is for
        self._prefix = ""

    def add(self, name: str, message: str, fields: dict[str, object] | None) -> None:
        now = time.time()
        second = int(now)
        millis = int((now - second) * 1000)
        if second != self._second:
            self._second = second
            if self.json:
                when = datetime.datetime.fromtimestamp(second, tz=datetime.UTC)
                self._prefix = when.strftime("%Y-%m-%dT%H:%M:%S.")
            else:
                self._prefix = time.strftime("%Y-%m-%d %H:%M:%S,", time.localtime(second))
        if self.json:
            line: dict[str, object] = {
                "time": f"{self._prefix}{millis:03d}Z",
                "level": "info",
                "logger": name,
                "message": message,
            }
            for key, value in (fields or {}).items():
                line.setdefault(key, value)
            text = _JSON.encode(line) + "\n"
        else:
            text = f"{self._prefix}{millis:03d} INFO    {name}: {_escaped(message)}\n"
        self._lines.append(text)
        self._size += len(text)
        if self._size >= FLUSH_SIZE:
            self.flush()
        elif len(self._lines) == 1:
            self._pending.set()

    def flush(self) -> None:
        if not self._lines:
            return
        # Swapped, not cleared after the join: a WSGI app's worker thread logs too (`--app`), and its line
        # makes _Handler.emit flush from that thread while the trio thread may be adding an access line.
        lines, self._lines = self._lines, []
        self._size = 0
        text = "".join(lines)
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            pass  # stderr closed or gone: nowhere left to report it

    async def wait_pending(self) -> None:
        while not self._lines:
            if self._pending.is_set():
                self._pending = trio.Event()
            await self._pending.wait()


class _Handler(logging.StreamHandler[TextIO]):
    """The process's handler: buffered access lines go out before any other line, so the order holds."""

    def __init__(self, stream: TextIO, sink: _AccessSink) -> None:
        super().__init__(stream)
        self._sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        self._sink.flush()
        super().emit(record)


_sink: _AccessSink | None = None
_root: Final = logging.getLogger()


async def flush_periodically() -> None:
    """Write buffered access lines every FLUSH_INTERVAL while there are any; runs until cancelled (and
    flushes then too)."""
    try:
        while True:
            sink = _sink
            if sink is None:
                await trio.sleep_forever()
                return
            await sink.wait_pending()
            await trio.sleep(FLUSH_INTERVAL)
            sink.flush()
    finally:
        if _sink is not None:
            _sink.flush()


class AccessLog:
    """The access lines of one side ("rtunnel.relay.access" or "rtunnel.agent.access"), at level INFO."""

    enabled_by_option: bool = True  # --access-log on|off, for the whole process

    def __init__(self, name: str) -> None:
        self.name = name
        self.logger = logging.getLogger(name)

    @property
    def enabled(self) -> bool:
        return AccessLog.enabled_by_option and self.logger.isEnabledFor(logging.INFO)

    def write(self, message: str, access: Access, key: str, value: object) -> None:
        """One line: `message` for people, `access` (and `key`: `value` unless None) as typed fields (which only
        the JSON format shows: the text format does not even build them)."""
        sink = _sink
        # Only while setup's handler is the one place lines go (not under a test's caplog, say).
        if sink is not None and not self.logger.handlers and _root.handlers == [sink.handler]:
            sink.add(self.name, message, access.extra(**{key: value}) if sink.json else None)
        else:
            self.logger.info(message, extra=access.extra(**{key: value}))


def pick_request_id(headers: Iterable[tuple[bytes, bytes]]) -> str:
    """The client's X-Request-Id (the first one, sanitized) if usable, else a new one."""
    for name, value in headers:
        if name.lower() == b"x-request-id":
            return sanitize_request_id(value) or new_request_id()
    return new_request_id()


def with_request_id(
    headers: Iterable[tuple[bytes, bytes]], request_id: str | None
) -> list[tuple[bytes, bytes]]:
    """`headers` carrying exactly one X-Request-Id, `request_id` (in place of the first, if there was one)."""
    if request_id is None:
        return list(headers)
    result: list[tuple[bytes, bytes]] = []
    value = request_id.encode("ascii")
    for name, old in headers:
        if name.lower() != b"x-request-id":
            result.append((name, old))
        elif value:
            result.append((name, value))
            value = b""
    if value:
        result.append((REQUEST_ID_HEADER, value))
    return result
