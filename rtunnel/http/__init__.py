"""What both ends share about HTTP/1.1: strict request checks, hop-by-hop and forwarding headers, protocol
switches and the byte pump after a 101. Uses the multiplexer's streams, never the WebSocket library."""
