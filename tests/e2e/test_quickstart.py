"""README's "Running it on two machines", run as written: its three shell blocks, in two directories standing
for the two machines, with `relay.example.com` as `localhost` and ports kept for the test instead of 8080,
8443 and 5000."""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest
import trio

from ..ports import reserved_port
from .procs import REPO_ROOT, Agent, Relay, http_client, run_process
from .test_docs_examples import shell_env
from .upstream import Upstream

pytestmark = pytest.mark.e2e


def quickstart_blocks() -> list[str]:
    readme = (REPO_ROOT / "README.md").read_text()
    start = readme.index("\n## Running it on two machines")
    section = readme[start : readme.index("\n## ", start + 1)]
    return re.findall(r"```sh\n(.*?)```", section, re.DOTALL)


def localize(block: str, ports: dict[str, int]) -> str:
    """The only changes: this machine's name and the test's ports instead of the README's fixed ones."""
    block = block.replace("relay.example.com", "localhost").replace("0.0.0.0:", "127.0.0.1:")
    block = block.replace(":8080", f":{ports['http']}").replace(":8443", f":{ports['agents']}")
    return block.replace("--upstream 5000", f"--upstream {ports['upstream']}")


def as_script(block: str, directory: Path) -> str:
    """Run the block in `directory`; its last command (the long-running one) replaces the shell, so that
    SIGTERM reaches rtunnel itself."""
    lines = [line for line in block.replace("\\\n", " ").splitlines() if line.strip()]
    *setup, last = lines
    return "\n".join(["set -eu", f"cd {shlex.quote(str(directory))}", *setup, f"exec {last}"])


async def test_two_machine_quickstart_as_written(tmp_path: Path, upstream: Upstream) -> None:
    relay_block, agent_block, client_block = quickstart_blocks()
    assert "rtunnel cert --host relay.example.com" in relay_block and "rtunnel token" in relay_block
    assert "--ca ca.pem" in agent_block and "--upstream 5000" in agent_block
    with reserved_port() as http, reserved_port() as agents:
        ports = {"http": http, "agents": agents, "upstream": upstream.port}
        env = shell_env(tmp_path)
        relay_dir, agent_dir = tmp_path / "relay-machine", tmp_path / "agent-machine"
        relay_dir.mkdir()
        agent_dir.mkdir()
        bash = shutil.which("bash") or "/bin/bash"

        relay_script = as_script(localize(relay_block, ports), relay_dir)
        async with run_process(Relay, "relay", [bash, "-c", relay_script], env=env) as relay:
            await relay.wait_listening()
            assert (relay_dir / "tls/relay.pem").exists() and (
                relay_dir / "token"
            ).stat().st_mode & 0o077 == 0
            hint = await relay.wait_for_line(re.compile(r"agents connect to (\S+), e\.g\.: (.*)"))
            assert hint.group(1) == f"wss://127.0.0.1:{ports['agents']}", hint.group(0)  # where it listens
            assert "--ca ca.pem" in hint.group(2)
            # "Copy tls/ca.pem and token to the machine next to the service."
            shutil.copy(relay_dir / "tls/ca.pem", agent_dir / "ca.pem")
            shutil.copy(relay_dir / "token", agent_dir / "token")
            agent_script = as_script(localize(agent_block, ports), agent_dir)
            async with run_process(Agent, "agent", [bash, "-c", agent_script], env=env) as agent:
                await agent.wait_connected()
                [client_command] = localize(client_block, ports).strip().splitlines()
                curl = shutil.which("curl")
                if curl is not None:
                    with trio.fail_after(30):
                        result = await trio.run_process(shlex.split(client_command), capture_stdout=True)
                    body = result.stdout.decode()
                else:  # the same request without curl
                    [url] = re.findall(r"http://\S+", client_command)
                    async with http_client() as client:
                        body = (await client.get(url)).text
                assert body == "/api/items"  # the upstream answers with the target it saw
                async with http_client(f"http://localhost:{ports['http']}") as client:
                    assert (await client.get("/not-allowed")).status_code == 403  # the --allow rules apply
        for proc in (relay, agent):
            assert "Traceback" not in proc.log_text()
