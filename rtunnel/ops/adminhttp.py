"""The admin endpoint's request and reply, as its handlers (admin.py, dashboard.py) see them."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable
from urllib.parse import parse_qs

from ..http.replies import TEXT_PLAIN

__all__ = ["AdminRequest", "Reply"]


@dataclasses.dataclass
class AdminRequest:
    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]  # names in lower case
    body: bytes
    client: str

    @property
    def path(self) -> str:
        return self.target.partition(b"?")[0].decode("latin-1")

    @property
    def query(self) -> dict[str, list[str]]:
        return parse_qs(self.target.partition(b"?")[2].decode("latin-1"))

    def header(self, name: bytes) -> bytes | None:
        return next((value for key, value in self.headers if key == name), None)


@dataclasses.dataclass
class Reply:
    status: int
    body: bytes = b""
    content_type: bytes = TEXT_PLAIN
    headers: list[tuple[bytes, bytes]] = dataclasses.field(default_factory=list)
    # An endless body (server-sent events): the chunks to send, until the client leaves.
    stream: Callable[[], AsyncIterator[bytes]] | None = None
