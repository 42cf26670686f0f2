"""The relay's table of connected agents, and how a request finds one.

Agents that authenticated with the relay's token serve together: each new exchange goes to the connected agent
with the fewest exchanges in flight. A request that arrives while no agent is connected waits (up to the
relay's `--agent-wait`) for one to appear instead of failing at once.
"""

from __future__ import annotations

import logging

import trio

from protocol import RequestHead

from .mux import Multiplexer, MuxClosed, MuxStream

log = logging.getLogger("rtunnel.relay")


class NoAgentAvailable(Exception):
    """No agent could take the exchange within the wait."""


class AgentRegistry:
    def __init__(self, agent_wait: float) -> None:
        self.agent_wait = agent_wait
        self._agents: list[Multiplexer] = []
        self._changed = trio.Event()
        self.connects = 0

    @property
    def agents(self) -> list[Multiplexer]:
        return list(self._agents)

    def add(self, mux: Multiplexer) -> None:
        self._agents.append(mux)
        self.connects += 1
        self._notify()

    def remove(self, mux: Multiplexer) -> None:
        if mux in self._agents:
            self._agents.remove(mux)
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def notify(self) -> None:
        """Something about an agent changed (e.g. a GOAWAY): waiters look again."""
        self._notify()

    def pick(self) -> Multiplexer | None:
        candidates = [mux for mux in self._agents if mux.accepting_streams]
        if not candidates:
            return None
        return min(candidates, key=lambda mux: mux.in_flight)

    async def open_exchange(
        self, head: RequestHead, *, end_stream: bool, wait: float | None = None
    ) -> tuple[Multiplexer, MuxStream]:
        """Open a stream for one exchange on the least-loaded agent, waiting for one to connect if needed."""
        deadline = trio.current_time() + (self.agent_wait if wait is None else wait)
        while True:
            mux = self.pick()
            if mux is not None:
                try:
                    with trio.move_on_at(deadline):
                        return mux, await mux.open_stream(head, end_stream=end_stream)
                except MuxClosed:
                    continue  # it started draining or died between pick and open: try another
                raise NoAgentAvailable("every agent is at its concurrent-stream limit")
            if trio.current_time() >= deadline:
                raise NoAgentAvailable("no agent is connected")
            changed = self._changed
            with trio.move_on_at(deadline):
                await changed.wait()
