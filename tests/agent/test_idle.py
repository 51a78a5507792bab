"""A node that idles (issue 13, point 2): nothing wakes the agent, ExaBGP or the relay while
nothing changes, and what must stay exact does.

- The agent's hold-timer watch sleeps until the next deadline (controller, fake speaker):
  it looks a few times per hold time, not ten times a second, and still drops a silent peer
  right at its hold time, also one whose timer started while the watch slept on a later one.
- Real ExaBGP speakers (`ExaBGPSpeaker`: ExaBGP, the relay) in namespaces, hold time 3 s
  (keepalive 1 s): an idle node's ExaBGP and relay stay under a CPU budget, keepalives still
  leave on time, an API announce reaches the peer within milliseconds, and a burst of routes
  is not paced by the reactor's idle sleep.
- A real lab (`l3fabric lab up`, three agents, two sessions each): the agent's event loop
  wakes rarely while idle, and the whole node (agent, ExaBGP, relay) stays under 1 % of a
  core.

CPU figures are CPU seconds from /proc (not wall clock), so a busy machine slows the test
but hardly moves them; the budgets sit between the figures measured before and after the
fix (see each test). Run with ``-s`` to see the figures.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import os
import statistics
import time
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address, IPv4Network, ip_address
from pathlib import Path

import pytest

from bgp_speaker.bgp.routes import (
    EndOfRib,
    IPAddr,
    PathAttributes,
    PeerAlive,
    PeerOpened,
    PeerStateChanged,
    RoutesAnnounced,
    SessionState,
    SpeakerEvent,
)
from tests.bgp_speaker.conftest import ExaBGPLab, Node, mesh_session, needs_exabgp_root
from tests.fabric.harness import CONVERGE, eventually, mesh3_document, needs_fabric, running_lab
from tests.fabric.test_graceful_restart import BLOCK_1, BLOCK_2, LEARNED, PEER, controller, feed

HZ = os.sysconf("SC_CLK_TCK")

# --- the hold-timer watch ---------------------------------------------------------------------


def test_the_hold_watch_sleeps_until_the_next_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario() -> None:
        routing, fib = controller(None)  # no graceful restart: a lost peer's routes go at once
        timers = routing.timers
        looks: list[float] = []
        expired = timers.hold_timers.expired

        def counted(now: float) -> list[IPAddr]:
            looks.append(now)
            return expired(now)

        monkeypatch.setattr(timers.hold_timers, "expired", counted)
        watch = asyncio.get_running_loop().create_task(timers.watch())
        await feed(routing, PeerOpened(PEER, PEER, None, 3), *LEARNED)  # hold 3 s
        await asyncio.sleep(1.5)
        timers.heard(PeerAlive(PEER))  # a keepalive: its timer now runs out 3 s from here
        heard = time.monotonic()
        while fib.routes:
            await asyncio.sleep(0.002)
        silent = time.monotonic() - heard
        watch.cancel()
        # Dropped right after 3 s of silence (a 100 ms tick made this 3.0-3.1 s)...
        assert 3.0 <= silent <= 3.1, silent
        # ...after looking at the timers when one could run out: at the start, at the first
        # deadline (moved by the keepalive), at the second. A 100 ms tick looked 45 times.
        assert len(looks) <= 4, len(looks)

    asyncio.run(scenario())


def test_a_shorter_timer_started_while_the_watch_sleeps_is_not_slept_past() -> None:
    other = IPv4Address("10.0.0.13")
    block_3 = IPv4Network("10.244.3.0/26")

    async def scenario() -> None:
        routing, fib = controller(None)
        desired = routing.state.desired
        assert desired is not None
        second = dataclasses.replace(desired.sessions[0], peer_ip=other)
        routing.state.desired = dataclasses.replace(desired, sessions=(*desired.sessions, second))
        routing.peering.configured = routing.state.desired.sessions
        routing.rib.set_sessions(routing.state.desired.sessions)
        watch = asyncio.get_running_loop().create_task(routing.timers.watch())
        await feed(routing, PeerOpened(PEER, PEER, None, 90), *LEARNED)  # sleeps ~90 s
        await asyncio.sleep(0.2)
        started = time.monotonic()  # before its session comes up: its 3 s count from later
        await feed(
            routing,
            PeerOpened(other, other, None, 3),
            PeerStateChanged(other, SessionState.UP),
            RoutesAnnounced(other, (block_3,), PathAttributes(other)),
            EndOfRib(other),
        )
        while block_3 in fib.routes:
            await asyncio.sleep(0.002)
        silent = time.monotonic() - started
        watch.cancel()
        assert 3.0 <= silent <= 3.1, silent
        assert set(fib.routes) == {BLOCK_1, BLOCK_2}  # the 90 s peer is still there

    asyncio.run(scenario())


# --- CPU and wakeups from /proc ---------------------------------------------------------------


def _process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (ExaBGP and its relay)."""
    tree = [pid]
    for task in Path(f"/proc/{pid}/task").iterdir():
        children = (task / "children").read_text().split()
        for child in children:
            tree += _process_tree(int(child))
    return tree


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of these processes (all their threads), in seconds."""
    ticks = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        ticks += int(fields[11]) + int(fields[12])
    return ticks / HZ


def _main_thread_wakeups(pid: int) -> int:
    """How often the process's main thread (its event loop) went to sleep and woke again."""
    status = Path(f"/proc/{pid}/task/{pid}/status").read_text()
    return int(next(line for line in status.splitlines()
                    if line.startswith("voluntary_ctxt_switches")).split()[1])  # fmt: skip


