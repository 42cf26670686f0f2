"""Resilience of the real processes (issue 4): dead links, restarts, cuts under load, graceful drains.

Every test runs real `rtunnel serve` / `rtunnel dial` processes, with short liveness settings so that the
failures they provoke are noticed in seconds. Nothing asserts a duration: each wait has a generous budget
(fail_after), and the durations measured are printed (pytest -s shows them) for the record.
"""

from __future__ import annotations

import functools
import random
import re
import signal
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import httpx
import pytest
import trio

from ..faultproxy import open_fault_proxy
from .procs import Agent, Relay, http_client, relay_ports, run_agent, run_relay, wait_counts
from .upstream import Upstream, payload

pytestmark = pytest.mark.e2e

# Liveness settings for the processes under test: fast enough to keep the tests short, slow enough that a
# busy 2-core machine never starves a heartbeat into a false alarm.
PING, DEAD = "0.5", "3"
RELAY_ARGS = ["--ping-interval", PING, "--dead-timeout", DEAD, "--agent-wait", "15"]
AGENT_ARGS = [
    "--ping-interval", PING, "--dead-timeout", DEAD,
    "--backoff-initial", "0.1", "--backoff-cap", "0.5", "--connect-timeout", "2",
]  # fmt: skip
REQUEST_TIMEOUT = 30.0  # no request of these tests may take longer: past it, it counts as hung
BUDGET = 20.0  # generous bound for a process to notice something


def note(what: str) -> None:
    print(f"[resilience] {what}", flush=True)


# --- load: a mix of GETs with known bytes and POSTs that count -------------------------------------------


@dataclass
class Results:
    ok: int = 0
    failed: Counter[str] = field(default_factory=Counter)  # "502", "503", "broken", ...
    wrong: list[str] = field(default_factory=list)  # a success with the wrong bytes: never allowed
    hung: list[str] = field(default_factory=list)  # past REQUEST_TIMEOUT: never allowed
    failures: list[tuple[str, str]] = field(default_factory=list)  # (method, outcome) of each failure
    posted: list[str] = field(default_factory=list)  # every POST key sent

    changed: trio.Event = field(default_factory=trio.Event)

    @property
    def total(self) -> int:
        return self.ok + sum(self.failed.values())

    def notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def wait_total(self, count: int) -> None:
        with trio.fail_after(BUDGET):
            while self.total < count:
                await self.changed.wait()

    def summary(self) -> str:
        return f"{self.total} requests: {self.ok} ok, failed {dict(self.failed)}"


async def one_request(client: httpx.AsyncClient, rng: random.Random, key: str, results: Results) -> None:
    """A GET of n known bytes, or a POST /count/<key> with a body; checks what comes back."""
    try:
        await _one_request(client, rng, key, results)
    finally:
        results.notify()


async def _one_request(client: httpx.AsyncClient, rng: random.Random, key: str, results: Results) -> None:
    if rng.random() < 0.5:
        n = rng.randrange(0, 4000)
        method, path, body = "GET", f"/bytes/{n}", None
    else:
        method, path, body = "POST", f"/count/{key}", rng.randbytes(rng.randrange(1, 2000))
        results.posted.append(key)
    try:
        with trio.fail_after(REQUEST_TIMEOUT + 5):
            response = await client.request(method, path, content=body)
    except trio.TooSlowError:
        results.hung.append(f"{method} {path}")
        return
    except httpx.TimeoutException:
        results.hung.append(f"{method} {path} (client timeout)")
        return
    except httpx.TransportError as exc:
        # The response had started when the link died: breaking the connection is the only honest signal.
        results.failed["broken"] += 1
        results.failures.append((method, f"broken: {exc!r}"))
        return
    if response.status_code in (502, 503):
        assert response.headers.get("content-type", "").startswith("text/plain"), response.headers
        results.failed[str(response.status_code)] += 1
        results.failures.append((method, f"{response.status_code}: {response.text.strip()}"))
        return
    expected = payload(int(path.rsplit("/", 1)[1])) if method == "GET" else None
    if response.status_code != 200:
        results.wrong.append(f"{method} {path}: status {response.status_code} {response.text[:200]!r}")
    elif method == "GET" and response.content != expected:
        results.wrong.append(f"{method} {path}: {len(response.content)} bytes, not the expected ones")
    elif method == "POST" and response.json() != {"key": key, "count": 1}:
        results.wrong.append(f"{method} {path}: {response.text!r}")  # count 2: applied twice
    else:
        results.ok += 1


