"""The command line: parsing (with the config file), the commands that start a relay or an agent, and the
`cert` and `demo` tools. `main` is the `rtunnel` console script."""

from .commands import main

__all__ = ["main"]
