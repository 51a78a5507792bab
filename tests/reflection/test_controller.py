"""The routing controller with in-repo fake speaker, reflector and FIB: max-prefix cut-offs
before the kernel, export communities, make-before-break, and what a reflector node hands
BIRD. (The real ExaBGP/BIRD/FRR paths are in tests/interop and tests/reflection/test_bird*.)"""

from __future__ import annotations

import asyncio
from ipaddress import IPv4Address, ip_network

from bgp_speaker.bgp.config import parse_bgp_config
from bgp_speaker.bgp.export import Exports
from bgp_speaker.bgp.peering import PeeringDesired, peer_policy
from bgp_speaker.bgp.rib import ImportPolicy
from bgp_speaker.bgp.routes import (
    EndOfRib,
    IPNet,
    PathAttributes,
    PeerOpened,
    PeerStateChanged,
    PeerType,
    RoutesAnnounced,
    RoutesWithdrawn,
    SessionSpec,
    SessionState,
    SpeakerEvent,
)
from bgp_speaker.routing import speaker_events
from bgp_speaker.routing.controller import RoutingController
from bgp_speaker.routing.desired import DesiredState
from ipam_blocks.store.base import Resource
from tests.reflection.doubles import FakeFib, FakeReflector, FakeSpeaker

ME = IPv4Address("10.0.0.1")
CLUSTER = IPv4Address("244.0.0.1")
C1, C2, TOR = IPv4Address("10.0.0.11"), IPv4Address("10.0.0.12"), IPv4Address("10.0.0.254")
POOL = ip_network("10.244.0.0/16")
B1, B2, OWN = ip_network("10.244.1.0/26"), ip_network("10.244.2.0/26"), ip_network("10.244.9.0/26")


def session(peer, *, client=True, asn=64512, limit=None):
    kind = PeerType.RR_CLIENT if client else PeerType.NODE
    return SessionSpec(peer, asn, 64512, ME, ME, kind, rr_client=client, max_prefixes=limit)


SESSIONS = (session(C1), session(C2), session(TOR, client=False, asn=65001, limit=3))


def reflector() -> tuple[RoutingController, FakeSpeaker, FakeFib]:
    fib, speaker = FakeFib(), FakeSpeaker()
    # No store: nothing here reads the desired state, it is set below.
    routing = RoutingController("rr1", None, speaker, fib, FakeReflector())  # type: ignore[arg-type]
    peering = PeeringDesired(cluster_id=CLUSTER)
    policy = peer_policy(ImportPolicy(((POOL, 26),), frozenset({OWN}), ME, 64512), peering)
    desired = DesiredState(SESSIONS, Exports(frozenset({OWN})), policy, peering)
    routing.state.desired = desired
    routing.peering.set_desired(peering)
    configured = routing.reconciler.plan_sessions(desired)
    routing.rib.set_sessions(configured)
    routing.rib.set_policy(policy)
    speaker.sessions = configured
    return routing, speaker, fib


async def feed(routing: RoutingController, *events: SpeakerEvent) -> None:
    affected: set[IPNet] = set()
    for event in events:
        affected |= routing.speaker_events.handle(event)
    await routing.kernel.program(affected)


def test_max_prefixes_cuts_the_peer_off_before_anything_reaches_the_kernel():
    async def main() -> None:
        routing, _, fib = reflector()
        flood = tuple(ip_network(f"10.244.{i}.0/26") for i in range(20, 25))
        await feed(
            routing,
            PeerStateChanged(TOR, SessionState.UP),
            RoutesAnnounced(TOR, flood[:2], PathAttributes(next_hop=TOR, as_path=(65001,))),
            RoutesAnnounced(TOR, flood[2:], PathAttributes(next_hop=TOR, as_path=(65001,))),
            RoutesAnnounced(TOR, flood[:1], PathAttributes(next_hop=TOR, as_path=(65001,))),
        )
        assert not fib.ever & set(flood)
        assert routing.rib.received(TOR) == 0
        status = {p["address"]: p for p in (await routing.status())["peers"]}
        assert status[str(TOR)]["state"] == "down"
        assert status[str(TOR)]["reason"] == "max-prefixes 3 exceeded (5 received)"
        # The next plan leaves the peer out of ExaBGP; the others stay.
        desired = routing.state.desired
        assert desired is not None
        assert {s.peer_ip for s in routing.reconciler.plan_sessions(desired)} == {C1, C2}

    asyncio.run(main())


