"""Tests for target normalization (rtunnel.http.target) and the allowlist (rtunnel.agent.allowlist): rule
parsing, decisions."""

from __future__ import annotations

import re

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from rtunnel.agent.allowlist import Allowlist, AllowRule, AllowRuleError, Decision
from rtunnel.http.target import DEFAULT_MAX_TARGET_LENGTH, NormalizedTarget, TargetRefused, normalize_target

# --- normalization: accepted targets -------------------------------------------------------------

NORMALIZED = [
    (b"/", b"/"),
    (b"/api/users", b"/api/users"),
    (b"/api/users/", b"/api/users/"),
    (b"/api/../admin", b"/admin"),
    (b"/api/%2e%2e/admin", b"/admin"),
    (b"/api/%2E./admin", b"/admin"),
    (b"/api/.%2e/admin", b"/admin"),
    (b"/api/%2E%2E/admin", b"/admin"),
    (b"/api/./x", b"/api/x"),
    (b"/api/%2e/x", b"/api/x"),
    (b"//admin", b"/admin"),
    (b"/api//..//admin", b"/admin"),
    (b"/a//b///c", b"/a/b/c"),
    (b"/a/b/..", b"/a/"),
    (b"/a/b/.", b"/a/b/"),
    (b"/a/..", b"/"),
    (b"/a/b/../../c", b"/c"),
    (b"/%7euser", b"/~user"),
    (b"/%7Euser", b"/~user"),
    (b"/%41", b"/A"),
    (b"/%2d%2E%5f%7E%30", b"/-._~0"),
    (b"/a%2Bb", b"/a%2Bb"),
    (b"/a%2bb", b"/a%2Bb"),
    (b"/a%3fb", b"/a%3Fb"),
    (b"/a%c3%a9", b"/a%C3%A9"),
    (b"/a%20b", b"/a%20b"),
    (b"/a%252e%252e/b", b"/a%252e%252e/b"),
    (b"/caf\xc3\xa9", b"/caf%C3%A9"),
    (b'/a|b{c}^`[d]<e>"', b"/a%7Cb%7Bc%7D%5E%60%5Bd%5D%3Ce%3E%22"),
    (b"/a;b=c/d:e@f!$&'()*+,", b"/a;b=c/d:e@f!$&'()*+,"),
    (b"/..x/x..", b"/..x/x.."),
    (b"/...", b"/..."),
    (b"/a?b=c", b"/a?b=c"),
    (b"/a?", b"/a?"),
    (b"/a?x=%0a&y=%2f&z=%zz", b"/a?x=%0a&y=%2f&z=%zz"),
    (b"/a/../b?q=/../c", b"/b?q=/../c"),
    (b"/a?b?c", b"/a?b?c"),
]


@pytest.mark.parametrize(("raw", "expected"), NORMALIZED)
def test_normalize_accepts(raw: bytes, expected: bytes) -> None:
    result = normalize_target(raw)
    assert isinstance(result, NormalizedTarget), result
    assert result.target == expected


def test_normalized_target_parts() -> None:
    assert normalize_target(b"/x/../a?q=1") == NormalizedTarget(b"/a", b"q=1")
    assert normalize_target(b"/a?") == NormalizedTarget(b"/a", b"")
    assert normalize_target(b"/a") == NormalizedTarget(b"/a", None)
    assert NormalizedTarget(b"/a", None).target == b"/a"


# --- normalization: refused targets --------------------------------------------------------------

