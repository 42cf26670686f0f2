"""The relay's retry rule (SPEC.md 10.1): which failed exchanges it may send again, and how often. The methods
that may be sent twice and the request body held for that are the rules both ends share (http/replay.py)."""

from __future__ import annotations

from ..http.replay import IDEMPOTENT
from ..link.mux import StreamReset
from .outcome import ErrorReply, Retry, Then

__all__ = ["MAX_ATTEMPTS", "MAX_POSSIBLY_PROCESSED", "on_reset"]

# SPEC 10 says which requests may be sent again at all. One is sent at most MAX_ATTEMPTS times in all, and one
# that may have reached the upstream (idempotent, link lost) at most twice: a request that kills its agent
# must not go on to kill every other agent.
MAX_ATTEMPTS = 5
MAX_POSSIBLY_PROCESSED = 2


def on_reset(
    method: bytes,
    exc: StreamReset,
    *,
    head_sent: bool,
    replied: bool,
    request_failed: bool,
    body_lost: bool,
    link_gone: bool,
) -> Retry | ErrorReply | Then:
    """SPEC 10.1, retry rule: what a stream reset before the response was complete comes to. `head_sent`:
    part of the response is out; `replied`: the agent's final REPLY arrived, so it processed the request,
    whatever a refusal after that says; `request_failed`: the relay reset the stream itself for the client's
    side (it left, or its body was refused), whose own answer wins; `body_lost`: part of the request body was
    sent and is no longer held; `link_gone`: the agent's connection has ended (rather than this one stream)."""
    if head_sent:
        return (
            Then.ABORT
        )  # part of the response is out: the only honest signal left is to break the connection
    lost_link = link_gone and not exc.remote
    what = "the agent's connection was lost" if lost_link else "the agent did not complete the exchange"
    failed = ErrorReply(502, f"{what}: {exc}")
    if request_failed:
        return failed  # we reset it ourselves; the caller answers (or not) for the client's side
    # Never processed -> always safe; possibly processed -> only an idempotent request whose link died
    # (not one the agent failed on purpose), since nothing of the response reached the client.
    refused = exc.retryable and not replied
    safe = refused or (method in IDEMPOTENT and lost_link)
    if safe and not body_lost:
        return Retry(str(exc), maybe_processed=not refused)
    return failed
