"""The relay's limits on its HTTP side, in one place: the connection loop, the request checks, the body pump and
the listener each read the ones that concern them."""

from __future__ import annotations

import dataclasses

__all__ = ["HttpLimits"]


@dataclasses.dataclass(frozen=True)
class HttpLimits:
    """The relay's limits on its HTTP side (README, "Security model", lists them with their defaults).

    None disables a limit."""

    max_head_size: int = 32 * 1024  # request line + headers (431)
    max_header_count: int = 200  # (431)
    head_timeout: float = 30.0  # time to receive a whole request head once it started (slowloris, 408)
    idle_timeout: float = 75.0  # keep-alive connection with no request in progress (closed quietly)
    body_timeout: float = 60.0  # a request body that stops arriving mid-way (408): slowloris on the body
    # One write to a client that the client does not take this long (it stopped reading, keeping its TCP window
    # shut): the connection is dropped, as nginx's send_timeout does. `--stall-timeout` sets it with the
    # stream stall timeout, since both are a reader that takes nothing.
    send_timeout: float = 60.0
    max_body_size: int | None = None  # None: unlimited (streamed, so no memory cost) (413)
    max_connections: int | None = 1024  # client connections on the HTTP listener, in total (503)
    # Per client address (the PROXY header's or X-Forwarded-For's behind a balancer). A quarter of the total:
    # one address can never shut the others out, while an office behind one NAT address gets ~40 browsers'
    # worth of connections at once (README, "Security model", has the reasoning).
    max_connections_per_ip: int | None = 256  # ... from one client address (503)
    # As many as connections: long-lived exchanges (SSE, WebSockets, long polls) of many users behind one
    # NAT are normal; behind a trusted proxy, whose connections are not limited per address, this is the
    # per-client bound.
    max_exchanges_per_ip: int | None = 256  # exchanges in progress from one client address (429)
    # Stream data buffered in the relay (received from agents and not yet written to clients, plus request
    # bodies queued toward agents), across all agents; above it new exchanges get 503 until it drains.
    max_buffered_bytes: int | None = 256 * 1024 * 1024
