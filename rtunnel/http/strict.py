"""Strict checks on a raw HTTP/1.1 request head, for what h11 0.16 accepts but a proxy must not.

h11 parses leniently where RFC 9112 allows a recipient to (see /work/shared/notes/libraries.md, section 3).
A proxy is different: whatever it accepts loosely, the next server may read another way, and that gap is
where request smuggling lives. The relay re-serializes every request (the upstream only ever sees the agent's
own framing of what the relay parsed), which already closes most of the gap; these checks close the rest by
refusing, with 400 and a closed connection, every head whose meaning is not unambiguous:

* obs-fold (a header line starting with a space or tab): RFC 9112 5.2 lets a proxy replace it with spaces,
  but other hops may join lines differently, and no modern client sends it;
* bare LF line endings and bare CR anywhere in the head (RFC 9112 2.2 allows either refusing or guessing);
* ``Transfer-Encoding`` whose final coding is not ``chunked``, or with ``chunked`` applied twice (400,
  RFC 9112 6.3), other codings (501), or any ``Transfer-Encoding`` on an HTTP/1.0 request (faulty framing);
* header names with ``_`` that read as a framing, routing or forwarding header once ``_`` becomes ``-``
  (CGI/WSGI-style servers map both spellings to one variable, so ``X_Forwarded_For`` could spoof the
  relay's own ``X-Forwarded-For``).

Conflicting ``Content-Length`` values and CL together with TE are refused elsewhere (h11 and
`relay.exchange.ClientConnection._check_request`).
"""

from __future__ import annotations

from typing import Final

import h11

__all__ = ["MAX_CHUNK_SIZE", "HeadChecker", "chunk_left"]

# The largest chunk-size accepted (as nginx: the largest file offset). h11 takes up to 20 hex digits (2^80),
# so a chunk "larger" than any body could be, e.g. ffffffffffffffff, would otherwise be streamed as one.
MAX_CHUNK_SIZE: Final = 2**63 - 1

# Names that, spelled with "_" instead of "-", must never reach the upstream.
_UNDERSCORE_SPOOFS: Final = frozenset(
    [
        b"content-length",
        b"transfer-encoding",
        b"host",
        b"connection",
        b"forwarded",
        b"via",
        b"x-forwarded-for",
        b"x-forwarded-host",
        b"x-forwarded-proto",
        b"x-forwarded-prefix",
        b"x-real-ip",
    ]
)


class HeadChecker:
    """Checks a request head as its bytes arrive; `problem` is (status, reason) once one is found.

    Incremental, so that a client trickling its head byte by byte costs one pass over it, not one per byte.
    Lines that are not complete yet are not judged; h11 parses the head after this check and refuses what is
    malformed in other ways. Bytes after the end of the head (a body, a pipelined request) are ignored.
    """

    def __init__(self) -> None:
        self.problem: tuple[int, str] | None = None
        self.complete = False
        self._buffer = bytearray()
        self._pos = 0  # start of the first line not judged yet
        self._search = 0  # where to look for its end (no newline before this)
        self._index = 0  # its line number (0: the request line)
        self._version = b""
        self._codings: list[bytes] | None = None  # None: no Transfer-Encoding seen

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self.complete or self.problem is not None:
            return
        self._buffer += data
        while self.problem is None and not self.complete:
            newline = self._buffer.find(b"\n", self._search)
            if newline == -1:
                self._search = len(self._buffer)
                return
            line = bytes(self._buffer[self._pos : newline])
            self._pos = self._search = newline + 1
            self.problem = self._line(line)
            self._index += 1
        self._buffer = bytearray()  # the head is judged: nothing more is needed

    def _line(self, line: bytes) -> tuple[int, str] | None:
        if not line.endswith(b"\r"):
            return 400, "bare LF line ending in the request head"
        line = line[:-1]
        if b"\r" in line:
            return 400, "bare CR in the request head"
        if self._index == 0:
            if not line:
                self.complete = True  # an empty line before the request line: h11 decides (it refuses it)
                return None
            self._version = line.rsplit(b" ", 1)[-1]
            return None
        if not line:
            self.complete = True
            return self._framing()
        if line[:1] in (b" ", b"\t"):
            return 400, "obsolete line folding (obs-fold) in a header"
        name, colon, value = line.partition(b":")
        lower = name.lower()
        if colon and b"_" in lower and lower.replace(b"_", b"-") in _UNDERSCORE_SPOOFS:
            imitated = lower.replace(b"_", b"-").decode()
            return 400, f"header name {name.decode('latin-1')!r} imitates {imitated}"
        if lower == b"transfer-encoding":
            self._codings = (self._codings or []) + [c.strip(b" \t").lower() for c in value.split(b",")]
        return None

    def _framing(self) -> tuple[int, str] | None:
        if self._codings is None:
            return None
        if self._version == b"HTTP/1.0":
            return 400, "Transfer-Encoding in an HTTP/1.0 request"
        codings = [c for c in self._codings if c]  # empty list elements are ignored (RFC 9110 5.6.1)
        if not codings or codings[-1] != b"chunked":
            return 400, "chunked is not the final transfer coding"
        if b"chunked" in codings[:-1]:
            return 400, "chunked transfer coding applied more than once"
        if len(codings) > 1:
            return 501, "transfer codings other than chunked are not supported"
        return None


def chunk_left(conn: h11.Connection) -> int:
    """Octets of the current chunk of a chunked body that the peer of `conn` has still to send, as its
    chunk-size line declared them (0 outside a chunk).

    h11 keeps the declared size to itself: this reads its chunked reader's count, which
    tests/rtunnel/relay/test_relay_limits.py checks against real chunk-size lines, so a change in h11 shows."""
    reader = getattr(conn, "_reader", None)
    left = getattr(reader, "_bytes_in_chunk", 0)
    return left if isinstance(left, int) else 0
