"""The routes bench/run.py measures, all ending at the same nginx (bench/nginx.conf), and how each is started.

- direct: nginx itself.
- ssh -R: `ssh -tt -R` to a private sshd (bench/sshd.conf, keys made for the run). The tty makes both ends set
  TCP_NODELAY; without it (`ssh -N`) Nagle's algorithm makes every latency figure worse, so -N is not measured.
- pproxy: pproxy 2.7.9 (pure-Python asyncio, raw TCP, no HTTP parsing) in backward mode: its agent end dials
  out to its public end and waits there for connections to carry. Installed by the benchmark into its own
  environment (a venv under ~/.cache/rtunnel-bench), never a project dependency.
- rtunnel: `rtunnel serve` + `rtunnel dial` over ws://, default options; "rtunnel wss" the same over wss://
  (a self-signed certificate made for the run, the agent given it with --ca); "rtunnel log off" with
  `--access-log off` (only when the checkout has that option); "rtunnel@REV" another checkout (--compare).
"""

from __future__ import annotations

import functools
import getpass
import io
import os
import re
import secrets
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from procs import BenchError, Processes, descendants, free_port, run, wait_port

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
LISTENING_RE = re.compile(r"listening http=(\S+):(\d+) agents=(\S+):(\d+)")
TOOLS = {
    "nginx": "nginx",
    "sshd": "openssh-server",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
    "wrk": "wrk",
    "curl": "curl",
    "openssl": "openssl",
}
SMALL_BODY = b"0123456789abcdef" * 6 + b"rtun\n"  # 101 bytes
PPROXY = "pproxy==2.7.9"
ROUTE_KEYS = ("direct", "ssh", "pproxy", "ws", "wss", "logoff")  # what --only chooses from
LOG_OFF_FIGURES = frozenset({"small", "c1", "16k"})  # a log line per exchange matters only there


@dataclass
class Route:
    """One way to reach nginx, and the processes whose CPU time it costs ("relay" end and "agent" end)."""

    name: str  # the column's label
    port: int
    cpu_roles: Callable[[], dict[str, list[int]]] = dict
    figures: frozenset[str] | None = None  # None: every figure

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def takes(self, figure: str) -> bool:
        return self.figures is None or figure in self.figures


@dataclass(frozen=True)
class Build:
    """An rtunnel to run: `python -m rtunnel` with `src` first on PYTHONPATH."""

    label: str
    src: Path
    python: str


@dataclass
class Setup:
    tmp: Path
    procs: Processes
    tools: dict[str, str]
    bulk_size: int
    nginx_port: int = 0
    routes: dict[str, Route] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # printed with the table: versions, rows skipped and why


def find_tools() -> dict[str, str]:
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    found = {name: shutil.which(name, path=search) for name in TOOLS}
    missing = sorted({TOOLS[name] for name, where in found.items() if where is None})
    if missing:
        raise BenchError(
            "missing tools; install them with:\n"
            f"    apt-get update && apt-get install -y --no-install-recommends {' '.join(missing)}"
        )
    return {name: where for name, where in found.items() if where is not None}


def fill_template(name: str, out: Path, **values: object) -> Path:
    text = (BENCH / name).read_text()
    for key, value in values.items():
        text = text.replace(f"@{key}@", str(value))
    out.write_text(text)
    return out


def start_nginx(s: Setup) -> None:
    www = s.tmp / "www"
    www.mkdir()
    (www / "small.txt").write_bytes(SMALL_BODY)
    block = os.urandom(1 << 20)
    (www / "16k.bin").write_bytes(block[: 16 * 1024])
    with open(www / "big.bin", "wb") as big:
        for _ in range(s.bulk_size >> 20):
            big.write(block)
    (www / "upload").write_bytes(b"")  # the static handler answers POST with 405 only for an existing file
    s.tmp.chmod(0o755)  # nginx workers run as an unprivileged user when the master is root
    s.nginx_port = free_port()
    conf = fill_template("nginx.conf", s.tmp / "nginx.conf", DIR=s.tmp, PORT=s.nginx_port)
    run([s.tools["nginx"], "-t", "-q", "-c", str(conf)], timeout=30)
    proc = s.procs.start("nginx", [s.tools["nginx"], "-c", str(conf)])
    wait_port(s.nginx_port, proc, "nginx")


