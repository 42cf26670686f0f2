"""The relay's own responses to a client: a short plain-text error, with the headers that tell a client what to
do next (Retry-After, Connection: close, Rtunnel-Listener)."""

from __future__ import annotations

import h11

from ..http.replies import phrase, plain_text
from ..ops.logs import with_request_id
from .outcome import ErrorReply, Result, Then
from .request import MISDIRECTED_AGENT
from .wire import ClientGone, ClientWire

__all__ = ["reply", "send_error"]


async def reply(wire: ClientWire, error: ErrorReply, request_id: str | None) -> Result:
    """Answer with `error` and say how the connection goes on: only a request read whole, on a connection
    the error does not close, leaves it usable for the next one."""
    sent = await send_error(
        wire, error.status, error.reason, request_id, close=error.close, retry_after=error.retry_after
    )
    then = Then.NEXT if not error.close and wire.h11.their_state is h11.DONE else Then.CLOSE
    return Result(error.status, error.bytes_in, sent or 0, then, None if sent is None else error.reason)


async def send_error(
    wire: ClientWire,
    status: int,
    reason: str,
    request_id: str | None,
    *,
    close: bool = False,
    retry_after: bool = False,
) -> int | None:
    """Send the relay's own response; return its body size as sent (0 if it could not be), or None if a
    response has already begun (nothing is sent then)."""
    conn = wire.h11
    if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
        return None
    body, headers = plain_text(reason + "\n")
    if retry_after:
        headers.append((b"Retry-After", b"5"))
    if status == MISDIRECTED_AGENT:
        headers.append((b"Rtunnel-Listener", b"http"))  # SPEC.md section 2: the dialer names the mistake
    headers = with_request_id(headers, request_id)
    if close or conn.their_state not in (h11.DONE, h11.IDLE):
        headers.append((b"Connection", b"close"))
    try:
        await wire.send(h11.Response(status_code=status, headers=headers, reason=phrase(status)))
        await wire.send(h11.Data(data=body))
        await wire.send(h11.EndOfMessage())
    except (ClientGone, h11.LocalProtocolError):
        return 0
    return len(body)
