"""What one exchange, and one attempt of it, come to: typed values that the step which decides returns, in
place of flags that several steps set and others read.

An attempt ends in one of three ways: a `Result` (the response went out, whole or broken off), a `Retry` (the
agent did not or may not have processed it and nothing reached the client: send it again) or an `ErrorReply`
(the relay answers the client itself). The exchange's retry loop turns the last two into a `Result`, which
the connection logs and acts on (`Then`).
"""

from __future__ import annotations

import enum
from typing import NamedTuple

__all__ = ["ErrorReply", "Result", "Retry", "Then"]


class Then(enum.Enum):
    """What the client connection does after an exchange."""

    NEXT = "next"  # the response is complete: read the next request (if h11 agrees the cycle is done)
    CLOSE = "close"  # the response went out (or the relay's error did) and the connection ends with it
    ABORT = "abort"  # the response cannot be completed honestly: drop the connection without finishing it


class Result(NamedTuple):
    """One exchange's end, as the connection and its access line see it."""

    status: int  # 499: the client left first
    bytes_in: int  # request body, client to agent
    bytes_out: int  # response body, agent (or the relay's error) to client
    then: Then
    note: str | None = None  # why the relay answered with an error itself (the dashboard's last errors)


class Retry(NamedTuple):
    """The attempt failed before the agent could have processed it, or may have with nothing of the response
    out (SPEC 10.1): send the request again if the budget allows."""

    why: str
    maybe_processed: bool  # counts toward MAX_POSSIBLY_PROCESSED
    bytes_in: int = 0


class ErrorReply(NamedTuple):
    """The relay answers the client itself, with a plain-text error."""

    status: int
    reason: str
    close: bool = True  # close the connection after it (else only if the request was not read whole)
    retry_after: bool = False  # a limit shared with other clients: Retry-After tells when to come back
    bytes_in: int = 0  # the request body read before the relay gave up on it (for the access line)
