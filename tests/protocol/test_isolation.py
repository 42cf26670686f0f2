"""The sans-IO core stays sans-IO: importing `protocol` pulls in the standard library only (no trio, no socket).

Checked in a fresh interpreter, since this test process has long since imported trio, hypothesis and more.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

_PROBE = """
import json, sys
before = set(sys.modules)
import protocol
print(json.dumps({
    "file": protocol.__file__,
    "new": sorted(set(sys.modules) - before),
    "all": sorted(sys.modules),
    "stdlib": sorted(sys.stdlib_module_names),
}))
"""

REPO = Path(__file__).resolve().parents[2]


def test_importing_protocol_imports_only_the_standard_library() -> None:
    # -I: no PYTHON* environment variables, no user site, no script directory on sys.path.
    result = subprocess.run(
        [sys.executable, "-I", "-c", _PROBE], capture_output=True, text=True, check=True, cwd=REPO
    )
    report = json.loads(result.stdout)
    assert Path(report["file"]).resolve() == REPO / "protocol" / "__init__.py"
    stdlib = set(report["stdlib"])
    foreign = [
        name
        for name in report["new"]
        if name.split(".")[0] not in stdlib and name != "protocol" and not name.startswith("protocol.")
    ]
    assert foreign == []
    loaded = set(report["all"])
    for forbidden in ("trio", "socket", "ssl", "selectors", "asyncio", "threading", "rtunnel"):
        assert forbidden not in loaded, forbidden
