"""The command line. `main` (commands.py) is the `rtunnel` console script: it parses (parse.py, with the
config file: configfile.py), then runs what serve.py or dial.py built from their options (the same runners
rtunnel.serve and rtunnel.dial run), or a tool: `cert`/`token` (certs.py), `demo` (demo.py). common.py holds
the option groups several commands share, values.py the option value types."""

from .commands import main

__all__ = ["main"]
