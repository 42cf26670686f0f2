"""The deployment pieces: Dockerfile, systemd units, LICENSE, CHANGELOG, shell completion, set-up commands.

`hadolint` and `systemd-analyze` check the files when they are installed (.ci/run installs systemd-analyze;
in CI it must be there); the structural checks here run everywhere.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import rtunnel
from rtunnel.cli import commands as cli
from rtunnel.cli.parse import subparsers

ROOT = Path(__file__).resolve().parents[1]
UNITS = sorted((ROOT / "deploy/systemd").glob("*.service"))


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def test_dockerfile() -> None:
    hadolint = shutil.which("hadolint")
    if hadolint is not None:
        result = subprocess.run(
            [hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True, check=False
        )
        assert result.returncode == 0, result.stdout + result.stderr
    steps = dockerfile_instructions()
    kinds = [kind for kind, _ in steps]
    base = dict(steps)["FROM"]
    assert re.fullmatch(r"python:3\.(1[1-9])-slim(-\w+)?", base), base
    # Runs as a non-root user from the first instruction that runs the product on.
    users = [arg for kind, arg in steps if kind == "USER"]
    assert users and users[-1] not in ("root", "0"), users
    assert kinds.index("USER") > max(i for i, kind in enumerate(kinds) if kind == "RUN")
    health = dict(steps)["HEALTHCHECK"]
    assert "/healthz" in health
    port = re.search(r"127\.0\.0\.1:(\d+)/healthz", health)
    assert port is not None, health
    # The default command serves the admin endpoint the health check asks, with options the CLI knows.
    entrypoint = tomllib.loads(f"x = {dict(steps)['ENTRYPOINT']}")["x"]
    command = tomllib.loads(f"x = {dict(steps)['CMD']}")["x"]
    assert entrypoint == ["rtunnel"]
    args = cli.build_parser().parse_args(command)
    assert args.command == "serve" and args.admin.endswith(f":{port.group(1)}")
    assert "0.0.0.0" in args.http and "0.0.0.0" in args.agents  # reachable from outside the container


def unit_settings(path: Path) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


@pytest.mark.parametrize("unit", UNITS, ids=[u.name for u in UNITS])
def test_systemd_unit_is_hardened_and_runs_a_valid_command(unit: Path) -> None:
    settings = unit_settings(unit)
    for key, value in {
        "DynamicUser": "yes",
        "ProtectSystem": "strict",
        "NoNewPrivileges": "yes",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "Restart": "on-failure",
    }.items():
        assert settings.get(key) == [value], (unit.name, key, settings.get(key))
    assert settings["CapabilityBoundingSet"] == [""]
    # A configuration error is not retried: restarting cannot fix it.
    assert str(cli.EXIT_CONFIG) in settings["RestartPreventExitStatus"][0].split()
    [exec_start] = settings["ExecStart"]
    binary, *argv = shlex.split(exec_start.replace("%d", "/run/credentials/x"))
    assert binary.endswith("/rtunnel")
    command = unit.stem.removeprefix("rtunnel-")
    # The file (--config) supplies what dial requires; here, so that argparse checks the rest.
    required = ["wss://relay:8443", "--upstream", "5000"] if command == "dial" else []
    args = cli.build_parser().parse_args([*argv, *required])
    assert args.command == command
    assert args.token_file == "/run/credentials/x/token"
    credentials = {value.partition(":")[0] for value in settings["LoadCredential"]}
    assert "token" in credentials
    # TimeoutStopSec leaves room for the drain (--grace) before systemd sends SIGKILL.
    grace = next(
        a.default for a in subparsers(cli.build_parser())[args.command]._actions if a.dest == "grace"
    )
    assert int(settings["TimeoutStopSec"][0].removesuffix("s")) > grace


def test_systemd_units_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        assert not os.environ.get("CI"), "systemd-analyze must be installed in CI (.ci/run installs systemd)"
        pytest.skip("systemd-analyze is not installed")
    executable = Path(sys.executable).with_name("rtunnel")
    if not executable.exists():  # verify checks that ExecStart's program exists
        executable = tmp_path / "rtunnel"
        executable.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m rtunnel "$@"\n')
        executable.chmod(0o755)
    copies = []
    for unit in UNITS:
        copy = tmp_path / unit.name
        copy.write_text(unit.read_text().replace("/usr/local/bin/rtunnel", str(executable)))
        copies.append(str(copy))
    result = subprocess.run(
        [analyze, "verify", *copies], capture_output=True, text=True, timeout=60, check=False
    )
    # Unknown or misspelt keys are only warnings: any line about our units is a failure.
    ours = [line for line in (result.stdout + result.stderr).splitlines() if "rtunnel-" in line]
    assert result.returncode == 0 and not ours, result.stdout + result.stderr


def test_license_and_changelog() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["license"] == {"text": "MIT"}
    license_text = (ROOT / "LICENSE").read_text()
    assert license_text.startswith("MIT License") and "WITHOUT WARRANTY OF ANY KIND" in license_text
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert "## [Unreleased]" in changelog
    assert f"## [{rtunnel.__version__}]" in changelog


def test_set_up_commands_take_any_python3() -> None:
    readme = (ROOT / "README.md").read_text()
    for command in (
        "pip install -e . && .venv/bin/rtunnel demo",
        "pip install -e '.[test]' && .venv/bin/python",
    ):
        [line] = [line for line in readme.splitlines() if command in line]
        assert line.startswith("python3 -m venv .venv &&"), line
    ci = (ROOT / ".ci/run").read_text()
    assert "python3.11}" not in ci and "PYTHON=python3.11" not in ci
    assert "sys.version_info < (3, 11)" in ci  # any python3 that is new enough


def test_shell_completion_and_its_cost() -> None:
    def run(*code: str) -> str:
        return subprocess.run(
            [sys.executable, *code], capture_output=True, text=True, timeout=60, check=True, cwd=ROOT
        ).stdout

    script = run("-m", "rtunnel", "completion", "bash")
    assert "complete" in script and "rtunnel" in script
    for word in ("serve", "dial", "cert", "--upstream", "--tls-cert", "--log-level"):
        assert word in script, word
    assert "compdef" in run("-m", "rtunnel", "completion", "zsh")
    # Completion is generated on request only: other commands never import shtab (nor cryptography).
    loaded = run(
        "-c",
        "import sys, rtunnel.cli.commands; rtunnel.cli.commands.build_parser(); print(sorted(sys.modules))",
    )
    assert "'shtab'" not in loaded and "'cryptography'" not in loaded
