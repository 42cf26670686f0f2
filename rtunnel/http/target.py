"""The request-target normalizer: the one form of a request-target that the agent's allowlist checks and
forwards, and that the relay matches tunnel prefixes on.

The agent only ever forwards a request-target that went through :func:`normalize_target`, and it forwards
exactly the normalized bytes that the allowlist checked. An allowlist is only as strong as the agreement
between the path it matched and the path the upstream server acts on, so the normalizer refuses (400)
everything whose meaning differs between common servers instead of guessing one meaning:

* Only origin-form (``/path?query``) is accepted. ``*`` (``OPTIONS *``) addresses the server as a whole
  and has no path to check; absolute-form (``http://host/path``) carries a second authority that upstreams
  may route by instead of ``Host``; authority-form (``host:port``) is only for CONNECT, which v1 does not
  tunnel.
* An encoded slash (``%2F``/``%2f``) inside a segment is refused. Some upstream servers decode it into a
  separator and some keep it as data, so ``/api%2F..%2Fadmin`` is one segment to us and three to another
  server; an encoded slash is ambiguous across upstream servers, and refusing it is the only safe choice.
* Backslash, raw or as ``%5C``, is refused: some servers treat it as a separator.
* Control characters (0x00-0x1f, 0x7f), raw or percent-encoded, are refused in the path, as are invalid
  percent-encodings (``%zz``, a truncated ``%4``), raw spaces and ``#`` (a fragment never belongs on
  the wire).
* A segment whose name before a ``;`` is a dot segment (``..;x``) is refused: Tomcat and Jetty strip path
  parameters and would see ``..`` where we see a plain name.

What is rewritten rather than refused (each rewrite yields an equivalent URI per RFC 3986 section 6.2.2):

* percent-encoded unreserved characters (ALPHA DIGIT ``-._~``) are decoded; every other percent-encoding
  is kept, with its hex digits in upper case;
* raw octets that the path grammar does not allow (``"<>[]^`{|}`` and non-ASCII) are percent-encoded;
* dot segments are removed (RFC 3986 section 5.2.4) *after* unreserved characters are decoded, so ``%2e%2e``
  is ``..``; a ``..`` that would climb above the root is refused (400), not clamped;
* empty segments (``//``) are collapsed; a trailing ``/`` is kept.

The query is kept byte for byte; only raw control characters, spaces and ``#`` are refused there, because
percent-encoded control characters in a query are ordinary form data (``?text=a%0Ab``).
Double encoding (``%252e``) is kept as is: an upstream that decodes twice is broken on its own.
The result is idempotent: normalizing a normalized target gives it back unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

__all__ = [
    "DEFAULT_MAX_TARGET_LENGTH",
    "TCHAR",
    "NormalizedTarget",
    "TargetRefused",
    "normalize_path",
    "normalize_target",
]

DEFAULT_MAX_TARGET_LENGTH: Final = 8192

_ALPHA_DIGIT: Final = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
_UNRESERVED: Final = frozenset(_ALPHA_DIGIT + b"-._~")
# RFC 3986 pchar without pct-encoded, plus "/" (segment separator): kept raw.
_PATH_RAW_OK: Final = _UNRESERVED | frozenset(b"!$&'()*+,;=:@/")
# RFC 9110 tchar.
TCHAR: Final = frozenset(_ALPHA_DIGIT + b"!#$%&'*+-.^_`|~")
_HEX: Final = frozenset(b"0123456789abcdefABCDEF")
_CONTROL: Final = frozenset([*range(0x20), 0x7F])


@dataclass(frozen=True, slots=True)
class NormalizedTarget:
    """A request-target in origin-form after normalization. ``query`` is None when there was no ``?``."""

    path: bytes
    query: bytes | None = None

    @property
    def target(self) -> bytes:
        """The bytes to forward upstream: exactly what the allowlist checked."""
        if self.query is None:
            return self.path
        return self.path + b"?" + self.query


@dataclass(frozen=True, slots=True)
class TargetRefused:
    """Why a request-target cannot be forwarded, and the status to answer the client with (400 or 414)."""

    status: int
    reason: str


def normalize_target(
    target: bytes, *, max_length: int = DEFAULT_MAX_TARGET_LENGTH
) -> NormalizedTarget | TargetRefused:
    """Normalize a raw HTTP request-target; never raises for any ``bytes`` input.

    Targets longer than ``max_length`` octets, before or after normalization, are refused with 414.
    """
    if len(target) > max_length:
        return TargetRefused(414, f"request-target longer than {max_length} octets")
    if not target:
        return TargetRefused(400, "empty request-target")
    if target == b"*":
        return TargetRefused(400, "asterisk-form (OPTIONS *) is not forwarded")
    if target[:1] != b"/":
        if b"://" in target:
            return TargetRefused(400, "absolute-form request-target is not forwarded")
        return TargetRefused(400, "request-target is not in origin-form")

    raw_path, sep, raw_query = target.partition(b"?")
    path = normalize_path(raw_path)
    if isinstance(path, TargetRefused):
        return path
    query: bytes | None = None
    if sep:
        bad = _check_query(raw_query)
        if bad is not None:
            return bad
        query = raw_query
    result = NormalizedTarget(path, query)
    if len(result.target) > max_length:
        # Percent-encoding can grow a target; refusing here keeps normalization idempotent.
        return TargetRefused(414, f"normalized request-target longer than {max_length} octets")
    return result


def _check_query(query: bytes) -> TargetRefused | None:
    for byte in query:
        if byte in _CONTROL:
            return TargetRefused(400, "control character in query")
        if byte == 0x20:
            return TargetRefused(400, "space in query")
        if byte == 0x23:
            return TargetRefused(400, "fragment (#) in request-target")
    return None


def _decode_path(raw: bytes) -> bytearray | TargetRefused:
    """Decode unreserved percent-encodings, upper-case the rest, encode raw octets the grammar forbids."""
    out = bytearray()
    i, n = 0, len(raw)
    while i < n:
        byte = raw[i]
        if byte == 0x25:  # "%"
            hex_digits = raw[i + 1 : i + 3]
            if len(hex_digits) != 2 or not all(h in _HEX for h in hex_digits):
                return TargetRefused(400, "invalid percent-encoding in path")
            value = int(hex_digits, 16)
            if value in _UNRESERVED:
                out.append(value)
            elif value == 0x2F:
                return TargetRefused(400, "encoded slash (%2F) in path")
            elif value == 0x5C:
                return TargetRefused(400, "encoded backslash (%5C) in path")
            elif value in _CONTROL:
                return TargetRefused(400, "encoded control character in path")
            else:
                out += b"%" + hex_digits.upper()
            i += 3
            continue
        if byte in _PATH_RAW_OK:
            out.append(byte)
        elif byte in _CONTROL:
            return TargetRefused(400, "control character in path")
        elif byte == 0x5C:
            return TargetRefused(400, "backslash in path")
        elif byte == 0x20:
            return TargetRefused(400, "space in path")
        elif byte == 0x23:
            return TargetRefused(400, "fragment (#) in request-target")
        else:
            out += b"%%%02X" % byte
        i += 1
    return out


def _is_dot_segment_with_params(segment: bytes) -> bool:
    head = segment.split(b";", 1)[0].split(b"%3B", 1)[0]
    return head in (b".", b"..") and head != segment


def normalize_path(raw: bytes) -> bytes | TargetRefused:
    decoded = _decode_path(raw)
    if isinstance(decoded, TargetRefused):
        return decoded
    segments = bytes(decoded).split(b"/")[1:]  # the path starts with "/", so the first item is b""
    stack: list[bytes] = []
    for segment in segments:
        if segment in (b"", b"."):
            continue
        if segment == b"..":
            if not stack:
                return TargetRefused(400, "path climbs above the root")
            stack.pop()
            continue
        if _is_dot_segment_with_params(segment):
            return TargetRefused(400, "dot segment with path parameters")
        stack.append(segment)
    # RFC 3986 keeps the directory form when the last segment is empty or a dot segment ("/a/.." -> "/").
    trailing = bool(stack) and segments[-1] in (b"", b".", b"..")
    return b"/" + b"/".join(stack) + (b"/" if trailing else b"")