def start_ssh(s: Setup) -> None:
    keygen = s.tools["ssh-keygen"]
    run([keygen, "-q", "-t", "ed25519", "-N", "", "-f", str(s.tmp / "ssh_host_ed25519_key")], timeout=30)
    run([keygen, "-q", "-t", "ed25519", "-N", "", "-f", str(s.tmp / "id_ed25519")], timeout=30)
    shutil.copy(s.tmp / "id_ed25519.pub", s.tmp / "authorized_keys")
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
    sshd_port = free_port()
    conf = fill_template("sshd.conf", s.tmp / "sshd_config", DIR=s.tmp, PORT=sshd_port)
    run([s.tools["sshd"], "-t", "-f", str(conf)], timeout=30)
    sshd = s.procs.start("sshd", [s.tools["sshd"], "-D", "-e", "-f", str(conf)])
    wait_port(sshd_port, sshd, "sshd")
    port = free_port()
    args = [
        s.tools["ssh"], "-F", "/dev/null", "-p", str(sshd_port), "-i", str(s.tmp / "id_ed25519"),
        "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
        "-o", "ExitOnForwardFailure=yes", "-o", "LogLevel=ERROR",
        "-R", f"127.0.0.1:{port}:127.0.0.1:{s.nginx_port}", "-tt", f"{getpass.getuser()}@127.0.0.1",
        "exec sleep 86400",
    ]  # fmt: skip
    client = s.procs.start("ssh", args, stdin=subprocess.PIPE)
    wait_port(port, client, "ssh -R")

    def roles() -> dict[str, list[int]]:  # sshd's per-connection processes carry the forwarded bytes
        return {"relay": descendants(sshd.pid), "agent": [client.pid]}

    s.routes["ssh -R"] = Route("ssh -R", port, roles)


def pproxy_python() -> tuple[str, str]:
    """The python of the benchmark's own venv with pproxy in it (made on first use), and pproxy's version."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rtunnel-bench" / "pproxy"
    python = cache / "bin" / "python"
    probe = [str(python), "-c", "import importlib.metadata as m; print(m.version('pproxy'))"]
    try:
        return str(python), run(probe, timeout=30).strip()
    except (BenchError, OSError):
        pass  # not made yet, or made by another Python: make it again
    shutil.rmtree(cache, ignore_errors=True)
    print(f"installing {PPROXY} into {cache} (once)", file=sys.stderr)
    run([sys.executable, "-m", "venv", str(cache)], timeout=300)
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    try:
        run([*pip, PPROXY], timeout=300)
    except BenchError:  # that version gone from the registry: the newest (the notes name its version)
        run([*pip, "pproxy"], timeout=300)
    return str(python), run(probe, timeout=30).strip()


def start_pproxy(s: Setup) -> None:
    python, version = pproxy_python()
    s.notes.append(f"pproxy {version} in backward mode, raw TCP (tunnel://), asyncio event loop")
    public, back, dead = free_port(), free_port(), free_port()
    launch = [python, str(BENCH / "pproxy_launch.py")]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # The public end (where clients connect, as rtunnel's relay) sends each connection over a backward link.
    # Its own tunnel{} target is a port nothing listens on: were it ever to connect directly instead (pproxy
    # falls back to that when no remote is usable), the check of the route would fail rather than measure a
    # one-hop proxy.
    relay = s.procs.start(
        "pproxy-relay",
        [
            *launch,
            "-l",
            f"tunnel{{127.0.0.1:{dead}}}://127.0.0.1:{public}",
            "-r",
            f"tunnel+in://127.0.0.1:{back}",
        ],
        env=env,
    )
    s.procs.wait_line("pproxy-relay", relay, rf":{back} backward by")
    # The agent end dials the public end, keeps one link waiting there, and connects each link to nginx.
    agent = s.procs.start(
        "pproxy-agent", [*launch, "-l", f"tunnel{{127.0.0.1:{s.nginx_port}}}+in://127.0.0.1:{back}"], env=env
    )
    s.procs.wait_line("pproxy-agent", agent, rf"Serving on 127.0.0.1:{back}")
    pids = {"relay": [relay.pid], "agent": [agent.pid]}
    s.routes["pproxy"] = Route("pproxy", public, lambda: pids)


def make_cert(s: Setup) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (its own CA: the agent gets it with --ca)."""
    cert, key = s.tmp / "relay-cert.pem", s.tmp / "relay-key.pem"
    if not cert.exists():
        run([
            s.tools["openssl"], "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
            "-keyout", str(key), "-out", str(cert),
        ], timeout=30)  # fmt: skip
    return cert, key


