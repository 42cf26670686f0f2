"""The inspector's store (rtunnel.inspector): how bodies are shown, and the budget of captures in progress."""

from __future__ import annotations

from rtunnel.inspector import Inspector, hex_dump


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