REFUSED = [
    (b"", 400, "empty request-target"),
    (b"*", 400, "asterisk-form (OPTIONS *) is not forwarded"),
    (b"http://evil/admin", 400, "absolute-form request-target is not forwarded"),
    (b"HTTPS://evil:443/admin", 400, "absolute-form request-target is not forwarded"),
    (b"example.com:443", 400, "request-target is not in origin-form"),
    (b"admin", 400, "request-target is not in origin-form"),
    (b"/api/%2fadmin", 400, "encoded slash (%2F) in path"),
    (b"/api/%2Fadmin", 400, "encoded slash (%2F) in path"),
    (b"/api%5cadmin", 400, "encoded backslash (%5C) in path"),
    (b"/api%5Cadmin", 400, "encoded backslash (%5C) in path"),
    (b"/api\\..\\admin", 400, "backslash in path"),
    (b"/a%00b", 400, "encoded control character in path"),
    (b"/a%0ab", 400, "encoded control character in path"),
    (b"/a%0Db", 400, "encoded control character in path"),
    (b"/a%1fb", 400, "encoded control character in path"),
    (b"/a%7fb", 400, "encoded control character in path"),
    (b"/a\x00b", 400, "control character in path"),
    (b"/a\nb", 400, "control character in path"),
    (b"/a\tb", 400, "control character in path"),
    (b"/a\x7fb", 400, "control character in path"),
    (b"/a b", 400, "space in path"),
    (b"/a#frag", 400, "fragment (#) in request-target"),
    (b"/a?b#frag", 400, "fragment (#) in request-target"),
    (b"/a%zz", 400, "invalid percent-encoding in path"),
    (b"/a%4", 400, "invalid percent-encoding in path"),
    (b"/a%", 400, "invalid percent-encoding in path"),
    (b"/a%%41", 400, "invalid percent-encoding in path"),
    (b"/..", 400, "path climbs above the root"),
    (b"/../admin", 400, "path climbs above the root"),
    (b"/a/../../admin", 400, "path climbs above the root"),
    (b"/%2e%2e/admin", 400, "path climbs above the root"),
    (b"/api/..;/admin", 400, "dot segment with path parameters"),
    (b"/api/.;x/admin", 400, "dot segment with path parameters"),
    (b"/api/..%3b/admin", 400, "dot segment with path parameters"),
    (b"/api/%2e%2e;jsessionid=1/admin", 400, "dot segment with path parameters"),
    (b"/a?b\x00", 400, "control character in query"),
    (b"/a?b\r\nX: y", 400, "control character in query"),
    (b"/a?b c", 400, "space in query"),
]


@pytest.mark.parametrize(("raw", "status", "reason"), REFUSED)
def test_normalize_refuses(raw: bytes, status: int, reason: str) -> None:
    assert normalize_target(raw) == TargetRefused(status, reason)


def test_long_target_is_414() -> None:
    ten_kb = b"/" + b"a" * 10239
    assert normalize_target(ten_kb) == TargetRefused(414, "request-target longer than 8192 octets")
    exact = b"/" + b"a" * (DEFAULT_MAX_TARGET_LENGTH - 1)
    assert normalize_target(exact) == NormalizedTarget(exact)
    assert normalize_target(b"/abcd", max_length=4) == TargetRefused(
        414, "request-target longer than 4 octets"
    )


def test_growth_past_max_after_encoding_is_414() -> None:
    # 3 raw octets become 9: the normalized form must respect the limit too (keeps idempotence).
    assert normalize_target(b"/|||", max_length=6) == TargetRefused(
        414, "normalized request-target longer than 6 octets"
    )


# --- rule parsing ----------------------------------------------------------------------------------

BAD_RULES = [
    ("", "empty allow rule"),
    ("   ", "empty allow rule"),
    ("GET", "allow rule 'GET' must be 'METHOD PATH', e.g. 'GET /api/**'"),
    ("GET/api", "allow rule 'GET/api' must be 'METHOD PATH', e.g. 'GET /api/**'"),
    ("GET /a /b", "allow rule 'GET /a /b' must be 'METHOD PATH', e.g. 'GET /api/**'"),
    ("GET api/**", "allow rule 'GET api/**': path must start with '/'"),
    ("GET *", "allow rule 'GET *': path must start with '/'"),
    ("G(T /api", "allow rule 'G(T /api': 'G(T' is not an HTTP method token"),
    ("GÉT /api", "allow rule 'GÉT /api': 'GÉT' is not an HTTP method token"),
    ("GET /api?x=1", "allow rule 'GET /api?x=1': rules match the path only, not a query"),
    ("GET /api/%2f", "allow rule 'GET /api/%2f': encoded slash (%2F) in path"),
    ("GET /../x", "allow rule 'GET /../x': path climbs above the root"),
    ("GET /a\\b", "allow rule 'GET /a\\\\b': backslash in path"),
]


@pytest.mark.parametrize(("rule", "message"), BAD_RULES)
def test_bad_rules(rule: str, message: str) -> None:
    with pytest.raises(AllowRuleError) as info:
        Allowlist.parse([rule])
    assert str(info.value) == message
    assert "\n" not in str(info.value)


