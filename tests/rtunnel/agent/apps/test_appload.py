"""rtunnel.agent.apps.load: importing `--app MODULE:ATTR` and telling WSGI from ASGI as uvicorn does."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from starlette.applications import Starlette

from rtunnel.agent.apps.load import AppLoadError, detect_interface, load_app


async def asgi_function(scope: Any, receive: Any, send: Any) -> None: ...


def wsgi_function(environ: Any, start_response: Any) -> list[bytes]:
    return []


class AsgiObject:
    async def __call__(self, scope: Any, receive: Any, send: Any) -> None: ...


def test_detect_interface() -> None:
    assert detect_interface(Flask("x")) == "wsgi"
    assert detect_interface(Starlette()) == "asgi"
    assert detect_interface(asgi_function) == "asgi"
    assert detect_interface(functools.partial(asgi_function, {})) == "asgi"
    assert detect_interface(AsgiObject()) == "asgi"
    assert detect_interface(wsgi_function) == "wsgi"


def test_factory_app_dir_and_forced_interface(tmp_path: Path) -> None:
    (tmp_path / "apps13_factory_mod.py").write_text(
        "calls = []\n"
        "def create():\n"
        "    calls.append(1)\n"
        "    async def app(scope, receive, send): ...\n"
        "    return app\n"
        "def broken():\n"
        "    raise KeyError('no settings')\n"
    )
    loaded = load_app("apps13_factory_mod:create", app_dir=str(tmp_path), factory=True)
    assert loaded.interface == "asgi" and callable(loaded.app)
    forced = load_app("apps13_factory_mod:create", app_dir=str(tmp_path), factory=True, interface="wsgi")
    assert forced.interface == "wsgi"
    with pytest.raises(AppLoadError, match=r"--factory: calling broken\(\) failed: KeyError: 'no settings'"):
        load_app("apps13_factory_mod:broken", app_dir=str(tmp_path), factory=True)
    with pytest.raises(AppLoadError, match="--interface 'rsgi': one of auto, asgi, wsgi"):
        load_app("apps13_factory_mod:create", app_dir=str(tmp_path), interface="rsgi")
