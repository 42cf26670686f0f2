"""TLS on the agent link: the relay's server context has modern defaults (TLS 1.2+, forward-secret AEAD suites
only, no compression or renegotiation); the agent verifies the relay's certificate by default and says
clearly why it refuses one (here: a certificate for another name); --insecure exists only as an explicit
flag, and warns. (tests/e2e/test_tls.py covers the working case and an untrusted CA.)
"""

from __future__ import annotations

import contextlib
import re
import socket
import ssl
import threading
from pathlib import Path

import pytest
import trustme

from rtunnel.config import client_tls_context, server_tls_context

from .procs import http_client, run_agent, run_relay
from .upstream import Upstream

pytestmark = pytest.mark.e2e


def _write_cert(ca: trustme.CA, tmp_path: Path, *names: str) -> list[str]:
    issued = ca.issue_cert(*names)
    cert, key = tmp_path / "relay.pem", tmp_path / "relay-key.pem"
    issued.private_key_pem.write_to_path(key)
    for i, blob in enumerate(issued.cert_chain_pems):
        blob.write_to_path(cert, append=i > 0)
    return ["--tls-cert", str(cert), "--tls-key", str(key)]


def _handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> str:
    """TLS handshake over a socket pair; the negotiated version, or the client's error."""
    a, b = socket.socketpair()
    with a, b:

        def serve() -> None:
            with contextlib.suppress(ssl.SSLError, OSError):
                server.wrap_socket(a, server_side=True).close()

        thread = threading.Thread(target=serve)
        thread.start()
        try:
            with client.wrap_socket(b, server_hostname="127.0.0.1") as tls:
                return str(tls.version())
        except ssl.SSLError as exc:
            return f"refused: {exc.reason}"
        finally:
            thread.join(10)


def test_the_relay_server_context_has_modern_defaults(tmp_path: Path) -> None:
    ca = trustme.CA()
    args = _write_cert(ca, tmp_path, "127.0.0.1")
    server = server_tls_context(args[1], args[3])
    assert server is not None
    assert server.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert server.options & ssl.OP_NO_COMPRESSION
    assert server.options & ssl.OP_NO_RENEGOTIATION
    for cipher in server.get_ciphers():
        if cipher["protocol"] == "TLSv1.2":
            assert cipher["kea"] == "kx-ecdhe" and cipher["aead"], cipher["name"]

    def client(maximum: ssl.TLSVersion, ciphers: str | None = None) -> ssl.SSLContext:
        context = ssl.create_default_context()
        ca.configure_trust(context)
        context.maximum_version = maximum
        if ciphers:
            context.set_ciphers(ciphers)
        return context

    assert _handshake(server, client(ssl.TLSVersion.TLSv1_3)) == "TLSv1.3"
    assert _handshake(server, client(ssl.TLSVersion.TLSv1_2)) == "TLSv1.2"
    # A TLS 1.2 client offering only CBC suites (no AEAD) gets nothing.
    cbc_only = "ECDHE-ECDSA-AES128-SHA256:ECDHE-RSA-AES128-SHA256:ECDHE-ECDSA-AES256-SHA384"
    assert _handshake(server, client(ssl.TLSVersion.TLSv1_2, cbc_only)).startswith("refused")


def test_the_agent_verifies_by_default() -> None:
    context = client_tls_context(None, insecure=False)
    assert context.verify_mode is ssl.CERT_REQUIRED
    assert context.check_hostname
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2


async def test_a_certificate_for_another_name_is_refused_with_a_clear_error(
    upstream: Upstream, token: str, tmp_path: Path
) -> None:
    ca = trustme.CA()
    ca.cert_pem.write_to_path(tmp_path / "ca.pem")
    relay_args = [*_write_cert(ca, tmp_path, "relay.example"), "--agent-wait", "0.2"]
    async with run_relay(token, extra_args=relay_args) as relay:
        # The CA is trusted, but the certificate names relay.example, not the address the agent dials.
        async with run_agent(
            relay.agents_url,
            upstream.url,
            token=token,
            extra_args=["--ca", str(tmp_path / "ca.pem")],
            wait_connected=False,
        ) as agent:
            line = (await agent.wait_for_line(re.compile("certificate verify failed", re.IGNORECASE))).string
            assert re.search(r"(Hostname|IP address) mismatch", line) and "127.0.0.1" in line, line
            async with http_client(
                f"http://127.0.0.1:{relay.http_port}"
            ) as c:  # TLS is on the agent port only
                assert (await c.get("/x")).status_code == 503
            assert agent.count_lines("connected to") == 0
        # --insecure connects anyway, and says loudly what that means.
        async with run_agent(relay.agents_url, upstream.url, token=token, extra_args=["--insecure"]) as agent:
            assert agent.count_lines(re.compile(r"WARNING.*--insecure.*NOT verified")) == 1
            async with http_client(
                f"http://127.0.0.1:{relay.http_port}"
            ) as c:  # TLS is on the agent port only
                assert (await c.get("/insecure")).status_code == 200
    assert upstream.paths == ["/insecure"]
