"""Redaction of secrets from what the inspector captures (before it is stored, never on display).

Always redacted: the values of Authorization, Proxy-Authorization, Cookie and Set-Cookie, and every occurrence
of a known secret (the tunnel tokens, the admin token) anywhere in a head or a body. Redacted by name: headers,
query parameters, form fields and JSON fields whose name contains one of the configured words (by default
token, password, secret, key; case-insensitive), so `X-Api-Key`, `access_token` and `{"db_password": ...}`
are caught without listing every spelling. Redacting a field too many is the safe way to be wrong here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from typing import Any, Final
from urllib.parse import quote, unquote_plus

__all__ = ["DEFAULT_WORDS", "REDACTED", "Redactor"]

REDACTED: Final = "[redacted]"
DEFAULT_WORDS: Final = ("token", "password", "secret", "key")
ALWAYS_HEADERS: Final = frozenset({b"authorization", b"proxy-authorization", b"cookie", b"set-cookie"})
_REDACTED_BYTES: Final = REDACTED.encode()
# A JSON member's name and colon, for bodies that are not valid JSON (cut at the capture limit).
_JSON_NAME: Final = re.compile(rb'"((?:[^"\\]|\\.){0,256})"\s*:\s*')
_JSON_STRING_END: Final = re.compile(rb'(?:[^"\\]|\\.)*"')
_JSON_SCALAR: Final = re.compile(rb"[^\s,}\]]*")
_FORM_TYPES: Final = (b"application/x-www-form-urlencoded",)


class Redactor:
    def __init__(self, words: Sequence[str] = DEFAULT_WORDS, secrets: Iterable[bytes] = ()) -> None:
        self.words = tuple(word.lower() for word in words if word)
        # One search instead of a loop over the words: this runs for every header of every captured exchange.
        self._names = re.compile("|".join(map(re.escape, self.words)) or "(?!)", re.IGNORECASE)
        self._names_bytes = re.compile(self._names.pattern.encode("latin-1"), re.IGNORECASE)
        self._secrets: list[bytes] = []
        self.add_secrets(secrets)

    def add_secrets(self, secrets: Iterable[bytes]) -> None:
        """More known secrets (tokens a SIGHUP added): redacted from now on, with those known before."""
        # Longest first, so that a token containing another one is replaced whole.
        known = {*self._secrets, *(s for s in secrets if len(s) >= 4)}
        self._secrets = sorted(known, key=len, reverse=True)

    def secret_name(self, name: str | bytes) -> bool:
        if isinstance(name, bytes):
            return self._names_bytes.search(name) is not None
        return self._names.search(name) is not None

    def scrub(self, data: bytes) -> bytes:
        """Every known secret replaced, wherever it occurs."""
        if not data:
            return data
        for secret in self._secrets:
            if secret in data:
                data = data.replace(secret, _REDACTED_BYTES)
        return data

    def headers(self, headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        result = []
        for name, value in headers:
            if name.lower() in ALWAYS_HEADERS or self.secret_name(name):
                result.append((name, _REDACTED_BYTES))
            else:
                result.append((name, self.scrub(value)))
        return result

    def target(self, target: bytes) -> bytes:
        """The request target with secret-named query parameters' values replaced."""
        path, sep, query = target.partition(b"?")
        if not sep:
            return self.scrub(path)
        return self.scrub(path) + b"?" + self._pairs(query)

    def _pairs(self, query: bytes) -> bytes:
        """`a=1&b=2` with secret-named values replaced; everything else byte for byte as it was."""
        parts = []
        for pair in query.split(b"&"):
            name = pair.partition(b"=")[0]
            if self.secret_name(unquote_plus(name.decode("latin-1"))):
                pair = name + b"=" + quote(REDACTED).encode()
            parts.append(pair)
        return self.scrub(b"&".join(parts))

    def body(self, data: bytes, content_type: bytes | None) -> bytes:
        """A captured body (possibly cut short) with its secrets replaced: JSON fields and form fields by
        name, known secrets anywhere."""
        if not data:
            return data
        kind = (content_type or b"").split(b";")[0].strip().lower()
        if kind in _FORM_TYPES:
            return self._pairs(data)
        stripped = data.lstrip()
        if b"json" in kind or stripped[:1] in (b"{", b"["):
            return self.scrub(self._json(data))
        return self.scrub(data)

    def _json(self, data: bytes) -> bytes:
        try:
            document = json.loads(data)
            walked = self._walk(document)
        except (ValueError, RecursionError):
            # Not JSON after all, or cut at the capture limit: redact member by member in the text.
            return self._partial_json(data)
        if walked == document:
            return data  # nothing to redact: keep the bytes as they came
        return json.dumps(walked, ensure_ascii=False).encode()

    def _partial_json(self, data: bytes) -> bytes:
        """Each secret-named member's value (a string, a scalar, or a whole object or array, perhaps cut
        short) replaced by a redacted string."""
        out, done = bytearray(), 0
        position = 0
        while (match := _JSON_NAME.search(data, position)) is not None:
            position = start = match.end()
            # A secret's value is skipped whole; any other value is searched too (its members may be secret).
            # Only a secret's end is looked for: finding every value's end costs the depth times the length
            # (a minute of the event loop for 64 KiB of nested objects).
            if self.secret_name(match.group(1)):
                position = _value_end(data, start)
                out += data[done:start] + b'"' + _REDACTED_BYTES + b'"'
                done = position
        return bytes(out + data[done:])

    def _walk(self, value: Any) -> Any:
        if isinstance(value, dict):
            return {
                key: REDACTED if self.secret_name(key) else self._walk(item) for key, item in value.items()
            }
        if isinstance(value, list):
            return [self._walk(item) for item in value]
        return value


def _value_end(data: bytes, start: int) -> int:
    """Where the JSON value that starts at `start` ends (the end of `data` if it is cut short)."""
    first = data[start : start + 1]
    if first == b'"':
        match = _JSON_STRING_END.match(data, start + 1)
        return match.end() if match else len(data)
    if first not in (b"{", b"["):
        match = _JSON_SCALAR.match(data, start)
        return match.end() if match else start
    depth, index = 0, start
    while index < len(data):
        byte = data[index]
        if byte == 0x22:  # a string: skip it whole, brackets inside it do not count
            match = _JSON_STRING_END.match(data, index + 1)
            if match is None:
                return len(data)
            index = match.end()
            continue
        if byte in b"{[":
            depth += 1
        elif byte in b"}]":
            depth -= 1
            if depth == 0:
                return index + 1
        index += 1
    return len(data)
