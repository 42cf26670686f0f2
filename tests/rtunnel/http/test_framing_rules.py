"""The HTTP rules both ends share (rtunnel/http/bridge.py, replay.py, replies.py)."""

from __future__ import annotations

import pytest

from rtunnel.http.bridge import bodiless, parse_content_length, transfer_encoded, without_content_length
from rtunnel.http.replay import REPLAY_LIMIT, ReplayBuffer
from rtunnel.http.replies import phrase, plain_text


@pytest.mark.parametrize(
    ("values", "parsed"),
    [
        ([b"5"], 5),
        ([b"5, 5", b" 5 "], 5),
        ([b"0"], 0),
        ([b"5", b"6"], "conflicting Content-Length values"),
        ([b"5,"], "conflicting Content-Length values"),
        ([b"-1"], "invalid Content-Length"),
        ([b"1" * 19], "invalid Content-Length"),
        ([b"0x10"], "invalid Content-Length"),
    ],
)
def test_one_content_length_or_why_not(values: list[bytes], parsed: int | str) -> None:
    assert parse_content_length(values) == parsed


def test_transfer_encoding_overrides_content_length_in_any_case() -> None:
    headers = [(b"Content-length", b"3"), (b"TRANSFER-ENCODING", b"chunked"), (b"X", b"y")]
    assert transfer_encoded(headers) and not transfer_encoded(headers[::2])
    assert without_content_length(headers) == headers[1:]


@pytest.mark.parametrize(
    ("method", "status", "none"),
    [
        (b"HEAD", 200, True),
        (b"GET", 204, True),
        (b"GET", 304, True),
        (b"GET", 103, True),
        (b"GET", 200, False),
    ],
)
def test_responses_without_a_body(method: bytes, status: int, none: bool) -> None:
    assert bodiless(method, status) is none


def test_a_replay_buffer_holds_up_to_its_limit_then_nothing() -> None:
    replay = ReplayBuffer()
    replay.hold(b"a" * (REPLAY_LIMIT - 1))
    replay.hold(b"b")
    assert (replay.chunks, replay.size, replay.overflow) == (
        [b"a" * (REPLAY_LIMIT - 1), b"b"],
        REPLAY_LIMIT,
        False,
    )
    replay.hold(b"c")
    assert (replay.chunks, replay.size, replay.overflow) == ([], 0, True)
    replay.hold(b"d")  # nothing is held once it overflowed, even what would fit
    assert replay.chunks == []


def test_plain_text_replies_have_the_same_phrases_on_every_python() -> None:
    assert [phrase(s) for s in (200, 414, 413, 502, 599)] == [
        b"OK",
        b"URI Too Long",
        b"Content Too Large",
        b"Bad Gateway",
        b"",
    ]
    body, headers = plain_text("caf\u00e9 \udcff\n")
    assert body == b"caf\xc3\xa9 \\udcff\n"
    assert headers == [(b"Content-Type", b"text/plain; charset=utf-8"), (b"Content-Length", b"13")]