# --- real ExaBGP speakers, hold time 3 s ------------------------------------------------------

A, B, C = "10.0.0.1", "10.0.0.2", "10.0.0.3"
IDLE_WINDOW = 10.0  # seconds


@pytest.fixture(scope="module")
def idle_speakers(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[ExaBGPLab, Node, Node]]:
    """Speaker A with two sessions (to B and C), hold time 3 s: keepalives every second."""
    lab = ExaBGPLab(tmp_path_factory.mktemp("idle"), prefix=f"l3c-{os.getpid() % 10000}i")
    try:
        ns_a, ns_b = lab.netns("a"), lab.netns("b")
        lab.link(ns_a, A, ns_b, B)
        lab.add_address(ns_b, C)
        b = lab.node("b", ns_b, B)
        c = lab.node("c", ns_b, C)
        a = lab.node("a", ns_a, A)
        lab.run(b.speaker.set_sessions([mesh_session(B, A, passive=True, hold_time=3)]))
        lab.run(c.speaker.set_sessions([mesh_session(C, A, passive=True, hold_time=3)]))
        lab.run(a.speaker.set_sessions([mesh_session(A, peer, passive=False, hold_time=3)
                                        for peer in (B, C)]))  # fmt: skip
        for peer in (B, C):
            lab.run(a.log.wait(_up(peer), timeout=30))
        lab.run(asyncio.sleep(2))  # past the first updates and End-of-RIBs
        yield lab, a, b
    finally:
        lab.close()


def _up(peer: str) -> Callable[[SpeakerEvent], bool]:
    return lambda e: (
        isinstance(e, PeerStateChanged)
        and e.peer == ip_address(peer)
        and e.state == SessionState.UP
    )


@pytest.mark.root
@needs_exabgp_root
def test_an_idle_exabgp_and_relay_stay_well_under_one_percent(
    idle_speakers: tuple[ExaBGPLab, Node, Node],
) -> None:
    lab, a, _ = idle_speakers
    assert a.speaker.pid is not None
    tree = _process_tree(a.speaker.pid)
    assert len(tree) == 2, tree  # ExaBGP and its relay
    before = _cpu_seconds(tree)
    lab.run(asyncio.sleep(IDLE_WINDOW))  # the agent's side keeps reading events meanwhile
    used = _cpu_seconds(tree) - before
    print(f"\nExaBGP + relay, 2 idle sessions: {used:.2f} CPU s in {IDLE_WINDOW:g} s")
    # Measured, 2 sessions: reactor speed 0.5 ~4.5 % of a core (0.45 s in 10 s), 20 ~0.3 %.
    assert used <= 0.006 * IDLE_WINDOW, f"{used:.2f} CPU s in {IDLE_WINDOW:g} s"


@pytest.mark.root
@needs_exabgp_root
def test_keepalives_still_leave_every_second(idle_speakers: tuple[ExaBGPLab, Node, Node]) -> None:
    lab, _, b = idle_speakers
    mark = len(b.raw)
    lab.run(asyncio.sleep(6))
    sent = [
        message["time"]
        for message in map(json.loads, b.raw[mark:])
        if message.get("type") == "keepalive"
        and message["neighbor"]["address"]["peer"] == A
        and message["neighbor"]["direction"] == "receive"
    ]
    gaps = [later - earlier for earlier, later in itertools.pairwise(sent)]
    print(f"\nkeepalives A -> B, seconds apart: {[round(gap, 3) for gap in gaps]}")
    assert len(sent) >= 5, sent
    # ExaBGP sends on whole seconds, noticed within one reactor sleep (0.2 s at speed 20):
    # 1 s apart give or take that, far inside the hold time of 3 s.
    assert max(gaps) <= 1.3, gaps


