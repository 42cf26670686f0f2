"""What happens on a TCP connection before any protocol is spoken, shared by every listener and both ends:
the PROXY protocol header and who the peer is, per-address limits, and writes that skip trio's scheduler.
Knows no HTTP and no WebSocket."""
