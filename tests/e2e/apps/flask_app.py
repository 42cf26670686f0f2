"""A Flask (WSGI) app for tests/e2e/test_apps.py, run by `rtunnel dial --app flask_app:app`."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterator

from flask import Flask, Response, request

log = logging.getLogger("testapp")
app = Flask(__name__)
NOT_AN_APP = 42  # for the error message of an --app that is neither WSGI nor ASGI

BLOCK = bytes(range(256)) * 256  # 64 KiB


@app.get("/hello")
def hello() -> dict[str, object]:
    return {"hello": "flask", "remote": request.remote_addr, "scheme": request.scheme, "host": request.host}


@app.post("/sha")
def sha() -> dict[str, object]:
    digest = hashlib.sha256()
    size = 0
    while chunk := request.stream.read(65536):  # streamed: the upload is never held whole
        digest.update(chunk)
        size += len(chunk)
    return {"sha256": digest.hexdigest(), "size": size}


@app.get("/bytes/<int:blocks>")
def blocks(blocks: int) -> Response:
    def generate() -> Iterator[bytes]:
        for _ in range(blocks):
            yield BLOCK

    return Response(generate(), mimetype="application/octet-stream")


@app.get("/forever")
def forever() -> Response:
    class Endless:
        def __iter__(self) -> Iterator[bytes]:
            while True:
                yield BLOCK

        def close(self) -> None:
            log.warning("testapp: iterable closed")

    return Response(Endless(), mimetype="application/octet-stream")


@app.get("/raise")
def boom() -> str:
    raise ZeroDivisionError("testapp boom")


@app.get("/hang")
def hang() -> str:
    time.sleep(3)
    return "late"


@app.get("/admin")
def admin() -> str:
    log.warning("testapp: admin reached")
    return "secret"
