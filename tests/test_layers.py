"""The allowed import directions between protocol/ and rtunnel's subpackages, checked on the source with `ast`.

Each layer may import itself and the layers listed for it, nothing else of rtunnel (imports under
TYPE_CHECKING and inside functions count too: they are dependencies all the same). Every layer of rtunnel may
import protocol's public names (never its modules). From the bottom up:

    protocol             the sans-IO core: the standard library only
    rtunnel.config       settings from text, and rtunnel.startup, start-up failures: leaves both programs share
    rtunnel.net          TCP-level plumbing: PROXY header, peer address, per-address limits, fast writes
    rtunnel.link         WebSocket handshakes, the established link, the multiplexer: net; never HTTP (h11)
    rtunnel.http         HTTP/1.1 rules both ends share: the multiplexer's streams (link.mux), never WebSocket
    rtunnel.ops          logs, metrics, admin, inspector: http, link and net below it, never relay or agent
    rtunnel.relay        `serve`: http, link, net, ops; never the agent
    rtunnel.agent        `dial`: http, link, net, ops; never the relay (agent.apps builds on agent)
    rtunnel.conformance  the protocol test peers: link and config only (they must not share our ends' code)
    rtunnel.cli          the command line: anything; imported only by rtunnel.api and rtunnel.__main__
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

VERSION = "rtunnel.__version__"  # the one name of the package itself a layer may import
LEAVES = ("rtunnel.config", "rtunnel.startup")
ENDS = ("rtunnel.net", "rtunnel.link", "rtunnel.http", "rtunnel.ops", *LEAVES)

# layer -> what of rtunnel it may import besides itself (a name allows that module and everything under it)
ALLOWED: dict[str, tuple[str, ...]] = {
    "rtunnel.config": (),
    "rtunnel.startup": (),
    "rtunnel.net": (),
    "rtunnel.link": ("rtunnel.net",),
    "rtunnel.http": ("rtunnel.link.mux",),
    "rtunnel.ops": (VERSION, "rtunnel.net", "rtunnel.link", "rtunnel.http", *LEAVES),
    "rtunnel.relay": ENDS,
    "rtunnel.agent": ENDS,
    "rtunnel.agent.apps": ("rtunnel.agent", *ENDS),
    "rtunnel.conformance": ("rtunnel.link", "rtunnel.config"),
    "rtunnel.cli": (VERSION, "rtunnel.relay", "rtunnel.agent", "rtunnel.agent.apps", *ENDS),
    "rtunnel.api": ("rtunnel.cli", "rtunnel.config"),
    "rtunnel.__main__": ("rtunnel.cli",),
    "rtunnel": ("rtunnel.api",),  # rtunnel/__init__.py: the public names
}
# libraries a layer must not import: the link knows no HTTP, nothing but the link (and the ASGI WebSocket
# bridge of agent.apps) speaks WebSocket
FORBIDDEN_LIBRARIES: dict[str, tuple[str, ...]] = {
    "rtunnel.net": ("h11", "websockets"),
    "rtunnel.link": ("h11",),
    "rtunnel.http": ("websockets",),
    "rtunnel.ops": ("websockets",),
    "rtunnel.relay": ("websockets",),
    "rtunnel.agent": ("websockets",),
    "rtunnel.config": ("h11", "websockets"),
    "rtunnel.startup": ("h11", "websockets"),
}


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def layer_of(module: str) -> str | None:
    """The layer a module belongs to: the longest layer name it is in (None: not in the table)."""
    if module == "rtunnel":
        return "rtunnel"
    found = [layer for layer in ALLOWED if layer != "rtunnel" and _under(module, layer)]
    return max(found, key=len, default=None)


def _is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def module_name(relpath: str) -> str:
    parts = relpath.removesuffix(".py").split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(relpath: str, source: str) -> list[tuple[int, str]]:
    """(line, module) for every import in a file. `from P import a` names P.a if that is a module (or
    rtunnel.__version__), else P: what the importing code depends on."""
    package = relpath.split("/")[:-1]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source, relpath)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            for alias in node.names:
                name = f"{module}.{alias.name}"
                found.append((node.lineno, name if _is_module(name) or name == VERSION else module))
    return found


def violations(relpath: str, source: str) -> list[str]:
    """What is wrong with one file's imports (path relative to the repository), one line per import."""
    module = module_name(relpath)
    imports = imports_of(relpath, source)
    if module.split(".")[0] == "protocol":
        return [
            f"{relpath}:{line}: protocol/ imports {name}, which is neither the standard library nor protocol/"
            for line, name in imports
            if name.split(".")[0] not in (*sys.stdlib_module_names, "protocol")
        ]
    layer = layer_of(module)
    if layer is None:
        return [f"{relpath}: {module} is in no layer: add it to ALLOWED in tests/test_layers.py"]
    problems: list[str] = []
    for line, name in imports:
        top = name.split(".")[0]
        if top == "protocol" and name != "protocol":
            problems.append(f"{relpath}:{line}: {layer} imports {name}: only the names protocol/ exports")
        elif top in FORBIDDEN_LIBRARIES.get(layer, ()):
            problems.append(f"{relpath}:{line}: {layer} must not import {top} (imports {name})")
        elif (
            top == "rtunnel" and layer_of(name) != layer and not any(_under(name, a) for a in ALLOWED[layer])
        ):
            allowed = ", ".join(ALLOWED[layer]) or "nothing of rtunnel"
            problems.append(
                f"{relpath}:{line}: {layer} must not import {name} ({layer} may import {allowed})"
            )
    return problems


SOURCES = sorted([*(ROOT / "protocol").rglob("*.py"), *(ROOT / "rtunnel").rglob("*.py")])


def test_every_import_goes_in_an_allowed_direction() -> None:
    problems = [
        problem
        for path in SOURCES
        for problem in violations(path.relative_to(ROOT).as_posix(), path.read_text())
    ]
    assert not problems, "imports against the layering:\n" + "\n".join(problems)


def test_every_layer_in_the_table_exists() -> None:
    # a layer renamed or removed must leave the table too, or its rules silently guard nothing
    assert [layer for layer in ALLOWED if not _is_module(layer)] == []


@pytest.mark.parametrize(
    ("module", "source", "complaint"),
    [
        ("rtunnel/link/probe.py", "import h11\n", "rtunnel.link must not import h11"),
        ("rtunnel/http/probe.py", "from ..link import transport\n", "must not import rtunnel.link.transport"),
        ("rtunnel/agent/probe.py", "from ..relay.registry import Tunnel\n", "must not import rtunnel.relay"),
        ("rtunnel/relay/probe.py", "from rtunnel.agent import allowlist\n", "must not import rtunnel.agent"),
        ("rtunnel/ops/probe.py", "def f():\n    from ..cli import main\n", "must not import rtunnel.cli"),
        ("protocol/probe.py", "import trio\n", "protocol/ imports trio"),
        (
            "rtunnel/relay/probe.py",
            "from protocol._frames import FrameType\n",
            "only the names protocol/ exports",
        ),
        ("rtunnel/newthing.py", "import os\n", "is in no layer"),
    ],
)
def test_a_forbidden_import_is_named(module: str, source: str, complaint: str) -> None:
    found = violations(module, source)
    assert len(found) == 1 and complaint in found[0], found
    assert found[0].startswith(f"{module}:")
