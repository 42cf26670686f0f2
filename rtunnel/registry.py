"""The relay's table of connected agents, and how a request finds one.

Agents that authenticated with the relay's token serve together: each new exchange goes to the connected agent
with the fewest exchanges in flight (ties: the newest connection). Nothing limits how many connections an agent
may have, so a reconnecting agent is accepted at once even before its old connection is known to be dead.
A request that arrives while no agent is connected waits (up to the relay's `--agent-wait`) for one to appear
instead of failing at once.
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

    def pick(self, avoid: Multiplexer | None = None) -> Multiplexer | None:
        """The agent for a new exchange; `avoid` (the one that just refused or lost it) only if it is the
        only one left."""
        candidates = [mux for mux in self._agents if mux.accepting_streams]
        if avoid in candidates and len(candidates) > 1:
            candidates.remove(avoid)
        if not candidates:
            # Every live agent is at its concurrent-stream limit: queue in the least-loaded one's open_stream,
            # which wakes as soon as one of its streams ends. (Waiting on this registry's event instead would
            # sleep until --agent-wait ran out: it fires on connects and GOAWAYs, not on finished streams.)
            candidates = [mux for mux in self._agents if not mux.is_closed and not mux.goaway_received]
        if not candidates:
            return None
        # Ties go to the most recently connected agent: when an agent reconnects after a link failure, its
        # old connection may be dead without the relay knowing yet (that takes up to the dead timeout),
        # while the new one is certainly alive. So a reconnected agent is used at once: no stale slot.
        return min(reversed(candidates), key=lambda mux: mux.in_flight)

    async def open_exchange(
        self,
        head: RequestHead,
        *,
        end_stream: bool,
        wait: float | None = None,
        avoid: Multiplexer | None = None,
    ) -> tuple[Multiplexer, MuxStream]:
        """Open a stream for one exchange on the least-loaded agent, waiting for one to connect if needed.

        `avoid`: an agent to use only if no other can take the exchange (a retry goes elsewhere if it can)."""
        deadline = trio.current_time() + (self.agent_wait if wait is None else wait)
        waited_for_another = avoid is None
        while True:
            mux = self.pick(avoid)
            if mux is not None and mux is avoid and not waited_for_another:
                # Only the agent that just refused the exchange is left: rather than bounce off it again at
                # once, give another agent (or its GOAWAY) until the deadline to show up, then try it again.
                waited_for_another = True
                changed = self._changed
                with trio.move_on_at(deadline):
                    await changed.wait()
                continue
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