def test_a_flood_in_several_updates_is_cut_off_whole():
    async def main() -> None:
        routing, _, fib = reflector()
        flood = tuple(ip_network(f"10.244.{i}.0/26") for i in range(20, 25))
        attrs = PathAttributes(next_hop=TOR, as_path=(65001,))
        await feed(routing, PeerStateChanged(TOR, SessionState.UP))
        # Each UPDATE handled and programmed on its own, as when they arrive apart.
        await feed(routing, RoutesAnnounced(TOR, flood[:2], attrs))  # within the limit (3)
        assert not fib.ever & set(flood)
        await feed(routing, RoutesAnnounced(TOR, flood[2:], attrs))
        assert not fib.ever & set(flood)
        assert routing.peering.limits.is_tripped(TOR)

    asyncio.run(main())


def test_a_limited_peers_initial_table_goes_in_at_its_end_of_rib():
    async def main() -> None:
        routing, _, fib = reflector()
        table = tuple(ip_network(f"10.244.{i}.0/26") for i in range(20, 23))
        attrs = PathAttributes(next_hop=TOR, as_path=(65001,))
        await feed(routing, PeerStateChanged(TOR, SessionState.UP))
        await feed(routing, RoutesAnnounced(TOR, table, attrs))
        assert not fib.ever & set(table)
        await feed(routing, EndOfRib(TOR))
        assert set(table) <= set(fib.routes)
        # Later updates go in as they come (one more would trip the limit: withdraw first).
        await feed(routing, RoutesWithdrawn(TOR, table[:1]), RoutesAnnounced(TOR, (B2,), attrs))
        assert B2 in fib.routes and table[0] not in fib.routes

    asyncio.run(main())


def test_a_limited_peer_without_end_of_rib_is_installed_after_a_wait(monkeypatch):
    monkeypatch.setattr(speaker_events, "INITIAL_TABLE_WAIT", 0.05)

    async def main() -> None:
        routing, _, fib = reflector()
        table = tuple(ip_network(f"10.244.{i}.0/26") for i in range(20, 22))
        await feed(routing, PeerStateChanged(TOR, SessionState.UP))
        await feed(routing, RoutesAnnounced(TOR, table, PathAttributes(next_hop=TOR)))
        assert not fib.ever & set(table)
        await asyncio.sleep(0.3)
        assert set(table) <= set(fib.routes)

    asyncio.run(main())


def test_routes_from_a_session_no_longer_configured_are_ignored():
    async def main() -> None:
        routing, _, fib = reflector()
        gone = IPv4Address("10.0.0.99")  # removed; ExaBGP has not reloaded yet
        attrs = PathAttributes(next_hop=gone)
        await feed(routing, PeerStateChanged(gone, SessionState.UP),
                   RoutesAnnounced(gone, (B1,), attrs), EndOfRib(gone))  # fmt: skip
        assert B1 not in fib.ever and routing.rib.received(gone) == 0

    asyncio.run(main())


def test_export_communities_and_re_announce_when_they_change():
    async def main() -> None:
        routing, _, _ = reflector()
        cfg = parse_bgp_config(Resource("BGPConfiguration", "default", {
            "prefixAdvertisements": [{"cidr": "10.244.0.0/16", "communities": ["64512:100"]}],
        }))  # fmt: skip
        routing.peering.set_desired(PeeringDesired(cluster_id=CLUSTER, communities=cfg))
        assert routing.peering.export_changes({OWN}) == {("64512:100",): [OWN]}
        assert routing.peering.export_changes({OWN}) == {}
        routing.peering.set_desired(PeeringDesired(cluster_id=CLUSTER))
        assert routing.peering.export_changes({OWN}) == {(): [OWN]}
        assert routing.peering.export_changes(set()) == {}
        assert routing.peering.exported == {}

    asyncio.run(main())


def test_a_peer_whose_password_cannot_be_read_is_desired_but_not_configured(tmp_path):
    from netaddr import IPNetwork

    from bgp_speaker.bgp.peering import Peering, read_peering
    from bgp_speaker.bgp.rib import Rib
    from bgp_speaker.routing.caches import PasswordCache
    from ipam_blocks.model import Node

    me = Node("n1", {}, IPNetwork("10.0.0.11/24"))
    (tmp_path / "pw").write_text("s3cret\n")
    peers = [
        Resource("BGPPeer", "ok", {"peerIP": "10.0.0.254", "asNumber": 65001,
                                   "password": {"file": str(tmp_path / "pw")}}),
        Resource("BGPPeer", "nopw", {"peerIP": "10.0.0.253", "asNumber": 65001,
                                     "password": {"file": str(tmp_path / "missing")}}),
    ]  # fmt: skip
    # File passwords only: the store is not read.
    passwords = PasswordCache(None)  # type: ignore[arg-type]
    sessions, desired = read_peering(passwords.resolve, me, [me], parse_bgp_config(None), peers)
    by_ip = {str(s.peer_ip): s for s in sessions}
    assert by_ip["10.0.0.254"].md5_password == "s3cret"
    assert by_ip["10.0.0.253"].md5_password is None
    peering = Peering(Rib())
    peering.set_desired(desired)
    planned = peering.plan_sessions(sessions, set(), set(), now=0)
    assert [str(s.peer_ip) for s in planned] == ["10.0.0.254"]
    assert "waiting for its password" in peering.note(IPv4Address("10.0.0.253"))
    assert "cannot read" in peering.note(IPv4Address("10.0.0.253"))


