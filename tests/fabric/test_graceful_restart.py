"""Graceful restart, receiving side, in the routing controller (pure: fake speaker and FIB).

What the end-to-end agent-restart test relies on, pinned down without namespaces: a peer
whose session drops without a NOTIFICATION keeps its routes (stale) until it sends
End-of-RIB again or its restart time runs out; a NOTIFICATION, or graceful restart switched
off, drops them at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from ipaddress import IPv4Address, ip_network
from typing import Any, TypeVar

from bgp_speaker.bgp.export import Exports
from bgp_speaker.bgp.rib import ImportPolicy
from bgp_speaker.bgp.routes import (
    EndOfRib,
    IPNet,
    KernelRoute,
    NextHop,
    PathAttributes,
    PeerStateChanged,
    PeerType,
    RoutesAnnounced,
    SessionSpec,
    SessionState,
    SpeakerEvent,
    SpeakerRestarted,
)
from bgp_speaker.bgp.speaker import Speaker
from bgp_speaker.overlay.dataplane import OverlayDataplane
from bgp_speaker.routing.controller import RoutingController
from bgp_speaker.routing.desired import DesiredState
from tests.reflection.doubles import FakeFib, FakeReflector, FakeSpeaker

ME, PEER = IPv4Address("10.0.0.11"), IPv4Address("10.0.0.12")
POOL = ip_network("10.244.0.0/16")
BLOCK_1, BLOCK_2 = ip_network("10.244.1.0/26"), ip_network("10.244.2.0/26")


T = TypeVar("T")


def controller(
    graceful_restart_time: int | None,
    speaker: Speaker | None = None,
    overlay: OverlayDataplane | None = None,
) -> tuple[RoutingController, FakeFib]:
    fib = FakeFib()
    routing = RoutingController(
        "n1",
        store=None,  # type: ignore[arg-type]  # nothing here reads the desired state
        speaker=speaker or FakeSpeaker(),
        fib=fib,
        reflector=FakeReflector(),
        overlay=overlay,
    )
    spec = SessionSpec(
        PEER, 64512, 64512, ME, ME, PeerType.MESH, graceful_restart_time=graceful_restart_time
    )
    policy = ImportPolicy(((POOL, 26),), frozenset(), ME, 64512)
    routing.state.desired = DesiredState((spec,), Exports(), policy)
    routing.peering.configured = (spec,)  # as Reconciler.plan_sessions leaves it
    routing.rib.set_sessions([spec])
    routing.rib.set_policy(policy)
    return routing, fib


async def feed(routing: RoutingController, *events: SpeakerEvent) -> None:
    for event in events:
        await routing.kernel.program(routing.speaker_events.handle(event))


def via_peer(*prefixes: IPNet) -> dict[IPNet, KernelRoute]:
    return {p: KernelRoute(p, (NextHop(PEER),)) for p in prefixes}


LEARNED = (
    PeerStateChanged(PEER, SessionState.UP),
    RoutesAnnounced(PEER, (BLOCK_1, BLOCK_2), PathAttributes(PEER)),
    EndOfRib(PEER),
)


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def test_session_lost_without_notification_keeps_routes_until_end_of_rib() -> None:
    async def scenario() -> None:
        routing, fib = controller(120)
        await feed(routing, *LEARNED)
        assert fib.routes == via_peer(BLOCK_1, BLOCK_2)
        await feed(routing, PeerStateChanged(PEER, SessionState.DOWN, "closing connection"))
        assert fib.routes == via_peer(BLOCK_1, BLOCK_2)  # still forwarding
        assert routing.rib.stale(PEER) == 2
        # Back, it announces one block again: the other goes at its End-of-RIB.
        await feed(
            routing,
            PeerStateChanged(PEER, SessionState.UP),
            RoutesAnnounced(PEER, (BLOCK_1,), PathAttributes(PEER)),
        )
        assert fib.routes == via_peer(BLOCK_1, BLOCK_2)
        await feed(routing, EndOfRib(PEER))
        assert fib.routes == via_peer(BLOCK_1)
        assert routing.rib.stale(PEER) == 0
        routing.tasks.cancel()

    run(scenario())


def test_our_speaker_restart_keeps_routes_too() -> None:
    async def scenario() -> None:
        routing, fib = controller(120)
        await feed(routing, *LEARNED, SpeakerRestarted("exabgp exited"))
        assert fib.routes == via_peer(BLOCK_1, BLOCK_2)
        await feed(routing, PeerStateChanged(PEER, SessionState.UP), EndOfRib(PEER))
        assert fib.routes == {}  # nothing announced again
        routing.tasks.cancel()

    run(scenario())


def test_notification_or_no_graceful_restart_drops_at_once() -> None:
    async def scenario(restart: int | None, reason: str) -> dict[IPNet, KernelRoute]:
        routing, fib = controller(restart)
        await feed(routing, *LEARNED, PeerStateChanged(PEER, SessionState.DOWN, reason))
        return fib.routes

    assert run(scenario(120, "notification received (6,2)")) == {}
    assert run(scenario(None, "closing connection")) == {}


def test_stale_routes_go_when_the_restart_time_runs_out() -> None:
    async def scenario() -> None:
        routing, fib = controller(1)
        lost = PeerStateChanged(PEER, SessionState.DOWN, "closing connection")
        await feed(routing, *LEARNED, lost)
        assert fib.routes == via_peer(BLOCK_1, BLOCK_2)
        await asyncio.sleep(1.5)
        assert fib.routes == {}
        assert routing.rib.received(PEER) == 0

    run(scenario())
