"""The framing rules both ends apply where h11 meets a tunnel stream (RFC 9112 6, RFC 9110 8.6).

Which methods carry content, when a response has no body, how one Content-Length is read from its headers and
dropped where Transfer-Encoding overrides it, and how a body handed to the stream ends: with its trailers if it
has any, else with END_STREAM (SPEC.md 5.3).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Final

from ..link.mux import MuxStream
from .proxyheaders import Header

__all__ = [
    "BODY_METHODS",
    "READ_SIZE",
    "bodiless",
    "end_body",
    "parse_content_length",
    "transfer_encoded",
    "without_content_length",
]

# One read from a socket or a tunnel stream: what a body loop moves at a time.
READ_SIZE: Final = 65536
# Methods that define a meaning for content: an empty body is sent as Content-Length: 0 (RFC 9110 8.6),
# since some servers answer 411 to a POST without any length.
BODY_METHODS: Final = frozenset([b"POST", b"PUT", b"PATCH"])


def bodiless(method: bytes, status: int) -> bool:
    """A response that has no body whatever its headers say (RFC 9112 6.3, rule 1)."""
    return method == b"HEAD" or status in (204, 304) or 100 <= status < 200


def transfer_encoded(headers: Iterable[Header]) -> bool:
    """A Transfer-Encoding header is present (names in any case)."""
    return any(name.lower() == b"transfer-encoding" for name, _ in headers)


def without_content_length(headers: Iterable[Header]) -> list[Header]:
    """`headers` without Content-Length: Transfer-Encoding overrides it (RFC 9112 6.3), so never forward both."""
    return [header for header in headers if header[0].lower() != b"content-length"]


def parse_content_length(values: Sequence[bytes]) -> int | str:
    """The length the Content-Length header values (one or more, each maybe a list) agree on, or why they do
    not give one (RFC 9112 6.3: a list of equal values is one length, anything else is invalid)."""
    items = {item.strip(b" \t") for value in values for item in value.split(b",")}
    if len(items) != 1:
        return "conflicting Content-Length values"
    (item,) = items
    if not item.isdigit() or len(item) > 18:
        return "invalid Content-Length"
    return int(item)


async def end_body(stream: MuxStream, trailers: list[Header]) -> None:
    """End our direction of `stream`: a TRAILERS frame if there are trailers, else END_STREAM."""
    if trailers:
        await stream.send_trailers(trailers)
    else:
        await stream.send_end()