def test_a_new_session_without_graceful_restart_completes_a_handover_without_end_of_rib():
    """The mesh session to C1 is replaced by one to an external reflector that negotiated no
    graceful restart and so owes no End-of-RIB: once it is up and carries C1's routes, C1
    goes after the settle time, not after the handover's 90 s wait (issue 15, item 11)."""
    routing, _, _ = reflector()
    routing.peering.handover.settle = 0.0
    peering = PeeringDesired(node_addresses=frozenset({C1}))
    policy = ImportPolicy(((POOL, 26),), frozenset({OWN}), ME, 64512)
    mesh = SessionSpec(C1, 64512, 64512, ME, ME, PeerType.MESH)
    to_rr = SessionSpec(TOR, 65001, 64512, ME, ME, PeerType.RR)

    def plan(*sessions: SessionSpec) -> set[IPv4Address]:
        desired = DesiredState(sessions, Exports(frozenset({OWN})), policy, peering)
        routing.state.desired = desired
        routing.peering.set_desired(peering)
        planned = routing.reconciler.plan_sessions(desired)
        routing.rib.set_sessions(planned)
        return {s.peer_ip for s in planned}

    async def main() -> None:
        assert plan(mesh) == {C1}
        via_c1, from_rr = PathAttributes(next_hop=C1), PathAttributes(C1, as_path=(65001,))
        await feed(routing, PeerOpened(C1, C1, 120), PeerStateChanged(C1, SessionState.UP),
                   RoutesAnnounced(C1, (B1,), via_c1), EndOfRib(C1))  # fmt: skip
        assert plan(to_rr) == {C1, TOR}  # C1 retires until TOR carries its routes
        await feed(routing, PeerOpened(TOR, TOR, None), PeerStateChanged(TOR, SessionState.UP),
                   RoutesAnnounced(TOR, (B1,), from_rr))  # fmt: skip
        plan(to_rr)  # the settle time starts
        await asyncio.sleep(0.05)
        assert plan(to_rr) == {TOR}

    asyncio.run(main())


def test_a_reflector_reports_birds_sessions_in_status_view_and_metrics():
    from prometheus_client import CollectorRegistry, generate_latest
    from rich.console import Console

    from bgp_speaker.agent.metrics import AgentCollector
    from bgp_speaker.bgp.reflection import (
        ReflectorSessionState,
        node_speaker_session,
        reflector_desired,
    )
    from l3fabric.views.node_status import render_node_status

    routing, _, _ = reflector()
    loopback = node_speaker_session(ME, 64512, 90, None, 120)
    bird = reflector_desired(ME, CLUSTER, 64512, ((POOL, 26),), SESSIONS[:2], loopback,
                             frozenset(), {})  # fmt: skip
    desired = routing.state.desired
    assert desired is not None
    routing.state.desired = DesiredState((loopback,), desired.exports, desired.policy,
                                         desired.peering, reflector=bird)  # fmt: skip
    fake = routing.reflector
    assert isinstance(fake, FakeReflector)
    fake.apply(bird)
    fake.reported = (
        ReflectorSessionState("peer_10_0_0_11", C1, "Established", 1000.0, "Established", 4, 7),
        ReflectorSessionState("peer_10_0_0_12", C2, "Active", 900.0, "Active",
                              last_error="Socket: Connection refused"),
    )  # fmt: skip
    status = asyncio.run(routing.status())
    peers = {p["address"]: p for p in status["peers"]}
    assert peers[str(C1)] | {} == {
        "address": str(C1), "type": "rr-client", "state": "established", "since": 1000.0,
        "received": 4, "accepted": 4, "advertised": 7, "reason": "", "speaker": "bird",
    }  # fmt: skip
    assert peers[str(C2)]["state"] == "active"
    assert peers[str(C2)]["reason"] == "Socket: Connection refused"
    assert peers["127.0.0.1"]["speaker"] == "exabgp"

    console = Console(record=True, width=200)
    console.print(render_node_status(status, now=1010.0))
    text = console.export_text()
    assert "rr-client (BIRD)" in text and "route reflector: BIRD running" in text

    registry = CollectorRegistry()
    registry.register(AgentCollector(lambda: status, lambda: 0))
    scraped = generate_latest(registry).decode()
    assert "l3fabric_bird_running 1.0" in scraped
    assert 'l3fabric_bgp_prefixes_received{peer="10.0.0.11"} 4.0' in scraped
