"""The record of one upstream attempt (rtunnel/agent/attempt.py): the first failure is the attempt's."""

from __future__ import annotations

from typing import Any, cast

from rtunnel.agent.attempt import Attempt, Cause, Failure, Phase


def test_the_first_failure_is_kept_and_what_follows_it_is_not() -> None:
    att = Attempt(cast(Any, None), response_timeout=1.0)
    assert (att.phase, att.failure) == (Phase.WAITING, None)
    # The body's task sees the stall first; the response's task is then cancelled mid-read.
    att.fail(Cause.TIMEOUT, "upstream accepted no request bytes for 1 s and sent no response")
    att.fail(Cause.UPSTREAM, "upstream connection failed: ECONNRESET")
    assert att.failure == Failure(
        Cause.TIMEOUT, "upstream accepted no request bytes for 1 s and sent no response"
    )


def test_phases_are_ordered_as_an_exchange_moves_on() -> None:
    # _settle and the body's task compare phases: a failure once the head is forwarded cuts the response,
    # a stall once the upstream has answered is ignored.
    order = [Phase.WAITING, Phase.INTERIM, Phase.RESPONDED, Phase.FORWARDED, Phase.COMPLETE, Phase.SWITCHED]
    assert sorted(order) == order
