"""The plain-text responses rtunnel makes itself (a refusal, a 502 from the agent, the admin endpoint's
answers): their reason phrases and their body framing, the same from every part that sends one."""

from __future__ import annotations

import http
from typing import Final

from .proxyheaders import Header

__all__ = ["TEXT_PLAIN", "phrase", "plain_text"]

TEXT_PLAIN: Final = b"text/plain; charset=utf-8"
# RFC 9110's names where Python before 3.13 still has RFC 7231's ("Request-URI Too Long"): the same bytes on
# every Python.
_RENAMED: Final = {
    413: b"Content Too Large",
    414: b"URI Too Long",
    416: b"Range Not Satisfiable",
    422: b"Unprocessable Content",
}


def phrase(status: int) -> bytes:
    """The reason phrase for `status` (b"" for a status HTTP does not name)."""
    renamed = _RENAMED.get(status)
    if renamed is not None:
        return renamed
    try:
        return http.HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b""


def plain_text(text: str) -> tuple[bytes, list[Header]]:
    """A text/plain body and the headers that frame it (Content-Type, Content-Length)."""
    body = text.encode("utf-8", "backslashreplace")
    return body, [(b"Content-Type", TEXT_PLAIN), (b"Content-Length", str(len(body)).encode("ascii"))]