def test_bad_rule_among_good_ones() -> None:
    with pytest.raises(AllowRuleError, match=r"^allow rule 'GET x'"):
        Allowlist.parse(["GET /ok", "GET x"])


def test_parse_rejects_a_bare_string() -> None:
    with pytest.raises(TypeError):
        Allowlist.parse("GET /api/**")


def test_rule_fields() -> None:
    rule = AllowRule.parse("  POST   /v1/%7e/*/items ")
    assert rule.method == b"POST"
    assert rule.path == b"/v1/~/*/items"
    assert rule.text == "  POST   /v1/%7e/*/items "
    assert AllowRule.parse("* /health").method is None
    assert AllowRule.parse("GET /api/**").regex.pattern == rb"/api/.*"
    assert AllowRule.parse("GET /a/*.json").regex.pattern == rb"/a/[^/]*\.json"
    assert AllowRule.parse("GET /a/***").regex.pattern == rb"/a/.*[^/]*"
    assert AllowRule.parse("GET /café").path == b"/caf%C3%A9"


# --- decisions ---------------------------------------------------------------------------------------

RULES = ["GET /api/**", "* /health", "POST /v1/*/items", "GET /files/*.txt"]

DECISIONS = [
    # method, target, status, forwarded target
    (b"GET", b"/api/users", 200, b"/api/users"),
    (b"GET", b"/api/", 200, b"/api/"),
    (b"GET", b"/api/a/b/c?x=1", 200, b"/api/a/b/c?x=1"),
    (b"GET", b"/api", 403, b"/api"),
    (b"GET", b"/apix", 403, b"/apix"),
    (b"get", b"/api/users", 403, b"/api/users"),  # methods are case-sensitive
    (b"POST", b"/api/users", 403, b"/api/users"),
    (b"GET", b"/api/../admin", 403, b"/admin"),
    (b"GET", b"/api/%2e%2e/admin", 403, b"/admin"),
    (b"GET", b"/api/%2E./admin", 403, b"/admin"),
    (b"GET", b"/api/.%2e/admin", 403, b"/admin"),
    (b"GET", b"/api//..//admin", 403, b"/admin"),
    (b"GET", b"//api/x", 200, b"/api/x"),
    (b"GET", b"/x/../api/x", 200, b"/api/x"),
    (b"GET", b"/%61pi/x", 200, b"/api/x"),
    (b"GET", b"/api/%2fadmin", 400, None),
    (b"GET", b"/api%5cadmin", 400, None),
    (b"GET", b"/api\\..\\admin", 400, None),
    (b"GET", b"http://evil/api/x", 400, None),
    (b"OPTIONS", b"*", 400, None),
    (b"CONNECT", b"example.com:443", 400, None),
    (b"GET", b"/api/" + b"a" * 10240, 414, None),
    (b"DELETE", b"/health", 200, b"/health"),
    (b"whatever", b"/health", 200, b"/health"),
    (b"GET", b"/health/", 403, b"/health/"),
    (b"POST", b"/v1/abc/items", 200, b"/v1/abc/items"),
    (b"POST", b"/v1//items", 403, b"/v1/items"),  # "//" collapses before matching
    (b"POST", b"/v1/a/b/items", 403, b"/v1/a/b/items"),
    (b"POST", b"/v1/items", 403, b"/v1/items"),
    (b"GET", b"/files/a.txt", 200, b"/files/a.txt"),
    (b"GET", b"/files/.txt", 200, b"/files/.txt"),
    (b"GET", b"/files/a/b.txt", 403, b"/files/a/b.txt"),
    (b"GET", b"/files/aXtxt", 403, b"/files/aXtxt"),
    (b"GET", b"/files/a%2Etxt", 200, b"/files/a.txt"),
    (b"G T", b"/api/x", 400, None),
    (b"", b"/api/x", 400, None),
]


@pytest.mark.parametrize(("method", "target", "status", "forwarded"), DECISIONS)
def test_decisions(method: bytes, target: bytes, status: int, forwarded: bytes | None) -> None:
    decision = Allowlist.parse(RULES).check(method, target)
    assert decision.status == status
    assert decision.allowed is (status == 200)
    assert decision.target == forwarded