@pytest.mark.root
@needs_exabgp_root
def test_an_api_announce_reaches_the_peer_within_milliseconds(
    idle_speakers: tuple[ExaBGPLab, Node, Node],
) -> None:
    lab, a, b = idle_speakers
    delays = []
    for n in range(15):
        prefix = IPv4Network(f"10.61.{n}.0/26")
        lab.run(asyncio.sleep(0.137))  # out of step with the reactor's loop
        mark = b.log.mark()
        started = time.monotonic()
        lab.run(a.speaker.announce([prefix]))
        lab.run(b.log.wait(lambda e, p=prefix: isinstance(e, RoutesAnnounced)  # type: ignore[misc]
                           and p in e.prefixes, since=mark))  # fmt: skip
        delays.append(time.monotonic() - started)
    print(f"\nannounce -> peer, ms: {[round(1000 * d, 1) for d in delays]}")
    # API -> A's ExaBGP -> wire -> B's ExaBGP -> B's relay -> B's speaker: 3-12 ms measured
    # on a busy shared machine, at every reactor speed (an API command wakes the reactor).
    assert statistics.median(delays) <= 0.020, delays


@pytest.mark.root
@needs_exabgp_root
def test_a_burst_of_routes_is_not_slowed_by_the_idle_reactor(
    idle_speakers: tuple[ExaBGPLab, Node, Node],
) -> None:
    """The slow idle loop must not pace API intake: 2,000 prefixes in lines of 1,000 waited
    20 reactor sleeps per line (8 s at speed 20); in lines ExaBGP takes in one loop, each
    ack brings the next line, which wakes the reactor."""
    lab, a, b = idle_speakers
    prefixes = [IPv4Network(f"10.{62 + n // 256}.{n % 256}.0/26") for n in range(2_000)]
    wanted = set(prefixes)

    async def burst() -> float:
        mark = b.log.mark()
        started = time.monotonic()
        await a.speaker.announce(prefixes)
        seen: set[IPv4Network] = set()
        while not wanted <= seen:
            await b.log.wait(lambda e: isinstance(e, RoutesAnnounced), since=mark, timeout=30)
            seen.update(p for e in b.log.since(mark) if isinstance(e, RoutesAnnounced)
                        for p in e.prefixes)  # fmt: skip
            mark = b.log.mark()
        return time.monotonic() - started

    took = lab.run(burst())
    lab.run(a.speaker.withdraw(prefixes))
    print(f"\n2,000 prefixes at the peer in {took:.2f} s")
    assert took <= 3.0, took


# --- a real lab: three agents, two sessions each ----------------------------------------------


@pytest.mark.root
@pytest.mark.slow
@needs_fabric
def test_an_idle_lab_node_wakes_rarely_and_stays_under_one_percent(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    with running_lab(tmp_path_factory.mktemp("idle-lab"), mesh3_document()) as fabric:
        eventually(
            lambda: [f"{node}: {fabric.peers(node)}" for node in fabric.nodes
                     if sum(p["state"] == "established"
                            for p in fabric.peers(node).values()) != 2],
            CONVERGE, "every node to have its two sessions",
        )  # fmt: skip
        time.sleep(3)  # past the first updates
        agents = {node: fabric.agent_pid(node) for node in fabric.nodes}
        speakers = {node: _process_tree(fabric.exabgp_pid(node)) for node in fabric.nodes}
        nodes = {node: _process_tree(pid) for node, pid in agents.items()}  # all of it
        wakeups = {node: _main_thread_wakeups(pid) for node, pid in agents.items()}
        cpu = {node: _cpu_seconds(tree) for node, tree in speakers.items()}
        total = {node: _cpu_seconds(tree) for node, tree in nodes.items()}
        time.sleep(IDLE_WINDOW)
        woke = {node: _main_thread_wakeups(pid) - wakeups[node] for node, pid in agents.items()}
        used = {node: _cpu_seconds(tree) - cpu[node] for node, tree in speakers.items()}
        total = {node: _cpu_seconds(tree) - total[node] for node, tree in nodes.items()}
    print(f"\nidle {IDLE_WINDOW:g} s: agent loop wakeups {woke}, CPU s: ExaBGP + relay {used}, "
          f"node {total}")  # fmt: skip
    # Measured: a 100 ms hold-timer tick woke each agent's loop >10 times a second; now the
    # TCP-MD5 look every 2 s, keepalives (hold 90 s: one per peer per 30 s) and timers due.
    assert all(n <= 3 * IDLE_WINDOW for n in woke.values()), woke
    # ExaBGP and relay per node: ~5 % of a core at reactor speed 0.5, 0.1-0.3 % at 20.
    assert all(s <= 0.01 * IDLE_WINDOW for s in used.values()), used
    # The whole node (agent with its store watches, ExaBGP, relay), issue 13's budget of 1 %
    # with <= 4 sessions: 7.6 % before (agent 2.3, ExaBGP 5.3), 0.4 % after.
    assert all(s <= 0.01 * IDLE_WINDOW for s in total.values()), total
