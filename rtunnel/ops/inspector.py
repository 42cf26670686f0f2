"""The request inspector (`--inspect N`): the last N exchanges, heads and the first bytes of each body.

Each end hooks it in at one place: the relay's client connection and the agent's exchange handler check
`inspector is None` once per exchange, and with an inspector they wrap the exchange's stream in a `_Tap`
that copies what passes through. Nothing is recorded with the inspector off.

Memory: at most N finished exchanges, each with at most `max_body` bytes of each body (heads are bounded by
the HTTP limits already), plus the exchanges in progress, whose capture buffers share a budget of the same
size: beyond it a body is not captured (the exchange still is, marked so). Secrets are redacted (redact.py)
when the heads arrive and when the exchange ends, before a capture becomes visible.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import time
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any, Final, cast

from protocol import ResponseHead

from ..link.mux import MuxStream
from .logs import Access
from .redact import Redactor

__all__ = ["DEFAULT_MAX_BODY", "Capture", "Inspector"]

DEFAULT_MAX_BODY: Final = 64 * 1024
# A binary body is shown as a hex dump of its first bytes only: a preview, not a hex editor.
HEX_PREVIEW: Final = 4096
# Replays announced but not begun yet (their request id links the new exchange to the original).
MAX_PENDING_REPLAYS: Final = 16

Headers = list[tuple[bytes, bytes]]


@dataclasses.dataclass
class Body:
    data: bytearray = dataclasses.field(default_factory=bytearray)  # redacted once the exchange is over
    size: int = 0  # the whole body's length, captured or not
    captured: int = 0  # how much of it was captured (redaction may then change the length of `data`)
    dropped: bool = False  # not captured at all: the in-flight budget was spent

    @property
    def complete(self) -> bool:
        return not self.dropped and self.captured == self.size


@dataclasses.dataclass(eq=False)  # identity: captures live in a WeakSet while in progress
class Capture:
    id: int
    side: str  # "relay" or "agent"
    started: float  # wall-clock time, for display
    peer: str  # relay: the agent that served it; agent: the relay it came from
    client: str | None
    method: str
    target: str
    request_headers: Headers
    request_id: str | None
    request: Body = dataclasses.field(default_factory=Body)
    response: Body = dataclasses.field(default_factory=Body)
    status: int | None = None
    reason: str = ""
    response_headers: Headers = dataclasses.field(default_factory=list)
    request_trailers: Headers = dataclasses.field(default_factory=list)
    response_trailers: Headers = dataclasses.field(default_factory=list)
    duration_ms: float = 0.0
    note: str | None = None
    replay_of: int | None = None
    done: bool = False
    finished: int = 0  # its place in the order exchanges finished (ids say the order they began)
    inspector: Inspector | None = dataclasses.field(default=None, repr=False)
    # The stream of the last attempt: the trailers it received are read from it when the exchange ends.
    stream: MuxStream | None = dataclasses.field(default=None, repr=False)

    def tap(self, stream: MuxStream, peer: str) -> MuxStream:
        """`stream`, with what it carries copied into this capture (a retry's new stream starts the bodies
        afresh). Typed as the stream it stands for: the tap forwards every call, duck-typed on purpose, so
        that the exchange code stays unaware of it."""
        assert self.inspector is not None
        self.inspector._release(self)
        self.request, self.response = Body(), Body()
        self.peer = peer
        self.stream = stream
        return cast(MuxStream, _Tap(self.inspector, self, stream))

    def finish(self, access: Access) -> None:
        assert self.inspector is not None
        self.inspector.finish(self, access)

    @property
    def replayable(self) -> bool:
        return self.side == "relay" and self.request.complete and not self.request_trailers

    def summary(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "time": self.started,
            "method": self.method,
            "path": self.target,
            "status": self.status,
            "duration_ms": self.duration_ms,
            "size": self.request.size + self.response.size,
            "request_id": self.request_id,
            "peer": self.peer,
            "replay_of": self.replay_of,
            "note": self.note,
        }

    def detail(self) -> dict[str, Any]:
        return {
            **self.summary(),
            "client": self.client,
            "replayable": self.replayable,
            "request": {
                "headers": _text_headers(self.request_headers),
                "body": _show(self.request, self.request_headers),
                "trailers": _text_headers(self.request_trailers),
            },
            "response": {
                "status": self.status,
                "reason": self.reason,
                "headers": _text_headers(self.response_headers),
                "body": _show(self.response, self.response_headers),
                "trailers": _text_headers(self.response_trailers),
            },
        }


class Inspector:
    def __init__(
        self, limit: int, *, max_body: int = DEFAULT_MAX_BODY, redactor: Redactor | None = None
    ) -> None:
        if limit < 1:
            raise ValueError("the inspector keeps at least one exchange")
        self.limit = limit
        self.max_body = max_body
        self.redactor = redactor or Redactor()
        self._captures: OrderedDict[int, Capture] = OrderedDict()
        self._ids = itertools.count(1)
        self._finished = 0  # captures finished so far
        self._in_flight_budget = limit * 2 * max_body
        self._in_flight_bytes = 0
        # Captures begun and not finished. An exchange that never finishes (its task cancelled on the way)
        # drops out of this set with its last reference, so the budget it used comes back (see _take).
        self._in_flight: weakref.WeakSet[Capture] = weakref.WeakSet()
        self._replays: OrderedDict[str, int] = OrderedDict()

    # -- recording ------------------------------------------------------------------------------------

    def begin(
        self,
        side: str,
        method: bytes,
        target: bytes,
        headers: Iterable[tuple[bytes, bytes]],
        *,
        request_id: str | None,
        client: str | None = None,
    ) -> Capture:
        redact = self.redactor
        replay_of = None if request_id is None else self._replays.pop(request_id, None)
        capture = Capture(
            id=next(self._ids),
            side=side,
            started=time.time(),
            peer="",
            client=client,
            method=method.decode("latin-1"),
            target=redact.target(target).decode("latin-1"),
            request_headers=redact.headers(headers),
            request_id=request_id,
            replay_of=replay_of,
            inspector=self,
        )
        self._in_flight.add(capture)
        return capture

    def _release(self, capture: Capture) -> None:
        for body in (capture.request, capture.response):
            self._in_flight_bytes -= body.captured

    def finish(self, capture: Capture, access: Access) -> None:
        """The exchange is over: redact its bodies and make it visible (evicting the oldest beyond N)."""
        self._release(capture)
        self._in_flight.discard(capture)
        capture.status = access.status
        capture.duration_ms = access.duration_ms
        capture.note = access.note
        if capture.request.size == 0:
            capture.request.size = access.bytes_in
        if capture.response.size == 0:
            capture.response.size = access.bytes_out
        redact = self.redactor
        if capture.stream is not None and capture.stream.trailers:
            received = redact.headers(capture.stream.trailers)
            if capture.side == "relay":
                capture.response_trailers = received
            else:
                capture.request_trailers = received
        capture.stream = None
        capture.request.data = bytearray(
            redact.body(bytes(capture.request.data), _content_type(capture.request_headers))
        )
        capture.response.data = bytearray(
            redact.body(bytes(capture.response.data), _content_type(capture.response_headers))
        )
        capture.done = True
        self._finished += 1
        capture.finished = self._finished
        self._captures[capture.id] = capture
        while len(self._captures) > self.limit:
            self._captures.popitem(last=False)

    def expect_replay(self, request_id: str, original: int) -> None:
        self._replays[request_id] = original
        while len(self._replays) > MAX_PENDING_REPLAYS:
            self._replays.popitem(last=False)

    def _take(self, body: Body, data: bytes | bytearray | memoryview) -> None:
        size = len(data)
        body.size += size
        room = self.max_body - body.captured
        if room <= 0 or body.dropped or not size:
            return
        if self._in_flight_bytes >= self._in_flight_budget:
            # Recount from the captures still alive: abandoned ones no longer hold any of the budget.
            self._in_flight_bytes = sum(c.request.captured + c.response.captured for c in self._in_flight)
            if self._in_flight_bytes >= self._in_flight_budget:
                body.dropped = True
                return
        piece = bytes(data[:room])
        body.data += piece
        body.captured += len(piece)
        self._in_flight_bytes += len(piece)

    # -- reading --------------------------------------------------------------------------------------

    def get(self, capture_id: int) -> Capture | None:
        return self._captures.get(capture_id)

    def since(self, finished: int) -> list[Capture]:
        """The captures that finished after the first `finished` did (see `newest`), in the order they did.

        By order of finishing, not by id: an exchange that began first (a long download) may end last, and
        it is news then. The walk stops at the first capture already seen, so a reader polling for news
        costs what is new, not N."""
        newer = []
        for capture in reversed(self._captures.values()):
            if capture.finished <= finished:
                break
            newer.append(capture)
        newer.reverse()
        return newer

    @property
    def newest(self) -> int:
        """How many captures have finished so far: what a reader passes to `since` to get what is new."""
        return self._finished

    def __len__(self) -> int:
        return len(self._captures)


class _Tap:
    """A stream stand-in that copies what passes: on the relay, what it sends is the request and what it
    receives the response; on the agent, the other way round."""

    def __init__(self, inspector: Inspector, capture: Capture, stream: MuxStream) -> None:
        self._inspector = inspector
        self._capture = capture
        self._stream = stream
        relay = capture.side == "relay"
        self._sent = capture.request if relay else capture.response
        self._received = capture.response if relay else capture.request

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    async def send_reply(
        self, head: ResponseHead, *, data: bytes | bytearray | memoryview = b"", end_stream: bool = False
    ) -> None:
        await self._stream.send_reply(head, data=data, end_stream=end_stream)
        if not head.is_interim:
            self._reply(head)
        if data:
            self._inspector._take(self._sent, data)

    async def send_data(self, data: bytes | bytearray | memoryview, *, end_stream: bool = False) -> None:
        await self._stream.send_data(data, end_stream=end_stream)
        self._inspector._take(self._sent, data)

    async def send_end(self) -> None:
        await self._stream.send_end()

    async def send_trailers(self, headers: Sequence[tuple[bytes, bytes]]) -> None:
        await self._stream.send_trailers(headers)
        trailers = self._inspector.redactor.headers(headers)
        if self._capture.side == "relay":
            self._capture.request_trailers = trailers
        else:
            self._capture.response_trailers = trailers

    async def receive_reply(self) -> ResponseHead:
        head = await self._stream.receive_reply()
        if not head.is_interim:
            self._reply(head)
        return head

    async def receive_data(self, max_bytes: int = 65536) -> bytes:
        data = await self._stream.receive_data(max_bytes)
        self._inspector._take(self._received, data)
        return data

    def receive_data_nowait(self, max_bytes: int = 65536) -> bytes | None:
        data = self._stream.receive_data_nowait(max_bytes)
        if data:
            self._inspector._take(self._received, data)
        return data

    # The trio face, which a protocol switch's pump uses (send_eof and aclose carry no bytes: forwarded).
    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)
        self._inspector._take(self._sent, data)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        data = await self._stream.receive_some(max_bytes)
        self._inspector._take(self._received, data)
        return data

    def _reply(self, head: ResponseHead) -> None:
        self._capture.reason = head.reason.decode("latin-1")
        self._capture.response_headers = self._inspector.redactor.headers(head.headers)


def _content_type(headers: Headers) -> bytes | None:
    return next((value for name, value in headers if name.lower() == b"content-type"), None)


def _text_headers(headers: Headers) -> list[list[str]]:
    return [[name.decode("latin-1"), value.decode("latin-1")] for name, value in headers]


def _show(body: Body, headers: Headers) -> dict[str, Any]:
    """How the page shows a captured body: JSON pretty-printed, text as text, anything else as hex."""
    data = bytes(body.data)
    shown: dict[str, Any] = {
        "size": body.size,
        "captured": body.captured,
        "truncated": not body.dropped and body.captured < body.size,
        "dropped": body.dropped,
        "content_type": (_content_type(headers) or b"").decode("latin-1"),
    }
    if not data:
        return {**shown, "kind": "empty", "text": ""}
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        # A body cut at the capture limit may end inside a character: that alone does not make it binary.
        if exc.start < len(data) - 3 or not shown["truncated"]:
            return {**shown, "kind": "binary", "text": hex_dump(data[:HEX_PREVIEW])}
        text = data[: exc.start].decode("utf-8")
    if not text.isprintable() and any(ch not in "\r\n\t" and not ch.isprintable() for ch in text):
        return {**shown, "kind": "binary", "text": hex_dump(data[:HEX_PREVIEW])}
    if text.lstrip()[:1] in ("{", "["):
        try:
            return {
                **shown,
                "kind": "json",
                "text": json.dumps(json.loads(text), indent=2, ensure_ascii=False),
            }
        except (ValueError, RecursionError):
            pass
    return {**shown, "kind": "text", "text": text}


def hex_dump(data: bytes) -> str:
    lines = []
    for offset in range(0, len(data), 16):
        row = data[offset : offset + 16]
        hexes = " ".join(f"{byte:02x}" for byte in row)
        printable = "".join(chr(byte) if 32 <= byte < 127 else "." for byte in row)
        lines.append(f"{offset:08x}  {hexes:<47}  {printable}")
    return "\n".join(lines)
