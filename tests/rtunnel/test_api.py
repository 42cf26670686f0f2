"""The library API's options as a trio program passes them: bad ones raise, never exit the program."""

from __future__ import annotations

from typing import Any

import pytest

import rtunnel
from rtunnel import ConfigError

from .app_rig import open_tunnel


async def test_no_relay_url_is_a_config_error_not_a_system_exit() -> None:
    # The command line's parser ended the whole embedding program (SystemExit 2, usage on stderr).
    with pytest.raises(ConfigError, match="at least one relay URL"):
        await rtunnel.dial([], upstream="http://127.0.0.1:1")
    with pytest.raises(ConfigError, match="has no scheme"):
        await rtunnel.dial(["-x"], upstream="http://127.0.0.1:1")


async def test_a_repeatable_option_given_one_string_takes_it_whole() -> None:
    # A string is a sequence too: allow="GET /ok" was the five rules "G", "E", "T", " ", "/"..., and
    # trusted_proxy="10.0.0.0/8" the networks "1", "0", "." (refused at the first one that is none).
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [])
        return [b"ok"]

    serve_options = {"trusted_proxy": "127.0.0.0/8"}
    async with open_tunnel(app, serve_options=serve_options, allow="GET /ok") as tunnel:
        assert (await tunnel.client.get("/ok")).status_code == 200
        assert (await tunnel.client.get("/other")).status_code == 403