async def run_load(
    base_url: str,
    *,
    requests: int,
    concurrency: int,
    seed: int,
    prefix: str,
    results: Results | None = None,
    stop: trio.Event | None = None,
) -> Results:
    """`requests` requests (or until `stop` is set, if given) from `concurrency` workers on one client."""
    results = results if results is not None else Results()
    rng = random.Random(seed)
    numbers = iter(range(requests))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with http_client(base_url, timeout=REQUEST_TIMEOUT, limits=limits) as client:

        async def worker() -> None:
            for i in numbers:
                if stop is not None and stop.is_set():
                    return
                await one_request(client, rng, f"{prefix}-{i}", results)

        async with trio.open_nursery() as nursery:
            for _ in range(concurrency):
                nursery.start_soon(worker)
    return results


@asynccontextmanager
async def load_until_done(base_url: str, *, seed: int, prefix: str) -> AsyncIterator[Results]:
    """Requests from 30 workers for as long as the block runs; the results go on growing meanwhile."""
    stop = trio.Event()
    results = Results()
    load = functools.partial(
        run_load,
        base_url,
        requests=100_000,
        concurrency=30,
        seed=seed,
        prefix=prefix,
        results=results,
        stop=stop,
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(load)
        try:
            yield results
        finally:
            stop.set()  # also when the block fails: the workers finish their requests in flight, then end


def assert_sound(results: Results, upstream: Upstream) -> None:
    """What must hold whatever the faults: no wrong bytes, no hang, no POST applied twice."""
    assert not results.wrong, results.wrong[:10]
    assert not results.hung, results.hung[:10]
    twice = {key: n for key, n in upstream.counts.items() if n > 1}
    assert not twice, f"POSTs applied more than once: {twice}"


def resent_or_excused(method: str, outcome: str) -> bool:
    """A failure the retry rule allows: a POST (it may have been processed), a response cut after its head,
    or a request whose link died under it more than once (resent at most once after possible processing)."""
    return method == "POST" or outcome.startswith("broken") or bool(re.search(r"after \d attempts", outcome))


AGENT_ACCESS = re.compile(r"rtunnel\.agent\.access: (GET|POST) ")


def agent_access_count(agent: Agent) -> int:
    return agent.count_lines(AGENT_ACCESS)


# --- helpers ---------------------------------------------------------------------------------------------


@asynccontextmanager
async def tunnel_through_proxy(
    upstream: Upstream, token: str, *, relay_args: list[str] = RELAY_ARGS, agent_args: list[str] = AGENT_ARGS
) -> AsyncIterator[tuple[Relay, Agent, object]]:
    async with (
        run_relay(token, extra_args=relay_args) as relay,
        open_fault_proxy("127.0.0.1", relay.agents_port) as proxy,
        run_agent(f"ws://127.0.0.1:{proxy.port}", upstream.url, token=token, extra_args=agent_args) as agent,
    ):
        yield relay, agent, proxy


@asynccontextmanager
async def two_agents(upstream: Upstream, token: str) -> AsyncIterator[tuple[Relay, Agent, Agent]]:
    async with (
        run_relay(token, extra_args=RELAY_ARGS) as relay,
        run_agent(relay.agents_url, upstream.url, token=token, extra_args=AGENT_ARGS) as first,
        run_agent(relay.agents_url, upstream.url, token=token, extra_args=AGENT_ARGS) as second,
    ):
        yield relay, first, second


async def timed(what: str, wait: Callable[[], object]) -> float:
    start = trio.current_time()
    await wait()  # type: ignore[misc]
    elapsed = trio.current_time() - start
    note(f"{what}: {elapsed:.2f} s")
    return elapsed


# --- dead links -----------------------------------------------------------------------------------------


async def test_blackhole_mid_transfer_is_noticed_by_both_sides_and_the_tunnel_comes_back(
    upstream: Upstream, token: str
) -> None:
    async with (
        tunnel_through_proxy(upstream, token) as (relay, agent, proxy),
        http_client(relay.http_url, timeout=REQUEST_TIMEOUT) as client,
    ):
        assert (await client.get("/before")).status_code == 200
        relay_mark, agent_mark = relay.mark(), agent.mark()
        async with trio.open_nursery() as nursery:
            # A transfer in progress: its head and first bytes are through when the link goes silent.
            held = await client.send(client.build_request("GET", "/hold/cut"), stream=True)
            assert held.status_code == 200
            chunks = held.aiter_raw()
            assert await chunks.__anext__() == b"held\n"
            # And a bulk download flowing at full speed, so the agent is busy sending when the link dies:
            # detection must not wait behind its stuck send.
            bulk = await client.send(client.build_request("GET", "/bytes/2000000000"), stream=True)
            bulk_chunks = bulk.aiter_raw()
            received = len(await bulk_chunks.__anext__())
            bulk_error: list[BaseException] = []
            flowing, broken = trio.Event(), trio.Event()

            async def keep_reading() -> None:
                nonlocal received
                try:
                    async for chunk in bulk_chunks:
                        received += len(chunk)
                        if received >= 4 * 1024 * 1024:
                            flowing.set()
                except httpx.TransportError as exc:
                    bulk_error.append(exc)
                broken.set()

            nursery.start_soon(keep_reading)
            with trio.fail_after(BUDGET):
                await flowing.wait()
            proxy.blackhole()  # type: ignore[attr-defined]
            cut_at = trio.current_time()
            # Requests sent into the dead link before anyone noticed: the GET may be resent once the link
            # is known dead (idempotent, nothing answered yet); the POST may have been processed: never resent.
            outcomes: dict[str, int | str] = {}

            async def request(name: str, method: str, path: str) -> None:
                try:
                    response = await client.request(method, path, content=b"x" if method == "POST" else None)
                    outcomes[name] = response.status_code
                except httpx.TransportError as exc:
                    outcomes[name] = repr(exc)

            nursery.start_soon(request, "get", "GET", "/during")
            nursery.start_soon(request, "post", "POST", "/count/during-blackhole")

            with trio.fail_after(BUDGET):
                # The cut transfer fails promptly with a broken connection (its head was already sent).
                with pytest.raises(httpx.TransportError):
                    async for _ in chunks:
                        pass
                note(f"cut transfer failed after {trio.current_time() - cut_at:.2f} s")
                relay_line = await relay.wait_for_line("disconnected", since=relay_mark, timeout=BUDGET)
                note(f"relay noticed after {trio.current_time() - cut_at:.2f} s: {relay_line.string}")
                agent_line = await agent.wait_for_line("connection lost", since=agent_mark, timeout=BUDGET)
                note(f"agent noticed after {trio.current_time() - cut_at:.2f} s: {agent_line.string}")
            with trio.fail_after(BUDGET):
                await broken.wait()
            assert bulk_error, "the bulk download ended normally through a dead link"
            note(f"bulk download broken after {received} bytes: {bulk_error[0]!r}")
            assert re.search(r"no data from the peer|stuck", relay_line.string)
            assert re.search(r"no data from the peer|stuck", agent_line.string)
            proxy.pass_()  # type: ignore[attr-defined]
            await timed("agent back after the link returned", lambda: agent.wait_connected(since=agent_mark))
        assert outcomes["get"] == 200, outcomes
        # 502 if it was written into the dead link; 200 if it had not been written yet (then it was resent).
        assert outcomes["post"] in (502, 200), outcomes
        assert upstream.counts.get("during-blackhole", 0) <= 1
        for i in range(5):
            assert (await client.get(f"/after/{i}")).status_code == 200


# --- restarts -------------------------------------------------------------------------------------------


async def test_relay_killed_and_restarted_agent_is_back_within_the_backoff(
    upstream: Upstream, token: str
) -> None:
    with relay_ports() as ports:
        async with (
            run_relay(token, **ports, extra_args=RELAY_ARGS) as relay,
            run_agent(relay.agents_url, upstream.url, token=token, extra_args=AGENT_ARGS) as agent,
        ):
            mark = agent.mark()
            relay.kill()
            await relay.wait_exit()
            await agent.wait_for_line("connection lost", since=mark)
            # The agent keeps failing while the relay is away (refused), each failure logged with the delay.
            refused = re.compile(r"connection refused; next attempt in \d+\.\d s")
            await agent.wait_for_line(refused, since=mark)
            async with run_relay(token, **ports, extra_args=RELAY_ARGS) as again:
                # Backoff cap 0.5 s: back within the cap plus a connect, far inside this budget.
                await timed("agent back after the relay restarted", lambda: agent.wait_connected(since=mark))
                async with http_client(again.http_url) as client:
                    assert (await client.get("/after-restart")).status_code == 200


async def test_agent_killed_and_replaced_serves_at_once(upstream: Upstream, token: str) -> None:
    async with run_relay(token, extra_args=RELAY_ARGS) as relay, http_client(relay.http_url) as client:
        async with run_agent(relay.agents_url, upstream.url, token=token, extra_args=AGENT_ARGS) as old:
            assert (await client.get("/old")).status_code == 200
            old.kill()
        async with run_agent(relay.agents_url, upstream.url, token=token, extra_args=AGENT_ARGS) as new:
            # No stale slot: the first request after the new agent connected goes through it.
            for i in range(20):
                response = await client.get(f"/new/{i}")
                assert response.status_code == 200, response.text
            assert await new.wait_count(AGENT_ACCESS, 20) == 20
        assert relay.count_lines("agent connected") == 2


# --- cuts under load ------------------------------------------------------------------------------------


async def test_2000_requests_while_the_link_is_cut_at_random_moments(upstream: Upstream, token: str) -> None:
    rng = random.Random(4)
    # A small backoff cap: the test measures what the cuts do to requests, not how long reconnects take.
    agent_args = [*AGENT_ARGS, "--backoff-cap", "0.2"]
    async with tunnel_through_proxy(upstream, token, agent_args=agent_args) as (relay, _, proxy):
        results = Results()
        cuts = 0

        async def cutter() -> None:
            # Cut after a random number of completed requests (so the number of cuts does not depend on the
            # machine's speed), then a random few milliseconds later (so a cut lands anywhere in an exchange).
            nonlocal cuts
            while True:
                await results.wait_total(results.total + rng.randrange(20, 80))
                await trio.sleep(rng.uniform(0, 0.05))
                proxy.cut()  # type: ignore[attr-defined]
                cuts += 1

        async with trio.open_nursery() as nursery:
            nursery.start_soon(cutter)
            start = trio.current_time()
            await run_load(
                relay.http_url, requests=2000, concurrency=50, seed=1, prefix="cut", results=results
            )
            nursery.cancel_scope.cancel()
        elapsed = trio.current_time() - start
        note(f"{results.summary()} in {elapsed:.1f} s with {cuts} cuts")
        note(f"failures by method: {Counter(m for m, _ in results.failures)}")
        for method, outcome in results.failures[:5]:
            note(f"  e.g. {method} {outcome}")
        assert results.total == 2000
        assert_sound(results, upstream)
        # Every GET was safe to resend, and every refused POST too: only POSTs that may have been processed,
        # responses cut after their head, and GETs whose link died under them twice may fail.
        assert all(resent_or_excused(method, outcome) for method, outcome in results.failures)
        assert cuts >= 3 and relay.count_lines("agent connected") > 1
        # Once the cuts stop, everything works.
        after = await run_load(relay.http_url, requests=100, concurrency=10, seed=2, prefix="after")
        assert after.ok == 100, after.summary()


# --- graceful drains ------------------------------------------------------------------------------------


async def test_sigterm_on_an_agent_under_load_with_a_second_agent_fails_nothing(
    upstream: Upstream, token: str
) -> None:
    async with two_agents(upstream, token) as (relay, first, second):
        async with load_until_done(relay.http_url, seed=3, prefix="drain") as results:
            await results.wait_total(200)
            first.send_signal(signal.SIGTERM)
            assert await first.wait_exit(timeout=BUDGET) == 0
            await results.wait_total(results.total + 200)  # the load goes on, on the second agent alone
        served = agent_access_count(first), agent_access_count(second)
        note(f"{results.summary()}; served by the agents: {served}")
        assert min(served) > 0
        assert first.count_lines("received SIGTERM") == 1
        assert results.failed == Counter(), results.failures[:10]
        assert_sound(results, upstream)
        assert len(upstream.counts) == len(results.posted)


async def test_two_agents_share_the_load_and_losing_one_loses_nothing_it_had_not_received(
    upstream: Upstream, token: str
) -> None:
    async with two_agents(upstream, token) as (relay, first, second):
        spread = await run_load(relay.http_url, requests=300, concurrency=30, seed=5, prefix="spread")
        assert spread.ok == 300, spread.summary()
        counts = tuple(await wait_counts([first, second], AGENT_ACCESS, 300))
        note(f"300 requests spread over two agents: {counts}")
        assert min(counts) > 0 and sum(counts) == 300
        async with load_until_done(relay.http_url, seed=6, prefix="kill") as results:
            await results.wait_total(150)
            first.kill()
            await results.wait_total(results.total + 200)
        note(f"{results.summary()} (first agent killed -9 under load)")
        assert_sound(results, upstream)
        # GETs are resent; a POST fails only if the dead agent may have processed it (a clear 502), and
        # nothing the agent never received fails at all.
        assert all(resent_or_excused(method, outcome) for method, outcome in results.failures)
        assert all(o.startswith(("502", "broken")) for _, o in results.failures), results.failures


async def test_sigterm_on_the_relay_lets_exchanges_in_progress_finish(upstream: Upstream, token: str) -> None:
    async with (
        run_relay(token, extra_args=[*RELAY_ARGS, "--grace", "15"]) as relay,
        run_agent(relay.agents_url, upstream.url, token=token, extra_args=AGENT_ARGS),
        http_client(relay.http_url) as client,
        http_client(relay.http_url) as idle_client,
    ):
        assert (await idle_client.get("/idle-keepalive")).status_code == 200
        held = await client.send(client.build_request("GET", "/hold/drain"), stream=True)
        chunks = held.aiter_raw()
        assert await chunks.__anext__() == b"held\n"
        mark = relay.mark()
        relay.send_signal(signal.SIGTERM)
        await relay.wait_for_line("draining", since=mark)
        # No new connections once draining...
        with pytest.raises(OSError):
            await trio.open_tcp_stream(relay.http_host, relay.http_port)
        # ...but the exchange in progress runs to its end.
        upstream.state.release("drain")
        rest = b"".join([chunk async for chunk in chunks])
        assert rest == b"released\n"
        assert await relay.wait_exit(timeout=BUDGET) == 0
        assert relay.count_lines("drained: no exchange left") == 1
        with pytest.raises(httpx.TransportError):
            await idle_client.get("/after-exit")
