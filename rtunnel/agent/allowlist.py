"""The agent's request allowlist (`--allow "METHOD PATH"` rules) and its decisions.

Every request-target is normalized first (rtunnel.http.target) and the rules match the normalized path: the
agent forwards exactly the bytes the allowlist checked. Rule globs are normalized like a request path.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from ..http.target import DEFAULT_MAX_TARGET_LENGTH, TCHAR, TargetRefused, normalize_path, normalize_target

__all__ = ["AllowRule", "AllowRuleError", "Allowlist", "Decision"]


class AllowRuleError(ValueError):
    """A bad ``--allow`` rule; ``str(error)`` is a one-line message for the user."""


@dataclass(frozen=True, slots=True)
class AllowRule:
    """One compiled ``METHOD PATH`` rule. ``method`` None means any method (``*``)."""

    text: str
    method: bytes | None
    path: bytes  # the glob, normalized like a request path
    regex: re.Pattern[bytes]

    def matches(self, method: bytes, path: bytes) -> bool:
        if self.method is not None and method != self.method:
            return False
        return self.regex.fullmatch(path) is not None

    @classmethod
    def parse(cls, text: str) -> AllowRule:
        parts = text.split()
        if not parts:
            raise AllowRuleError("empty allow rule")
        if len(parts) != 2:
            raise AllowRuleError(f"allow rule {text!r} must be 'METHOD PATH', e.g. 'GET /api/**'")
        method_text, path_text = parts
        try:
            method_bytes = method_text.encode("ascii")
        except UnicodeEncodeError:
            method_bytes = b""
        if method_text == "*":
            method: bytes | None = None
        elif method_bytes and all(b in TCHAR for b in method_bytes):
            method = method_bytes
        else:
            raise AllowRuleError(f"allow rule {text!r}: {method_text!r} is not an HTTP method token")
        if not path_text.startswith("/"):
            raise AllowRuleError(f"allow rule {text!r}: path must start with '/'")
        if "?" in path_text:
            raise AllowRuleError(f"allow rule {text!r}: rules match the path only, not a query")
        # The glob is normalized like a request path so that a rule and a request that mean the same
        # path compare equal ('/%7euser' in either place becomes '/~user'); '*' is a raw path character.
        normalized = normalize_path(path_text.encode("utf-8"))
        if isinstance(normalized, TargetRefused):
            raise AllowRuleError(f"allow rule {text!r}: {normalized.reason}")
        return cls(text, method, normalized, _compile_glob(normalized))


def _compile_glob(glob: bytes) -> re.Pattern[bytes]:
    pieces: list[bytes] = []
    for i, chunk in enumerate(re.split(rb"(\*+)", glob)):
        if i % 2 == 0:
            pieces.append(re.escape(chunk))
        else:
            # "**" crosses segments; a lone "*" stays inside one. "***" is "**" then "*", i.e. ".*".
            pieces.append(b".*" * (len(chunk) // 2) + b"[^/]*" * (len(chunk) % 2))
    return re.compile(b"".join(pieces), re.DOTALL)


@dataclass(frozen=True, slots=True)
class Decision:
    """The allowlist's answer for one request.

    ``status`` is 200 when allowed, else 400 (malformed/ambiguous target or method), 403 (no rule matches)
    or 414 (target too long). ``target`` is the normalized target: what to forward when allowed, and what
    was matched (for logs) when denied with 403; None when the target could not be normalized.
    """

    allowed: bool
    status: int
    reason: str
    target: bytes | None = None
    rule: str | None = None  # text of the rule that allowed it


class Allowlist:
    """Ordered ``METHOD PATH`` rules; a request is allowed when any rule matches. No rules: allow all."""

    def __init__(
        self, rules: Sequence[AllowRule] = (), *, max_target_length: int = DEFAULT_MAX_TARGET_LENGTH
    ) -> None:
        self._rules = tuple(rules)
        self._max_target_length = max_target_length

    @classmethod
    def parse(cls, rules: Sequence[str], *, max_target_length: int = DEFAULT_MAX_TARGET_LENGTH) -> Allowlist:
        """Compile ``--allow`` rules; raises :class:`AllowRuleError` on the first bad one."""
        if isinstance(rules, str):  # a lone str is a Sequence[str] of characters: surely a mistake
            raise TypeError("Allowlist.parse wants a sequence of rules, not one string")
        return cls([AllowRule.parse(r) for r in rules], max_target_length=max_target_length)

    @property
    def rules(self) -> tuple[AllowRule, ...]:
        return self._rules

    @property
    def unrestricted(self) -> bool:
        return not self._rules

    def check(self, method: bytes, target: bytes) -> Decision:
        # Normalize even when unrestricted: the upstream must never see a raw dot-segment path.
        if not method or not all(b in TCHAR for b in method):
            return Decision(False, 400, "invalid method")
        normalized = normalize_target(target, max_length=self._max_target_length)
        if isinstance(normalized, TargetRefused):
            return Decision(False, normalized.status, normalized.reason)
        forward = normalized.target
        if self.unrestricted:
            return Decision(True, 200, "allowed (no allowlist)", forward)
        for rule in self._rules:
            if rule.matches(method, normalized.path):
                return Decision(True, 200, "allowed", forward, rule.text)
        return Decision(False, 403, "no allow rule matches", forward)
