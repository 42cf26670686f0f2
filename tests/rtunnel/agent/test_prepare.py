"""The agent's preparation of a request (rtunnel/agent/prepare.py), as pure functions of the head: the verdict,
the upstream headers and the body's framing, with no stream and no upstream."""

from __future__ import annotations

import h11
import pytest

from protocol import RequestHead
from rtunnel.agent.allowlist import Allowlist
from rtunnel.agent.prepare import Prepared, Refusal, prepare, upstream_request

OPEN = Allowlist()
HOST = b"upstream.test:8080"


def _prepared(method: bytes, headers: list[tuple[bytes, bytes]], allowlist: Allowlist = OPEN) -> Prepared:
    result = prepare(RequestHead(method, b"/a/../b?q=1", tuple(headers)), allowlist, HOST)
    assert isinstance(result, Prepared), result
    return result


def test_a_request_is_normalized_and_gets_the_upstream_host_if_it_has_none() -> None:
    prepared = _prepared(b"GET", [(b"Connection", b"x-hop"), (b"X-Hop", b"1"), (b"Accept", b"*/*")])
    assert (prepared.target, prepared.log_path) == (b"/b?q=1", "/b")
    assert prepared.headers == [(b"Host", HOST), (b"Accept", b"*/*")]
    assert (prepared.content_length, prepared.chunked, prepared.upgrade) == (None, False, False)


def test_a_denied_request_is_refused_with_the_path_it_was_checked_as() -> None:
    refused = prepare(RequestHead(b"POST", b"/x/%2e%2e/admin?secret=1"), Allowlist.parse(["GET /**"]), HOST)
    assert refused == Refusal(
        403, "rtunnel agent: POST /admin is not allowed here (no allow rule matches)\n", "denied", "/admin"
    )


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ([(b"Content-Length", b"3"), (b"Content-Length", b"4")], "conflicting Content-Length values"),
        ([(b"Content-Length", b"+3")], "invalid Content-Length"),
        ([(b"Host", b"a.test"), (b"host", b"b.test")], "more than one Host header"),
        ([(b"Host", b"127.0.0.1%2fadmin")], "invalid Host header"),
    ],
)
def test_header_rules_refuse_with_400(headers: list[tuple[bytes, bytes]], reason: str) -> None:
    refused = prepare(RequestHead(b"GET", b"/", tuple(headers)), OPEN, HOST)
    assert refused == Refusal(400, f"rtunnel agent: {reason}\n", "bad request", "/")


def test_override_headers_are_refused_only_behind_an_allowlist() -> None:
    head = RequestHead(b"GET", b"/", ((b"X_Original_URL", b"/admin"),))
    assert isinstance(prepare(head, OPEN, HOST), Prepared)
    refused = prepare(head, Allowlist.parse(["GET /"]), HOST)
    assert isinstance(refused, Refusal) and "X_Original_URL is not accepted" in refused.text


def test_transfer_encoding_drops_content_length_and_declares_a_body() -> None:
    prepared = _prepared(
        b"POST", [(b"Host", b"h"), (b"Transfer-Encoding", b"chunked"), (b"Content-Length", b"5")]
    )
    assert prepared.headers == [(b"Host", b"h")]
    assert (prepared.content_length, prepared.chunked) == (None, True)
    assert prepared.has_body(body_ended=False) is True


@pytest.mark.parametrize(
    ("headers", "ended", "has_body"),
    [
        ([(b"Content-Length", b"0")], False, False),
        ([(b"Content-Length", b"7")], False, True),
        ([], True, False),
        ([(b"Expect", b"100-continue")], False, True),
        ([], False, None),  # only the first chunk can tell
    ],
)
def test_whether_a_body_follows(
    headers: list[tuple[bytes, bytes]], ended: bool, has_body: bool | None
) -> None:
    assert _prepared(b"POST", headers).has_body(ended) is has_body


def test_a_protocol_switch_keeps_its_upgrade_and_never_has_a_body() -> None:
    prepared = _prepared(b"GET", [(b"Connection", b"Upgrade"), (b"Upgrade", b"websocket, h2c")])
    assert prepared.upgrade and prepared.has_body(body_ended=False) is False
    assert prepared.headers[-2:] == [(b"Upgrade", b"websocket"), (b"Connection", b"upgrade")]
    request = upstream_request(b"GET", prepared, has_body=False)
    assert isinstance(request, h11.Request) and b"content-length" not in dict(request.headers)


@pytest.mark.parametrize(
    ("method", "has_body", "added"),
    [
        (b"POST", True, (b"transfer-encoding", b"chunked")),
        (b"POST", False, (b"content-length", b"0")),
        (b"GET", False, None),
    ],
)
def test_the_upstream_request_frames_its_body(
    method: bytes, has_body: bool, added: tuple[bytes, bytes]
) -> None:
    prepared = _prepared(method, [(b"Host", b"h")])
    request = upstream_request(method, prepared, has_body)
    assert isinstance(request, h11.Request)
    assert list(request.headers)[1:] == ([added] if added else [])
    assert prepared.headers == [(b"Host", b"h")]  # the prepared request is left as it was


def test_a_head_h11_cannot_send_is_refused() -> None:
    prepared = _prepared(b"GET", [(b"Host", b"h"), (b"X-Bad", b"a\x00b")])
    refused = upstream_request(b"GET", prepared, has_body=False)
    assert isinstance(refused, Refusal) and refused.status == 400
    assert refused.text.startswith("rtunnel agent: invalid request head: ")
