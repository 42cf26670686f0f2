"""End to end: the agent link over wss:// (relay --tls-cert/--tls-key, agent --ca), certificates from trustme."""

from __future__ import annotations

import dataclasses
import hashlib
import re
from pathlib import Path

import pytest
import trustme

from .procs import http_client, run_agent, run_relay
from .upstream import Upstream, payload, payload_sha256

pytestmark = pytest.mark.e2e

MiB = 1024 * 1024


@dataclasses.dataclass
class TlsFiles:
    ca: Path  # the CA that signed the relay's certificate
    other_ca: Path  # a CA that did not
    cert: Path  # the relay's certificate chain
    key: Path

    def relay_args(self) -> list[str]:
        return ["--tls-cert", str(self.cert), "--tls-key", str(self.key)]


@pytest.fixture
def tls_files(tmp_path: Path) -> TlsFiles:
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    files = TlsFiles(
        tmp_path / "ca.pem", tmp_path / "other-ca.pem", tmp_path / "relay.pem", tmp_path / "key.pem"
    )
    ca.cert_pem.write_to_path(files.ca)
    trustme.CA().cert_pem.write_to_path(files.other_ca)
    server.private_key_pem.write_to_path(files.key)
    for i, blob in enumerate(server.cert_chain_pems):
        blob.write_to_path(files.cert, append=i > 0)
    return files


async def test_wss_needs_the_relays_ca(tls_files: TlsFiles, upstream: Upstream, token: str) -> None:
    async with run_relay(token, extra_args=[*tls_files.relay_args(), "--agent-wait", "0.2"]) as relay:
        assert relay.agents_url.startswith("wss://")
        assert relay.count_lines("(wss)") == 1
        http_url = f"http://127.0.0.1:{relay.http_port}"

        # No --ca: the system CAs do not know the test CA. --ca of another CA: the same refusal.
        for extra in ([], ["--ca", str(tls_files.other_ca)]):
            async with run_agent(
                relay.agents_url, upstream.url, token=token, extra_args=extra, wait_connected=False
            ) as agent:
                match = await agent.wait_for_line(re.compile(r"certificate", re.IGNORECASE))
                assert "verify failed" in match.string.lower(), match.string
                async with http_client(http_url) as c:
                    assert (await c.get("/echo")).status_code == 503
            assert agent.count_lines("connected to") == 0
            assert "Traceback" not in agent.log_text(), agent.log_text()
        assert relay.count_lines("agent connected") == 0
        assert upstream.paths == []

        # With the relay's CA: the tunnel works, bodies intact both ways.
        async with (
            run_agent(relay.agents_url, upstream.url, token=token, extra_args=["--ca", str(tls_files.ca)]),
            http_client(http_url) as c,
        ):
            digest = hashlib.sha256()
            async with c.stream("GET", f"/bytes/{MiB}") as r:
                assert r.status_code == 200
                async for chunk in r.aiter_bytes():
                    digest.update(chunk)
            assert digest.hexdigest() == payload_sha256(MiB)
            body = payload(MiB + 7)
            r = await c.post("/sha256", content=body)
            assert r.json() == {"sha256": hashlib.sha256(body).hexdigest(), "length": len(body)}
    assert "Traceback" not in relay.log_text()
