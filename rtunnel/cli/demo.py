"""`rtunnel demo`: a relay, an agent and a small sample service on free localhost ports, all in one process,
a few requests sent through the tunnel, and the URL to try with curl. Runs until Ctrl-C."""

from __future__ import annotations

import json
import logging
import secrets
import urllib.error
import urllib.request
from functools import partial

import h11
import trio

from ..agent.allowlist import Allowlist
from ..agent.dialer import Agent, AgentConfig
from ..agent.exchange import ExchangeHandler
from ..relay.server import Relay, RelayConfig

log = logging.getLogger("rtunnel.demo")


async def _sample_service(stream: trio.SocketStream) -> None:
    """The 'service behind the tunnel': answers with what it received, so the tunnel's work is visible."""
    conn = h11.Connection(h11.SERVER)
    while True:
        request: h11.Request | None = None
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
            else:
                return
        assert request is not None
        payload = {
            "service": "hello from the service behind the tunnel",
            "method": request.method.decode(),
            "target": request.target.decode("ascii", "replace"),
            "headers": {k.decode(): v.decode("latin-1") for k, v in request.headers},
            "body_bytes": len(body),
        }
        out = (json.dumps(payload, indent=2) + "\n").encode()
        headers = [(b"Content-Type", b"application/json"), (b"Content-Length", str(len(out)).encode())]
        await stream.send_all(conn.send(h11.Response(status_code=200, headers=headers, reason=b"OK")) or b"")
        await stream.send_all(conn.send(h11.Data(data=out)) or b"")
        await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
        if conn.our_state is h11.MUST_CLOSE:
            return
        conn.start_next_cycle()


def _fetch(url: str, data: bytes | None = None, method: str = "GET") -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=data, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _summary(reply: bytes) -> str:
    try:
        seen = json.loads(reply)
    except ValueError:
        return reply.decode("utf-8", "replace").strip()
    headers = seen["headers"]
    return (
        f"{seen['service']!r}; the service saw {seen['method']} {seen['target']}, "
        f"{seen['body_bytes']} body bytes, X-Forwarded-For {headers.get('x-forwarded-for')}, "
        f"Via {headers.get('via')}"
    )


async def run_demo() -> None:
    async with trio.open_nursery() as nursery:
        service = await nursery.start(partial(trio.serve_tcp, _sample_service, 0, host="127.0.0.1"))
        service_port = service[0].socket.getsockname()[1]
        token = secrets.token_urlsafe(24)
        relay = Relay(RelayConfig(http_port=0, agents_port=0, tokens=(token.encode(),)))
        await nursery.start(relay.run)
        assert relay.http_address is not None and relay.agents_address is not None
        agents_url = "ws://{}:{}".format(*relay.agents_address)
        http_url = "http://{}:{}".format(*relay.http_address)
        allowlist = Allowlist.parse(["GET /**", "POST /echo"])
        handler = ExchangeHandler(f"http://127.0.0.1:{service_port}", allowlist)
        agent = Agent(AgentConfig(relay_urls=[agents_url], token=token), handler)
        nursery.start_soon(agent.run)
        nursery.start_soon(handler.run)

        print(
            f"\nsample service : http://127.0.0.1:{service_port}  (reachable only through the tunnel below)"
        )
        print(f"relay (clients): {http_url}")
        print(f"relay (agents) : {agents_url}   agent allowlist: GET /**, POST /echo\n")
        for method, path, body in (
            ("GET", "/hello", None),
            ("POST", "/echo", b"some request body"),
            ("DELETE", "/hello", None),
        ):
            status, reply = await trio.to_thread.run_sync(_fetch, http_url + path, body, method)
            print(f"{method:6} {path:8} -> {status}  {_summary(reply)}")
        print(f"\nTry it:  curl -i {http_url}/hello\nCtrl-C to stop.")
        await trio.sleep_forever()
