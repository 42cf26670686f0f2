"""The relay's retry rule (SPEC.md 10.1): which failed exchanges it may send again, and the state it keeps
for that (the request body it still holds, what already reached the client)."""

from __future__ import annotations

import dataclasses

from ..link.mux import StreamReset

__all__ = [
    "IDEMPOTENT",
    "MAX_ATTEMPTS",
    "MAX_POSSIBLY_PROCESSED",
    "REPLAY_LIMIT",
    "Outcome",
    "Replay",
    "on_reset",
]

IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
# SPEC 10 says which requests may be sent again at all. One is sent at most MAX_ATTEMPTS times in all, and one
# that may have reached the upstream (idempotent, link lost) at most twice: a request that kills its agent
# must not go on to kill every other agent.
MAX_ATTEMPTS = 5
MAX_POSSIBLY_PROCESSED = 2
# Request bodies up to this size are held until the exchange ends, so that a refused request can be resent.
REPLAY_LIMIT = 64 * 1024


@dataclasses.dataclass(slots=True)
class Replay:
    """The request body read from the client so far, held (up to REPLAY_LIMIT) so that a request whose
    stream was refused, or lost before the agent could have processed it, can be sent again (SPEC 10)."""

    held: bytearray = dataclasses.field(default_factory=bytearray)
    overflow: bool = False  # more was read than is held: the body cannot be replayed
    complete: bool = False  # the client's EndOfMessage was read
    trailers: list[tuple[bytes, bytes]] | None = None

    def hold(self, data: bytes) -> None:
        if self.overflow:
            return
        if len(self.held) + len(data) > REPLAY_LIMIT:
            self.overflow = True
            self.held = bytearray()
        else:
            self.held += data


@dataclasses.dataclass(slots=True)
class Outcome:
    """What one attempt of an exchange came to; on_reset() decides from it whether to send it again."""

    status: int = 502
    bytes_in: int = 0
    bytes_out: int = 0
    head_sent: bool = False
    keep_alive: bool = False
    abort: bool = False
    retry: bool = False
    why: str = ""
    client_gone: bool = False
    body_error: str | None = None
    body_status: int = 400
    pending_error: tuple[int, str] | None = None
    maybe_processed: bool = False  # retry: the agent may have processed it (see MAX_POSSIBLY_PROCESSED)
    switched: bool = False  # a 101 went to the client: the connection now carries raw bytes


def on_reset(method: bytes, exc: StreamReset, outcome: Outcome, body_lost: bool, link_gone: bool) -> None:
    """SPEC 10.1, retry rule. `body_lost`: part of the request body was sent and is no longer held;
    `link_gone`: the agent's connection has ended (rather than this one stream being reset)."""
    if outcome.head_sent:
        # Part of the response is out: the only honest signal left is to break the connection.
        outcome.abort = True
        return
    lost_link = link_gone and not exc.remote
    what = "the agent's connection was lost" if lost_link else "the agent did not complete the exchange"
    outcome.pending_error = (502, f"{what}: {exc}")
    if outcome.client_gone or outcome.body_error is not None:
        return  # we reset it ourselves; the caller answers (or not) for the client's side
    # Never processed -> always safe; possibly processed -> only an idempotent request whose link died
    # (not one the agent failed on purpose), since nothing of the response reached the client.
    safe = exc.retryable or (method in IDEMPOTENT and lost_link)
    if safe and not body_lost:
        outcome.retry = True
        outcome.maybe_processed = not exc.retryable
        outcome.why = str(exc)
