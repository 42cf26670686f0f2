"""Cases, their outcomes and the report: what the relay and agent suites share.

A case is a coroutine that drives scripted peers (peers.py) against the implementation under test and raises
when the implementation does not do what the SPEC section it names requires. The runner keeps what each
peer sent and received, prints it with the verdict, and passes only if every MUST case passed.
"""

# ASYNC109: a case's time limit is a parameter of the runner, applied with fail_after around each case.
# ruff: noqa: ASYNC109

from __future__ import annotations

import dataclasses
import enum
import sys
from collections.abc import Awaitable, Callable
from typing import Generic, TextIO, TypeVar

import h11
import trio

from ..link import transport
from .peers import Unexpected, _Transcript

Target = TypeVar("Target")


class Level(enum.Enum):
    MUST = "MUST"
    SHOULD = "SHOULD"


class Skip(Exception):
    """The case cannot run against this target (e.g. it needs --http); it neither passes nor fails."""


@dataclasses.dataclass(frozen=True)
class Case(Generic[Target]):
    section: str  # of SPEC.md, e.g. "4.1"
    level: Level
    title: str
    run: Callable[[Target, Probe], Awaitable[None]]


@dataclasses.dataclass
class Outcome:
    case: Case[object]
    passed: bool | None  # None: skipped
    detail: str = ""
    sent: list[str] = dataclasses.field(default_factory=list)
    got: list[str] = dataclasses.field(default_factory=list)

    @property
    def verdict(self) -> str:
        return "SKIP" if self.passed is None else "PASS" if self.passed else "FAIL"


class Probe:
    """Handed to each case: it registers the peers whose transcripts the report shows, and notes the rest."""

    def __init__(self) -> None:
        self._peers: list[_Transcript] = []
        self.sent: list[str] = []
        self.got: list[str] = []

    def watch(self, peer: _Transcript) -> None:
        self._peers.append(peer)

    def transcript(self) -> tuple[list[str], list[str]]:
        sent, got = list(self.sent), list(self.got)
        for peer in self._peers:
            sent += peer.sent
            got += peer.got
        return sent, got


class Suite(Generic[Target]):
    """The cases of one side, in the order they run."""

    def __init__(self, *parts: Suite[Target]) -> None:
        """An empty suite, or the cases of `parts`, in order."""
        self.cases: list[Case[Target]] = [case for part in parts for case in part.cases]

    def case(
        self, section: str, level: Level, title: str
    ) -> Callable[[Callable[[Target, Probe], Awaitable[None]]], Callable[[Target, Probe], Awaitable[None]]]:
        def register(
            run: Callable[[Target, Probe], Awaitable[None]],
        ) -> Callable[[Target, Probe], Awaitable[None]]:
            self.cases.append(Case(section, level, title, run))
            return run

        return register

    async def run(self, target: Target, *, timeout: float, only: str | None = None) -> list[Outcome]:
        outcomes = []
        for case in self.cases:
            if only is not None and only not in case.title and only != case.section:
                continue
            outcomes.append(await run_case(case, target, timeout))
        return outcomes


async def run_case(case: Case[Target], target: Target, timeout: float) -> Outcome:
    probe = Probe()
    passed: bool | None = False
    detail = ""
    try:
        with trio.fail_after(timeout):
            await case.run(target, probe)
        passed = True
    except Exception as exc:
        passed, detail = _judge(leaf(exc), timeout)
    sent, got = probe.transcript()
    return Outcome(case, passed, detail, sent, got)  # type: ignore[arg-type]


def leaf(exc: BaseException) -> BaseException:
    """The exception that decided a case, out of the groups its nurseries wrapped it in."""
    while isinstance(exc, BaseExceptionGroup):
        leaves = [e for e in exc.exceptions if not isinstance(e, trio.Cancelled)]
        exc = (leaves or exc.exceptions)[0]
    return exc


def _judge(exc: BaseException, timeout: float) -> tuple[bool | None, str]:
    if isinstance(exc, Skip):
        return None, str(exc)
    if isinstance(exc, trio.TooSlowError):
        return False, f"no answer within {timeout:g} s"
    if isinstance(exc, Unexpected):
        return False, str(exc)
    if isinstance(exc, transport.ConnectError | transport.TransportClosed | OSError | h11.ProtocolError):
        return False, f"{type(exc).__name__}: {exc}"
    # A case must never take the others down: an error of the runner itself is reported as a failure too.
    return False, f"the case failed unexpectedly: {exc!r}"


def report(outcomes: list[Outcome], out: TextIO = sys.stdout, *, verbose: bool = True) -> bool:
    """Print every outcome; True if every MUST case passed (and at least one ran)."""
    for outcome in outcomes:
        case = outcome.case
        line = f"{outcome.verdict}  {case.level.value:<6}  SPEC {case.section:<6} {case.title}"
        if outcome.detail:
            line += f": {outcome.detail}"
        print(line, file=out)
        if verbose or outcome.passed is False:
            for text in outcome.sent[:12]:
                print(f"        sent: {_clip(text)}", file=out)
            for text in outcome.got[:12]:
                print(f"        got:  {_clip(text)}", file=out)
    must = [o for o in outcomes if o.case.level is Level.MUST and o.passed is not None]
    should = [o for o in outcomes if o.case.level is Level.SHOULD and o.passed is not None]
    skipped = sum(1 for o in outcomes if o.passed is None)
    must_ok = sum(1 for o in must if o.passed)
    should_ok = sum(1 for o in should if o.passed)
    print(
        f"conformance: MUST {must_ok}/{len(must)} passed, SHOULD {should_ok}/{len(should)} passed,"
        f" {skipped} skipped",
        file=out,
    )
    return bool(must) and must_ok == len(must)


def _clip(text: str, limit: int = 200) -> str:
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."
