"""The inspector's store (rtunnel.ops.inspector): how bodies are shown, and the budget of captures in progress."""

from __future__ import annotations

import json
from typing import Any, cast

import pytest
import trio
import trio.testing

from rtunnel.link.mux import MuxStream
from rtunnel.ops.adminauth import Principal
from rtunnel.ops.dashboard import Dashboard
from rtunnel.ops.inspector import Inspector, hex_dump
from rtunnel.ops.logs import Access
from rtunnel.ops.metrics import Metrics


def test_bodies_are_shown_as_json_text_or_hex() -> None:
    inspector = Inspector(4)
    capture = inspector.begin("relay", b"POST", b"/", [(b"Content-Type", b"image/png")], request_id=None)
    inspector._take(capture.request, b"\x89PNG\r\n\x1a\n\x00\x00")
    shown = capture.detail()["request"]["body"]
    assert shown["kind"] == "binary"
    assert shown["text"] == hex_dump(b"\x89PNG\r\n\x1a\n\x00\x00")
    assert shown["text"].startswith("00000000  89 50 4e 47 0d 0a 1a 0a 00 00")


def test_in_flight_captures_share_a_budget_that_abandoned_ones_give_back() -> None:
    inspector = Inspector(1, max_body=10)  # in flight: at most 1 x 2 x 10 bytes
    first = inspector.begin("relay", b"POST", b"/", [], request_id=None)
    inspector._take(first.request, b"a" * 10)
    inspector._take(first.response, b"b" * 15)
    assert (first.request.captured, first.response.captured, first.response.size) == (10, 10, 15)
    second = inspector.begin("relay", b"POST", b"/", [], request_id=None)
    inspector._take(second.request, b"c")
    assert second.request.dropped and second.request.size == 1 and not second.replayable
    del first  # its exchange was cancelled before it finished: nothing holds it any more
    third = inspector.begin("relay", b"POST", b"/", [], request_id=None)
    inspector._take(third.request, b"d" * 4)
    assert third.request.captured == 4 and not third.request.dropped


def _access(path: str) -> Access:
    return Access("GET", path, 200, 0, 0, 1.0, None)


async def test_an_exchange_that_ends_after_a_later_one_still_reaches_the_event_stream(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A long download begins first (id 1) and ends after a short request (id 2): news when it ends, although
    # its id is older than the newest row the page has already seen.
    inspector = Inspector(4)
    dashboard = Dashboard(Metrics("relay"), inspector=inspector)
    events = dashboard._events(Principal(None), login=False)
    long = inspector.begin("relay", b"GET", b"/long", [], request_id=None)
    short = inspector.begin("relay", b"GET", b"/short", [], request_id=None)
    assert b'"rows":[]' in await events.__anext__()  # the snapshot
    short.finish(_access("/short"))
    assert [row["path"] for row in _update(await events.__anext__())["rows"]] == ["/short"]
    long.finish(_access("/long"))
    assert [row["path"] for row in _update(await events.__anext__())["rows"]] == ["/long"]
    assert [c.id for c in inspector.since(0)] == [2, 1]  # the order they finished in
    assert inspector.since(inspector.newest) == []
    await events.aclose()


def _update(chunk: bytes) -> dict[str, Any]:
    name, data = chunk.decode().splitlines()[:2]
    assert name == "event: update"
    return cast(dict[str, Any], json.loads(data.removeprefix("data: ")))


class _Stream:
    """What a tap needs of a MuxStream to carry trailers: those it sends, and those it received."""

    def __init__(self) -> None:
        self.trailers: tuple[tuple[bytes, bytes], ...] | None = None
        self.sent: list[tuple[bytes, bytes]] = []

    async def send_trailers(self, headers: list[tuple[bytes, bytes]]) -> None:
        self.sent += headers


@pytest.mark.parametrize("side", ["relay", "agent"])
async def test_trailers_are_shown_with_the_message_they_end(side: str) -> None:
    # The relay sends the request's trailers and receives the response's; the agent the other way round.
    inspector = Inspector(4)
    capture = inspector.begin(side, b"POST", b"/", [], request_id=None)
    stream = _Stream()
    tap = capture.tap(cast(MuxStream, stream), "peer")
    sent, received = [(b"X-Sum", b"1"), (b"X-Token", b"t")], ((b"X-Done", b"2"),)
    await tap.send_trailers(sent)
    stream.trailers = received
    capture.finish(_access("/"))
    detail = capture.detail()
    mine, theirs = ("request", "response") if side == "relay" else ("response", "request")
    assert detail[mine]["trailers"] == [["X-Sum", "1"], ["X-Token", "[redacted]"]]
    assert detail[theirs]["trailers"] == [["X-Done", "2"]]
    assert stream.sent == sent
    assert not detail["replayable"]  # the relay's request had trailers; the agent never replays


class _RawStream:
    """What a tap needs of a MuxStream after a protocol switch: raw bytes each way."""

    def __init__(self, incoming: bytes) -> None:
        self.incoming = incoming
        self.sent = b""
        self.trailers = None

    async def send_all(self, data: bytes) -> None:
        self.sent += data

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        data, self.incoming = self.incoming, b""
        return data


@pytest.mark.parametrize("side", ["relay", "agent"])
async def test_a_switched_sessions_bytes_are_captured_both_ways(side: str) -> None:
    """The protocol switch's pump uses the stream's trio face (send_all, receive_some): the tap sees it."""
    inspector = Inspector(4)
    capture = inspector.begin(side, b"GET", b"/chat", [], request_id=None)
    stream = _RawStream(b"from the peer")
    tap = capture.tap(cast(MuxStream, stream), "peer")
    await tap.send_all(b"to the peer")
    assert await tap.receive_some() == b"from the peer"
    capture.finish(_access("/chat"))
    detail = capture.detail()
    mine, theirs = ("request", "response") if side == "relay" else ("response", "request")
    assert (detail[mine]["body"]["text"], detail[theirs]["body"]["text"]) == ("to the peer", "from the peer")
    assert stream.sent == b"to the peer"
