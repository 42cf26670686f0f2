"""The ASGI `lifespan` protocol, as uvicorn runs it (`--lifespan auto|on|off`).

Start-up completes before the agent dials any relay, so no request reaches an app that is not ready; shutdown
runs once the agent has drained. `auto` treats an app that raises before start-up completes, or returns
without answering, as one that does not speak lifespan (logged, then served anyway); `on` makes that fatal.
A `lifespan.startup.failed`, and an app that needs asyncio (under either mode), stop the agent with one line.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Final

import trio

from ...startup import StartupError  # the CLI prints it as one line (exit 1)

__all__ = ["SHUTDOWN_TIMEOUT", "STARTUP_TIMEOUT", "Lifespan", "StartupError", "needs_asyncio"]

log = logging.getLogger("rtunnel.agent.app")

STARTUP_TIMEOUT: Final = 60.0
SHUTDOWN_TIMEOUT: Final = 30.0
MODES: Final = ("auto", "on", "off")

Message = dict[str, Any]


def needs_asyncio(exc: BaseException) -> bool:
    """Whether `exc` is what an asyncio-only call raises on trio (no running asyncio loop, or sniffio's
    verdict that the running library is not asyncio)."""
    text = str(exc)
    return (isinstance(exc, RuntimeError) and "event loop" in text) or type(exc).__name__ in (
        "AsyncLibraryNotFoundError",
    )


class Lifespan:
    def __init__(self, app: Any, mode: str, state: dict[str, Any]) -> None:
        if mode not in MODES:
            raise ValueError(f"lifespan mode {mode!r}: one of {', '.join(MODES)}")
        self.app = app
        self.mode = mode
        self.state = state
        self._send_channel, self._receive_channel = trio.open_memory_channel[Message](2)
        self._answers_send, self._answers = trio.open_memory_channel[Message | BaseException | None](2)
        self._running = False

    async def startup(self, nursery: trio.Nursery) -> None:
        """Run the app's lifespan task in `nursery` and wait for start-up; raises StartupError."""
        if self.mode == "off":
            return
        nursery.start_soon(self._main)
        self._running = True
        await self._send_channel.send({"type": "lifespan.startup"})
        with trio.move_on_after(STARTUP_TIMEOUT) as scope:
            answer = await self._answers.receive()
        if scope.cancelled_caught:
            raise StartupError(f"the app did not complete its lifespan start-up within {STARTUP_TIMEOUT:g} s")
        if isinstance(answer, dict) and answer["type"] == "lifespan.startup.complete":
            log.info("application start-up complete")
            return
        if isinstance(answer, dict):  # lifespan.startup.failed
            message = answer.get("message") or "no reason given"
            raise StartupError(f"the app's lifespan start-up failed: {message}")
        self._running = False
        if isinstance(answer, BaseException) and needs_asyncio(answer):
            raise StartupError(
                f"the app needs asyncio ({type(answer).__name__}: {answer}); `dial --app` runs apps on trio "
                "(anyio-based ones such as Starlette and FastAPI work): serve this one with uvicorn and use "
                "--upstream"
            )
        if self.mode == "on":
            why = "returned" if answer is None else f"raised {type(answer).__name__}: {answer}"
            raise StartupError(f"--lifespan on: the app's lifespan {why} before start-up completed")
        log.info("the app does not support the ASGI lifespan protocol: serving it without")

    async def shutdown(self) -> None:
        """lifespan.shutdown, waiting (at most SHUTDOWN_TIMEOUT) for the app to finish it."""
        if not self._running:
            return
        self._running = False
        with trio.move_on_after(SHUTDOWN_TIMEOUT) as scope:
            await self._send_channel.send({"type": "lifespan.shutdown"})
            answer = await self._answers.receive()
            if isinstance(answer, dict) and answer["type"] == "lifespan.shutdown.failed":
                log.error(
                    "the app's lifespan shutdown failed: %s", answer.get("message") or "no reason given"
                )
            elif isinstance(answer, BaseException):
                log.error("the app's lifespan shutdown raised", exc_info=answer)
            else:
                log.info("application shutdown complete")
        if scope.cancelled_caught:
            log.warning("the app did not complete its lifespan shutdown within %g s", SHUTDOWN_TIMEOUT)

    async def _main(self) -> None:
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": self.state}
        try:
            await self.app(scope, self._receive_channel.receive, self._send)
        except Exception as exc:
            if self.mode == "on" or self._running:
                log.debug("lifespan task raised", exc_info=exc)
            await self._answer(exc)
        else:
            await self._answer(None)

    async def _send(self, message: Message) -> None:
        kind = message.get("type")
        if kind not in (
            "lifespan.startup.complete",
            "lifespan.startup.failed",
            "lifespan.shutdown.complete",
            "lifespan.shutdown.failed",
        ):
            raise RuntimeError(f"unexpected ASGI message {kind!r} in the lifespan scope")
        await self._answers_send.send(message)

    async def _answer(self, answer: Message | BaseException | None) -> None:
        # A lifespan task that ends answers whichever step is waiting; nobody may be (after shutdown).
        with contextlib.suppress(trio.WouldBlock):
            self._answers_send.send_nowait(answer)
