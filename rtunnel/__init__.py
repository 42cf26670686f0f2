"""rtunnel: a reverse HTTP tunnel over one outbound WebSocket. The runtime (trio) around `protocol`.

The library API (rtunnel.api): `await rtunnel.serve(...)` runs a relay, `await rtunnel.dial(...)` an agent in
front of an upstream URL or a WSGI/ASGI app run in-process.
"""

__version__ = "0.1.0"

from .api import ConfigError, Listening, dial, serve  # after __version__, which cli imports

__all__ = ["ConfigError", "Listening", "__version__", "dial", "serve"]
