"""Prometheus metrics and the live status of one relay or agent process.

Each `Metrics` has its own `CollectorRegistry` (never the global default), so several relays and agents can
run in one process (tests) without mixing their numbers. Exchange counters are updated once per exchange,
from the same record the access log writes. What describes live connections (links up, streams open, RTT,
flow-control stalls) is read from the multiplexers when scraped, so it can never drift from the truth.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, Final

import trio
from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .. import __version__
from ..link.mux import Multiplexer
from .activity import Activity
from .logs import Access

__all__ = ["Metrics"]

# Request durations span sub-millisecond local calls to long polls and downloads.
DURATION_BUCKETS: Final = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


@dataclasses.dataclass
class Link:
    """A tunnel connection: to an agent (relay side) or to a relay (agent side)."""

    mux: Multiplexer
    peer: str
    since: float
    tunnel: str | None = None


class Metrics:
    def __init__(self, role: str) -> None:
        if role not in ("relay", "agent"):
            raise ValueError(f"role must be 'relay' or 'agent', not {role!r}")
        self.role = role
        self.started = time.monotonic()
        self.links: dict[Multiplexer, Link] = {}
        self.draining = False  # set on SIGTERM: not ready any more, whatever is connected
        # Idle keep-alive connections to the upstream (agent side): sockets that are held on purpose.
        self.pooled_connections: Callable[[], int] | None = None
        self._retired_stalls = 0
        self.activity = Activity(role)  # the dashboard's rates and last errors
        # The *_created series double the page for no use here (and are process-wide anyway).
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry()
        registry = self.registry
        self.connects = Counter(
            "rtunnel_connects",
            "Tunnel connections established (relay: agents that connected; agent: connections to relays)",
            registry=registry,
        )
        self.reconnects = Counter(
            "rtunnel_reconnects",
            "Connection attempts after a failed or lost connection (agent side)",
            registry=registry,
        )
        self.exchanges = Counter(
            "rtunnel_exchanges",
            "Finished exchanges by HTTP status ('none': reset before a response head)",
            ["status"],
            registry=registry,
        )
        self.body_bytes = Counter(
            "rtunnel_body_bytes",
            "Body bytes carried: direction=request (client to upstream) or response",
            ["direction"],
            registry=registry,
        )
        self.duration = Histogram(
            "rtunnel_request_duration_seconds",
            "Time from the request head to the end of the response",
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        # Children looked up once (labels() costs a lock, a tuple and a dict lookup on every call).
        self._request_bytes = self.body_bytes.labels(direction="request")
        self._response_bytes = self.body_bytes.labels(direction="response")
        self._by_status: dict[int | None, Any] = {}
        registry.register(_LiveCollector(self))
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)

    # -- updates ------------------------------------------------------------------------------------------

    def link_up(self, mux: Multiplexer, peer: str, tunnel: str | None = None) -> None:
        self.links[mux] = Link(mux, peer, time.monotonic(), tunnel)
        self.connects.inc()

    def link_down(self, mux: Multiplexer) -> None:
        if self.links.pop(mux, None) is not None:
            self._retired_stalls += mux.send_stalls

    def record_exchange(self, access: Access) -> None:
        status = access.status
        counter = self._by_status.get(status)
        if counter is None:
            # Statuses are 3 digits (h11 and the tunnel's REPLY check that), so this holds at most ~900 entries.
            counter = self.exchanges.labels(status=str(status) if status is not None else "none")
            self._by_status[status] = counter
        counter.inc()
        if access.bytes_in:
            self._request_bytes.inc(access.bytes_in)
        if access.bytes_out:
            self._response_bytes.inc(access.bytes_out)
        self.duration.observe(access.duration_ms / 1000)
        self.activity.record(access)

    # -- reading ------------------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """At least one tunnel connection is up and not draining, and neither is this process."""
        return not self.draining and any(
            not link.mux.is_closed and not link.mux.goaway_received for link in self.links.values()
        )

    def ready_for(self, tunnel: str) -> bool:
        """Like `ready`, for the links of one named tunnel only (`/readyz?tunnel=NAME`)."""
        return not self.draining and any(
            link.tunnel == tunnel and not link.mux.is_closed and not link.mux.goaway_received
            for link in self.links.values()
        )

    @property
    def flow_control_stalls(self) -> int:
        return self._retired_stalls + sum(mux.send_stalls for mux in self.links)

    def status(self) -> dict[str, Any]:
        """The document served as /status.json (and printed by `rtunnel status`)."""
        now = time.monotonic()
        links = [
            {
                "peer": link.peer,
                "tunnel": link.tunnel,
                "uptime_s": round(now - link.since, 3),
                "rtt_ms": None if link.mux.rtt is None else round(link.mux.rtt * 1000, 3),
                "in_flight": link.mux.in_flight,
            }
            for link in sorted(self.links.values(), key=lambda link: link.since)
        ]
        return {
            "role": self.role,
            "version": __version__,
            "uptime_s": round(now - self.started, 3),
            "ready": self.ready,
            "agents" if self.role == "relay" else "relays": links,
            "streams_open": sum(link.mux.in_flight for link in self.links.values()),
            "process": self._process(),
        }

    def _process(self) -> dict[str, int | None]:
        """What a leak would show first: trio tasks, open file descriptors, resident memory (the soak in
        bench/soak.py and the leak test compare them before and after traffic)."""
        pooled = self.pooled_connections() if self.pooled_connections is not None else 0
        return {
            "tasks": _task_count(),
            "fds": _fd_count(),
            "rss_bytes": _rss(),
            # Python objects' memory blocks: they grow with a leak, RSS also with the allocator's high-water mark.
            "allocated_blocks": sys.getallocatedblocks(),
            "pooled_connections": pooled,
        }


def _task_count() -> int | None:
    try:
        root = trio.lowlevel.current_root_task()
    except RuntimeError:  # not inside trio.run
        return None
    if root is None:
        return None
    count, todo = 0, [root]
    while todo:
        task = todo.pop()
        count += 1
        todo.extend(child for nursery in task.child_nurseries for child in nursery.child_tasks)
    return count


def _fd_count() -> int | None:
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # minus the one listdir itself holds open
    except OSError:
        return None


def _rss() -> int | None:
    try:
        with open("/proc/self/statm", "rb") as file:
            return int(file.read().split()[1]) * resource.getpagesize()
    except (OSError, ValueError, IndexError):
        return None


class _LiveCollector(Collector):
    """Values read from the live connections at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        metrics = self._metrics
        links = list(metrics.links.values())
        if metrics.role == "relay":
            yield GaugeMetricFamily("rtunnel_agents_connected", "Agents connected", value=len(links))
        else:
            yield GaugeMetricFamily("rtunnel_relays_connected", "Relays connected to", value=len(links))
        yield GaugeMetricFamily(
            "rtunnel_streams_open",
            "Streams (exchanges) open on the tunnel connections",
            value=sum(link.mux.in_flight for link in links),
        )
        yield CounterMetricFamily(
            "rtunnel_flow_control_stalls",
            "Times a stream's sender had to wait for flow-control room",
            value=metrics.flow_control_stalls,
        )
        rtt = GaugeMetricFamily(
            "rtunnel_ping_rtt_seconds", "Last ping round-trip time per tunnel connection", labels=["peer"]
        )
        for link in links:
            if link.mux.rtt is not None:
                rtt.add_metric([link.peer], link.mux.rtt)
        yield rtt
        if any(link.tunnel is not None for link in links):
            tunnels = GaugeMetricFamily(
                "rtunnel_tunnel_links", "Tunnel connections up per named tunnel", labels=["tunnel"]
            )
            counts: dict[str, int] = {}
            for link in links:
                if link.tunnel is not None:
                    counts[link.tunnel] = counts.get(link.tunnel, 0) + 1
            for name, count in sorted(counts.items()):
                tunnels.add_metric([name], count)
            yield tunnels
        info = GaugeMetricFamily("rtunnel_info", "rtunnel version and role", labels=["version", "role"])
        info.add_metric([__version__, metrics.role], 1)
        yield info