def resolve_build(spec: str, tmp: Path) -> Build:
    """--compare's argument: a source directory (with its own .venv, if it has one) or a git revision of this
    repository (exported into the temporary directory, run with this Python)."""
    where = Path(spec).expanduser()
    if where.is_dir():
        src = where.resolve()
        venv = src / ".venv" / "bin" / "python"
        return Build(f"rtunnel@{src.name}", src, str(venv) if venv.exists() else sys.executable)
    try:
        sha = run(
            ["git", "-C", str(ROOT), "rev-parse", "--verify", "--short", f"{spec}^{{commit}}"], timeout=30
        )
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", sha.strip()], capture_output=True, check=True
        )
    except (BenchError, subprocess.CalledProcessError) as exc:
        raise BenchError(f"--compare {spec}: neither a directory nor a revision of {ROOT}") from exc
    src = tmp / f"src-{sha.strip()}"
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(src, filter="data")
    return Build(f"rtunnel@{spec}", src, sys.executable)


@functools.cache
def _helps(build: Build) -> dict[tuple[str, ...], str]:
    """`rtunnel [serve|dial] --help` of a build (options differ between versions), once its import is checked.
    `python -m` puts its working directory first on sys.path, ahead of PYTHONPATH: each rtunnel runs in its
    build's directory, or the checkout the benchmark was started from would be measured instead."""
    env = dict(os.environ, PYTHONPATH=str(build.src))
    where = run([build.python, "-c", "import rtunnel; print(rtunnel.__file__)"], 30, env, build.src).strip()
    if not Path(where).resolve().is_relative_to(build.src):
        raise BenchError(f"{build.label}: {build.python} imports rtunnel from {where}, not from {build.src}")
    cmd = [build.python, "-m", "rtunnel"]
    return {sub: run([*cmd, *sub, "--help"], 30, env, build.src) for sub in ((), ("serve",), ("dial",))}


