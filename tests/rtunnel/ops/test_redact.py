"""Redaction before capture (rtunnel.ops.redact), over generated header lists, query strings and JSON bodies.

Secret values carry a marker no other value can contain, so "no marker in the output" means "no secret
value survived", and everything else must come out byte for byte as it went in.
"""

from __future__ import annotations

import json
from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rtunnel.ops import redact
from rtunnel.ops.redact import REDACTED, Redactor

MARK = "S3CRT"
TUNNEL_TOKEN = b"tok-Zq9v1LmN0pQ2"

plain_words = st.text(alphabet="abcdefghijlmnoqruvwxyz-_", min_size=1, max_size=12).filter(
    lambda w: not any(word in w.lower() for word in ("token", "password", "secret", "key", "cookie"))
)
secret_values = st.text(alphabet="abcXYZ019 ._~", max_size=10).map(lambda s: MARK + s)
plain_values = st.text(alphabet="abcXYZ019 ._~/", max_size=20)


def _case(name: str) -> st.SearchStrategy[str]:
    return st.lists(st.booleans(), min_size=len(name), max_size=len(name)).map(
        lambda flags: "".join(c.upper() if f else c for c, f in zip(name, flags, strict=True))
    )


secret_header_names = st.one_of(
    st.sampled_from(["authorization", "proxy-authorization", "cookie", "set-cookie"]).flatmap(_case),
    st.tuples(plain_words, st.sampled_from(["token", "Key", "SECRET", "password"])).map(
        lambda t: f"x-{t[0]}-{t[1]}"
    ),
)


@given(
    st.lists(
        st.one_of(
            st.tuples(secret_header_names, secret_values).map(lambda t: (*t, True)),
            st.tuples(plain_words, plain_values).map(lambda t: (*t, False)),
        ),
        max_size=12,
    )
)
def test_secret_headers_are_redacted_and_the_rest_kept(headers: list[tuple[str, str, bool]]) -> None:
    raw = [(n.encode(), v.encode()) for n, v, _ in headers]
    out = Redactor().headers(raw)
    assert [n for n, _ in out] == [n for n, _ in raw]  # names and order as they came
    for (name, value, secret), (_, shown) in zip(headers, out, strict=True):
        if secret:
            assert shown == REDACTED.encode(), name
        else:
            assert shown == value.encode()
    assert MARK.encode() not in b"".join(v for _, v in out)


@given(
    st.lists(
        st.one_of(
            st.tuples(
                st.sampled_from(["token", "access_token", "Password", "apiKey", "client_secret"]),
                secret_values,
            ),
            st.tuples(plain_words, plain_values),
        ),
        max_size=8,
    ),
    st.sampled_from(["/", "/a/b", "/search"]),
)
def test_secret_query_parameters_are_redacted(params: list[tuple[str, str]], path: str) -> None:
    query = "&".join(f"{quote(n)}={quote(v)}" for n, v in params)
    target = f"{path}?{query}".encode() if params else path.encode()
    out = Redactor().target(target).decode()
    assert MARK not in out
    if not params:
        assert out == path
        return
    out_path, _, out_query = out.partition("?")
    assert out_path == path
    pairs = out_query.split("&")
    assert len(pairs) == len(params)
    for (name, value), pair in zip(params, pairs, strict=True):
        if value.startswith(MARK):
            assert pair == f"{quote(name)}={quote(REDACTED)}"
        else:
            assert pair == f"{quote(name)}={quote(value)}"  # byte for byte


json_leaves = st.one_of(st.integers(), st.booleans(), st.none(), plain_values)
json_docs = st.recursive(
    json_leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(plain_words, children, max_size=4),
        st.dictionaries(
            st.sampled_from(["password", "token", "db_secret", "api_key"]),
            st.one_of(secret_values, st.lists(secret_values, min_size=1, max_size=3)),
            min_size=1,
            max_size=2,
        ),
    ),
    max_leaves=20,
)


def _without_secrets(doc: object) -> object:
    redactor = Redactor()
    if isinstance(doc, dict):
        return {k: REDACTED if redactor.secret_name(k) else _without_secrets(v) for k, v in doc.items()}
    if isinstance(doc, list):
        return [_without_secrets(v) for v in doc]
    return doc


@given(json_docs)
def test_json_fields_are_redacted_whole_and_cut_short(doc: object) -> None:
    data = json.dumps(doc).encode()
    redactor = Redactor()
    out = redactor.body(data, b"application/json")
    assert MARK.encode() not in out
    assert json.loads(out) == _without_secrets(doc)
    # Cut at any point (the capture limit), no secret value may show either, not even in part.
    for cut in range(len(data)):
        partial = redactor.body(data[:cut], b"application/json")
        assert MARK.encode() not in partial, data[:cut]


@given(st.lists(st.tuples(plain_words, st.one_of(plain_values, secret_values)), max_size=6))
def test_form_bodies_are_redacted_by_field_name(fields: list[tuple[str, str]]) -> None:
    names = ["password" if v.startswith(MARK) else n for n, v in fields]
    body = "&".join(f"{n}={quote(v)}" for n, (_, v) in zip(names, fields, strict=True)).encode()
    out = Redactor().body(body, b"application/x-www-form-urlencoded; charset=utf-8")
    assert MARK.encode() not in out


@given(plain_values, plain_values)
def test_the_tunnel_token_is_redacted_wherever_it_appears(before: str, after: str) -> None:
    redactor = Redactor(secrets=[TUNNEL_TOKEN])
    value = before.encode() + TUNNEL_TOKEN + after.encode()
    assert TUNNEL_TOKEN not in redactor.headers([(b"x-note", value)])[0][1]
    assert TUNNEL_TOKEN not in redactor.target(b"/p/" + value.replace(b" ", b""))
    assert TUNNEL_TOKEN not in redactor.body(value, b"text/plain")
    assert TUNNEL_TOKEN not in redactor.body(b'{"note": "' + value + b'"}', b"application/json")


def test_the_word_list_is_configurable() -> None:
    redactor = Redactor(["ssn"])
    assert redactor.target(b"/?ssn=1&token=2") == b"/?ssn=%5Bredacted%5D&token=2"
    # The four credential headers are redacted whatever the list says.
    assert redactor.headers([(b"Cookie", b"a=b"), (b"X-Token", b"t")]) == [
        (b"Cookie", REDACTED.encode()),
        (b"X-Token", b"t"),
    ]


def test_a_json_body_without_secrets_is_kept_byte_for_byte() -> None:
    data = b'{ "a" : 1,\n "b": [true] }'
    assert Redactor().body(data, b"application/json") == data


def test_deeply_nested_json_cut_short_is_redacted_in_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    # Ten thousand nested objects cut at the capture limit (json.loads refuses them: not JSON, or too deep).
    # Only a secret member's value needs its end found; looking for every value's end walked the rest of the
    # body once per level, a minute of the relay's event loop for one 64 KiB body.
    calls = []
    value_end = redact._value_end

    def counting(data: bytes, start: int) -> int:
        calls.append(start)
        return value_end(data, start)

    monkeypatch.setattr(redact, "_value_end", counting)
    data = (b'{"a":' * 10_000 + b'{"password":"' + MARK.encode() + b'","b":{"c":1')[: 64 * 1024]
    out = Redactor().body(data, b"application/json")
    assert MARK.encode() not in out
    assert out.endswith(b'{"password":"[redacted]","b":{"c":1')
    assert len(calls) == 1
