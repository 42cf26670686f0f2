"""Log output (human-readable or JSON lines) and the access record both sides write once per exchange.

Access lines carry their fields twice: in the message, for people, and as record attributes (`extra=`), so
the JSON formatter emits them as typed fields that log pipelines can filter on without parsing text.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import re
import secrets
import sys
from collections.abc import Iterable
from typing import Any, Final, TextIO

__all__ = [
    "LOG_FORMATS",
    "REQUEST_ID_HEADER",
    "Access",
    "JsonFormatter",
    "new_request_id",
    "pick_request_id",
    "request_id_of",
    "sanitize_request_id",
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

# Attributes every LogRecord has: anything else on a record came from `extra=` and goes into the JSON line.
_STANDARD_ATTRS: Final = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "taskName",
}


def new_request_id() -> str:
    return secrets.token_hex(16)


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


@dataclasses.dataclass(frozen=True, slots=True)
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


def setup(level: str = "info", fmt: str = "text", stream: TextIO | None = None) -> None:
    """Configure the root logger once, for the whole process: `fmt` is "text" or "json"."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(HUMAN_FORMAT))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler], force=True)


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