def start_rtunnel(
    s: Setup,
    build: Build,
    upstream_port: int,
    key: str,
    *,
    tls: bool = False,
    log_off: bool = False,
    streams: int = 0,
) -> tuple[Route, dict[str, int]] | None:
    """A relay and an agent in front of 127.0.0.1:upstream_port, default options except: the relay's
    per-address abuse limits are off (all the load comes from 127.0.0.1), the agent's response timeout is long
    (the scale test holds its exchanges), `streams` > 0 raises the agent's concurrent-stream limit to that.
    None if `log_off` and this build has no --access-log option."""
    env = dict(os.environ, PYTHONPATH=str(build.src), RTUNNEL_TOKEN=secrets.token_urlsafe(24))
    cmd = [build.python, "-m", "rtunnel"]
    helps = _helps(build)
    serve = ["serve", "--http", "127.0.0.1:0", "--agents", "127.0.0.1:0"]
    for option in ("--max-connections", "--max-connections-per-ip", "--max-exchanges-per-ip"):
        if f"{option} " in helps[("serve",)]:  # options differ between versions of rtunnel
            serve += [option, "0"]
    dial = ["--upstream", f"http://127.0.0.1:{upstream_port}", "--response-timeout", "300"]
    if streams and "--max-streams" in helps[("dial",)]:
        dial += ["--max-streams", str(streams)]
    scheme = "ws"
    if tls:
        cert, tls_key = make_cert(s)
        serve += ["--tls-cert", str(cert), "--tls-key", str(tls_key)]
        dial += ["--ca", str(cert)]
        scheme = "wss"
    before = {"serve": cmd, "dial": cmd}
    if log_off:
        if "--access-log" in helps[()]:
            before = {"serve": [*cmd, "--access-log", "off"], "dial": [*cmd, "--access-log", "off"]}
        elif "--access-log" in helps[("serve",)] and "--access-log" in helps[("dial",)]:
            serve += ["--access-log", "off"]
            dial += ["--access-log", "off"]
        else:
            return None
    relay = s.procs.start(f"{key}-relay", [*before["serve"], *serve], env=env, cwd=build.src)
    match = s.procs.wait_line(f"{key}-relay", relay, LISTENING_RE.pattern)
    http_port, agents_port = int(match.group(2)), int(match.group(4))
    agent = s.procs.start(
        f"{key}-agent",
        [*before["dial"], "dial", f"{scheme}://127.0.0.1:{agents_port}", *dial],
        env=env,
        cwd=build.src,
    )
    s.procs.wait_line(f"{key}-agent", agent, "connected to")
    s.procs.wait_line(f"{key}-relay", relay, "agent connected")
    pids = {"relay": relay.pid, "agent": agent.pid}
    return Route(build.label, http_port, lambda: {k: [v] for k, v in pids.items()}), pids


def describe(build: Build) -> str:
    """Which code a build runs: its directory and git revision (+ "-dirty" for uncommitted changes)."""
    try:
        rev = run(["git", "-C", str(build.src), "describe", "--always", "--dirty"], timeout=30).strip()
    except (BenchError, OSError):
        if build.src.name.startswith("src-"):  # resolve_build's export of a revision
            return f"{build.label}: revision {build.src.name[4:]} (git archive), {build.python}"
        rev = "not a git checkout"
    return f"{build.label}: {build.src} ({rev}), {build.python}"


def start_routes(s: Setup, build: Build, compare: list[Build], only: set[str]) -> None:
    """nginx, then every route `only` names (ROUTE_KEYS), then one rtunnel route per --compare build."""
    s.notes += [describe(b) for b in (build, *compare)]
    start_nginx(s)
    if "direct" in only:
        s.routes["direct"] = Route("direct", s.nginx_port)
    if "ssh" in only:
        start_ssh(s)
    if "pproxy" in only:
        try:
            start_pproxy(s)
        except BenchError as exc:  # e.g. no registry to install it from: the other routes are still worth it
            s.notes.append(f"pproxy: not measured: {exc}")
    variants = [("ws", build.label, {}), ("wss", f"{build.label} wss", {"tls": True})]
    variants.append(("logoff", f"{build.label} log off", {"log_off": True}))
    for key, label, options in variants:
        if key in only:
            started = start_rtunnel(s, build, s.nginx_port, key, **options)
            if started is None:
                s.notes.append(f"{label}: not measured, this checkout has no --access-log option")
                continue
            route = started[0]
            route.name = label
            route.figures = LOG_OFF_FIGURES if key == "logoff" else None
            s.routes[label] = route
    for n, other in enumerate(compare):
        started = start_rtunnel(s, other, s.nginx_port, f"compare{n}")
        assert started is not None
        s.routes[other.label] = started[0]


def check_routes(s: Setup) -> None:
    for route in s.routes.values():
        body = run(["curl", "-sf", "--max-time", "10", route.url("/small.txt")], timeout=20)
        if body.encode() != SMALL_BODY:
            raise BenchError(f"{route.name}: /small.txt came back wrong: {body[:200]!r}")