def test_decision_details() -> None:
    allow = Allowlist.parse(RULES)
    assert allow.check(b"GET", b"/api/x") == Decision(True, 200, "allowed", b"/api/x", "GET /api/**")
    assert allow.check(b"PUT", b"/health") == Decision(True, 200, "allowed", b"/health", "* /health")
    assert allow.check(b"GET", b"/admin") == Decision(False, 403, "no allow rule matches", b"/admin")
    assert allow.check(b"GET", b"/a%00") == Decision(False, 400, "encoded control character in path")
    assert allow.check(b"G T", b"/") == Decision(False, 400, "invalid method")
    assert not allow.unrestricted
    assert [r.text for r in allow.rules] == RULES


def test_unrestricted_still_normalizes() -> None:
    allow = Allowlist.parse([])
    assert allow.unrestricted
    assert allow.rules == ()
    assert allow.check(b"GET", b"/a/../b/%7e?q") == Decision(True, 200, "allowed (no allowlist)", b"/b/~?q")
    assert allow.check(b"GET", b"/../etc/passwd").status == 400
    assert allow.check(b"GET", b"/a%2fb").status == 400
    assert allow.check(b"OPTIONS", b"*").status == 400


def test_max_target_length_is_configurable() -> None:
    allow = Allowlist.parse([], max_target_length=16)
    assert allow.check(b"GET", b"/" + b"a" * 15).status == 200
    assert allow.check(b"GET", b"/" + b"a" * 16).status == 414


def test_rule_normalized_like_requests() -> None:
    allow = Allowlist.parse(["GET /%7euser/**", "GET /x/../y"])
    assert allow.check(b"GET", b"/~user/a").allowed
    assert allow.check(b"GET", b"/%7Euser/a").allowed
    assert allow.check(b"GET", b"/y").allowed
    assert not allow.check(b"GET", b"/x/../z").allowed


# --- properties --------------------------------------------------------------------------------------

# Bytes biased towards the interesting ones, so that dot segments and escapes actually occur.
_ALPHABET = [b"/", b".", b"%", b"2", b"e", b"E", b"f", b"F", b"a", b"5", b"c", b"?", b";", b"\\", b"0", b"~"]
_pieces = st.one_of(
    st.sampled_from(_ALPHABET),
    st.sampled_from([b"%2e", b"%2E", b"..", b"//", b"%2f", b"%41", b"%7e", b"%00", b"%3b", b"|", b"\xff"]),
    st.binary(min_size=1, max_size=3),
)
targets = st.one_of(
    st.binary(max_size=64),
    st.lists(_pieces, max_size=24).map(lambda parts: b"/" + b"".join(parts)),
)

_CONTROL_RE = re.compile(rb"[\x00-\x20\x7f]")


@given(targets)
@example(b"/a/..")
@example(b"/%2e%2E/")
@example(b"/a/%2e")
def test_normalizer_total_and_idempotent(target: bytes) -> None:
    result = normalize_target(target)
    if isinstance(result, TargetRefused):
        assert result.status in (400, 414)
        assert result.reason
        return
    assert isinstance(result, NormalizedTarget)
    out = result.target
    assert out.startswith(b"/")
    assert normalize_target(out) == result
    path = result.path
    assert b"//" not in path
    assert b"\\" not in path
    segments = path.split(b"/")[1:]
    assert b"." not in segments
    assert b".." not in segments
    assert _CONTROL_RE.search(out) is None
    assert re.search(rb"%(2f|5c|[01][0-9a-f]|7f)", path, re.IGNORECASE) is None
    # Every remaining escape is upper case and not an unreserved character.
    for escape in re.findall(rb"%(..)", path):
        assert escape == escape.upper()
        assert re.fullmatch(rb"[A-Za-z0-9\-._~]", bytes([int(escape, 16)])) is None


@given(st.binary(max_size=8), targets)
def test_allowed_under_api_rule_starts_with_api(method_suffix: bytes, target: bytes) -> None:
    allow = Allowlist.parse(["GET /api/**"])
    for method in (b"GET", b"GET" + method_suffix):
        for candidate in (target, b"/api/" + target.lstrip(b"/")):
            decision = allow.check(method, candidate)
            if decision.allowed:
                assert method == b"GET"
                assert decision.target is not None
                assert decision.target.startswith(b"/api/")
                assert normalize_target(decision.target) == normalize_target(candidate)
