"""rtunnel: a reverse HTTP tunnel over one outbound WebSocket. The runtime (trio) around `protocol`."""

__version__ = "0.1.0"
