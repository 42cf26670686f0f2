"""The link between an agent and a relay: the WebSocket handshakes, the established WebSocket, and the stream
multiplexer that runs `protocol.Connection` over it. Knows no HTTP (no h11)."""
