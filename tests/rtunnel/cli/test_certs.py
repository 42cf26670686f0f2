"""`rtunnel cert` and `rtunnel token`: real certificates, checked by a real TLS handshake."""

from __future__ import annotations

import contextlib
import ipaddress
import ssl
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import trio
import trio.testing
from cryptography import x509

from rtunnel.cli.certs import make_relay_cert, new_token
from rtunnel.config import ConfigError, client_tls_context, server_tls_context

FILES = ("ca.pem", "ca-key.pem", "relay.pem", "relay-key.pem")


async def handshake(out: Path, ca: Path, server_name: str) -> None:
    """A TLS handshake between the relay's context (from the files) and the agent's (--ca); raises the
    agent's verification error if it refuses the relay."""
    server = server_tls_context(str(out / "relay.pem"), str(out / "relay-key.pem"))
    assert server is not None
    client = client_tls_context(str(ca), insecure=False)
    left, right = trio.testing.memory_stream_pair()
    server_side = trio.SSLStream(left, server, server_side=True)
    client_side = trio.SSLStream(right, client, server_hostname=server_name)
    refused: BaseException | None = None

    async def agent(nursery: trio.Nursery) -> None:
        nonlocal refused
        try:
            await client_side.do_handshake()
        except trio.BrokenResourceError as exc:
            refused = exc.__cause__
            nursery.cancel_scope.cancel()  # the relay's side would wait for a handshake that never ends

    async with trio.open_nursery() as nursery:
        nursery.start_soon(agent, nursery)
        with contextlib.suppress(trio.BrokenResourceError):
            await server_side.do_handshake()
    if refused is not None:
        raise refused


async def test_cert_makes_a_ca_and_a_relay_certificate_agents_can_verify(tmp_path: Path) -> None:
    out = tmp_path / "tls"
    lines = make_relay_cert(["relay.example.com", "localhost", "127.0.0.1"], out)
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    for name in FILES:
        mode = stat.S_IMODE((out / name).stat().st_mode)
        assert mode == (0o600 if name.endswith("-key.pem") else 0o644), (name, oct(mode))
    cert = x509.load_pem_x509_certificate((out / "relay.pem").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["relay.example.com", "localhost"]
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    for server_name in ("relay.example.com", "localhost", "127.0.0.1"):
        await handshake(out, out / "ca.pem", server_name)
    with pytest.raises(ssl.SSLCertVerificationError):
        await handshake(out, out / "ca.pem", "other.example.com")
    # The exact lines to run next.
    assert (
        f"  rtunnel serve --agents 0.0.0.0:8443 --tls-cert {out}/relay.pem --tls-key {out}/relay-key.pem"
        in lines
    )
    assert "  rtunnel dial wss://relay.example.com:8443 --ca ca.pem --upstream PORT" in lines
    assert lines[0].startswith("made a new private CA")


async def test_an_existing_ca_is_reused_for_the_next_certificate(tmp_path: Path) -> None:
    make_relay_cert(["localhost"], tmp_path)
    ca_before, relay_before = (tmp_path / "ca.pem").read_bytes(), (tmp_path / "relay.pem").read_bytes()
    lines = make_relay_cert(["relay2.example.com"], tmp_path)
    assert lines[0].startswith("reused the CA")
    assert (tmp_path / "ca.pem").read_bytes() == ca_before
    assert (tmp_path / "relay.pem").read_bytes() != relay_before
    await handshake(tmp_path, tmp_path / "ca.pem", "relay2.example.com")
    assert stat.S_IMODE((tmp_path / "relay-key.pem").stat().st_mode) == 0o600


def test_a_ca_whose_key_is_missing_or_foreign_is_refused(tmp_path: Path) -> None:
    make_relay_cert(["localhost"], tmp_path / "a")
    make_relay_cert(["localhost"], tmp_path / "b")
    (tmp_path / "a/ca-key.pem").write_bytes((tmp_path / "b/ca-key.pem").read_bytes())
    with pytest.raises(ConfigError, match="is not the key of"):
        make_relay_cert(["localhost"], tmp_path / "a")
    (tmp_path / "b/ca-key.pem").unlink()
    with pytest.raises(ConfigError, match=r"ca-key\.pem is missing"):
        make_relay_cert(["localhost"], tmp_path / "b")


@pytest.mark.parametrize("host", ["bad host", "relay..example.com", "-relay.example.com", "rélay.example"])
def test_a_bad_host_is_refused(tmp_path: Path, host: str) -> None:
    with pytest.raises(ConfigError, match="--host"):
        make_relay_cert([host], tmp_path)
    assert not (tmp_path / "relay.pem").exists()


def test_token_is_random_and_fits_a_header() -> None:
    tokens = {new_token() for _ in range(5)}
    assert len(tokens) == 5
    for token in tokens:
        assert len(token) >= 43 and token.isascii() and token.isprintable() and " " not in token


def test_cert_and_token_commands(tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "rtunnel", *args], capture_output=True, text=True, timeout=60, check=False
        )

    token = run("token")
    assert token.returncode == 0 and len(token.stdout.strip()) >= 43, token
    made = run("cert", "--host", "localhost", "--out", str(tmp_path))
    assert made.returncode == 0, made.stderr
    assert f"--tls-cert {tmp_path}/relay.pem" in made.stdout
    bad = run("cert", "--host", "no spaces", "--out", str(tmp_path))
    assert bad.returncode == 2 and bad.stderr.startswith("rtunnel cert: error: --host 'no spaces'"), bad
