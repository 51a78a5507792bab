"""Route reflection rules (RFC 4456), pure: who gets which path, with which attributes."""

from __future__ import annotations

import random
from ipaddress import IPv4Address, ip_network

from bgp_speaker.bgp.reflector import AdjRibOut, Neighbour, Reflector, neighbours_from_sessions
from bgp_speaker.bgp.rib import ImportPolicy, Rib
from bgp_speaker.bgp.routes import PathAttributes, PeerType, SessionSpec

ME = IPv4Address("10.0.0.1")
CLUSTER = IPv4Address("244.0.0.1")
C1, C2, C3 = IPv4Address("10.0.0.11"), IPv4Address("10.0.0.12"), IPv4Address("10.0.0.13")
RR2 = IPv4Address("10.0.0.2")  # another reflector of our cluster
NC = IPv4Address("10.0.0.50")  # a non-client iBGP peer (a reflector of another cluster)
EXT = IPv4Address("192.0.2.1")  # eBGP
BLOCK = ip_network("10.244.1.0/26")
POOL = ip_network("10.244.0.0/16")


def session(peer, *, client=False, asn=64512, kind=PeerType.RR_CLIENT):
    return SessionSpec(peer, asn, 64512, ME, ME, kind, rr_client=client)


SESSIONS = [
    session(C1, client=True),
    session(C2, client=True),
    session(C3, client=True),
    session(RR2, kind=PeerType.NODE),
    session(NC, kind=PeerType.NODE),
    session(EXT, asn=65001, kind=PeerType.NODE),
]


def rib_with(*paths: tuple[IPv4Address, PathAttributes]) -> Rib:
    rib = Rib(ImportPolicy(((POOL, 26),), frozenset(), ME, 64512))
    rib.set_sessions(SESSIONS)
    for peer, attrs in paths:
        rib.announce(peer, [BLOCK], attrs)
    return rib


def reflector(router_ids=None) -> Reflector:
    neighbours = neighbours_from_sessions(
        SESSIONS, router_ids or {}, {RR2: CLUSTER, NC: IPv4Address("244.0.0.9")}
    )
    return Reflector(CLUSTER, neighbours)


def test_ebgp_sessions_are_no_neighbours():
    assert set(reflector().neighbours) == {C1, C2, C3, RR2, NC}


def test_client_route_goes_to_other_clients_and_non_clients_with_originator_and_cluster():
    attrs = PathAttributes(next_hop=C1, local_pref=100, med=7, communities=("64512:1",))
    rib = rib_with((C1, attrs))
    out = reflector({C1: IPv4Address("1.1.1.1")}).routes_for(rib.select(BLOCK))
    # Not back to C1, not to RR2 (same cluster: it would drop it), to C2, C3 and NC.
    assert set(out) == {C2, C3, NC}
    want = PathAttributes(
        next_hop=C1, local_pref=100, med=7, communities=("64512:1",),
        originator_id=IPv4Address("1.1.1.1"),  # the client's BGP identifier, from its OPEN
        cluster_list=(CLUSTER,),
    )  # fmt: skip
    assert all(a == want for a in out.values())


def test_originator_is_the_peer_address_until_its_open_is_known():
    rib = rib_with((C1, PathAttributes(next_hop=C1)))
    out = reflector().routes_for(rib.select(BLOCK))
    assert {a.originator_id for a in out.values()} == {C1}


def test_non_client_route_goes_to_clients_only_and_keeps_originator_and_prepends_cluster():
    learned = PathAttributes(
        next_hop=IPv4Address("10.0.0.60"), originator_id=IPv4Address("10.0.0.60"),
        cluster_list=(IPv4Address("244.0.0.9"),),
    )  # fmt: skip
    out = reflector().routes_for(rib_with((NC, learned)).select(BLOCK))
    assert set(out) == {C1, C2, C3}
    for attrs in out.values():
        assert attrs.originator_id == IPv4Address("10.0.0.60")
        assert attrs.cluster_list == (CLUSTER, IPv4Address("244.0.0.9"))
        assert attrs.next_hop == IPv4Address("10.0.0.60")


def test_never_to_the_originator():
    # C2's route reflected by another cluster comes back via NC: C2 must not get it.
    learned = PathAttributes(next_hop=C2, originator_id=C2, cluster_list=(NC,))
    out = reflector().routes_for(rib_with((NC, learned)).select(BLOCK))
    assert set(out) == {C1, C3}


def test_ebgp_paths_are_not_reflected():
    out = reflector().routes_for(
        rib_with((EXT, PathAttributes(next_hop=EXT, as_path=(65001,)))).select(BLOCK)
    )
    assert out == {}


def test_next_hop_self_for_neighbours_that_ask():
    neighbours = neighbours_from_sessions(SESSIONS, {}, {}, next_hop_self={C3})
    out = Reflector(CLUSTER, neighbours).routes_for(
        rib_with((C1, PathAttributes(next_hop=C1))).select(BLOCK)
    )
    assert out[C2].next_hop == C1 and out[C3].next_hop == ME


def test_best_path_is_deterministic_whatever_the_arrival_order():
    paths = [
        (C1, PathAttributes(next_hop=C1, local_pref=100)),
        (C2, PathAttributes(next_hop=C2, local_pref=100)),
        (NC, PathAttributes(next_hop=C3, originator_id=C3, cluster_list=(NC,))),
    ]
    seen = set()
    for seed in range(6):
        random.Random(seed).shuffle(paths)
        selection = rib_with(*paths).select(BLOCK)
        assert selection is not None
        seen.add(selection.best.peer)
        out = reflector().routes_for(selection)
        seen.add(tuple(sorted((str(k), v.originator_id) for k, v in out.items())))
    # One winner: shortest CLUSTER_LIST first (0 beats NC's 1), then the lowest router id.
    assert C1 in seen and len(seen) == 2, seen


def test_higher_local_pref_wins_over_shorter_cluster_list():
    paths = [
        (C1, PathAttributes(next_hop=C1, local_pref=100)),
        (NC, PathAttributes(next_hop=C3, originator_id=C3, cluster_list=(NC,), local_pref=200)),
    ]
    assert rib_with(*paths).select(BLOCK).best.peer == NC


def test_adj_rib_out_sends_only_changes():
    out = AdjRibOut()
    a1 = PathAttributes(next_hop=C1, originator_id=C1, cluster_list=(CLUSTER,))
    a2 = PathAttributes(next_hop=C2, originator_id=C2, cluster_list=(CLUSTER,))
    other = ip_network("10.244.2.0/26")
    changes = out.update({BLOCK: {C2: a1, C3: a1}, other: {C3: a2}}, [C2, C3])
    assert changes.announce == {C2: {a1: [BLOCK]}, C3: {a1: [BLOCK], a2: [other]}}
    assert not changes.withdraw and changes.routes == 3
    assert not out.update({BLOCK: {C2: a1, C3: a1}}, [C2, C3])  # same again: nothing to send
    changes = out.update({BLOCK: {C2: a2}, other: {}}, [C2, C3])
    assert changes.announce == {C2: {a2: [BLOCK]}}
    assert changes.withdraw == {C3: [BLOCK, other]}
    assert out.neighbours() == {C2} and out.count(C2) == 1
    out.forget([C2])
    assert out.routes == {}


def test_changes_for_several_neighbours_go_out_once_per_neighbour_set():
    out = AdjRibOut()
    a1 = PathAttributes(next_hop=C1, originator_id=C1, cluster_list=(CLUSTER,))
    a2 = PathAttributes(next_hop=C2, originator_id=C2, cluster_list=(CLUSTER,))
    other, third = ip_network("10.244.2.0/26"), ip_network("10.244.3.0/26")
    changes = out.update(
        {BLOCK: {C2: a1, C3: a1}, other: {C2: a1, C3: a1}, third: {C3: a1, C1: a2}},
        [C1, C2, C3],
    )
    assert sorted(changes.announce_groups(), key=str) == sorted(
        [((C2, C3), a1, [BLOCK, other]), ((C3,), a1, [third]), ((C1,), a2, [third])], key=str
    )
    changes = out.update({BLOCK: {}, other: {C2: a1}, third: {}}, [C1, C2, C3])
    assert sorted(changes.withdraw_groups(), key=str) == sorted(
        [((C2, C3), [BLOCK]), ((C3,), [other]), ((C1, C3), [third])], key=str
    )
    assert changes.announce_groups() == []


def test_neighbour_identity_prefers_router_id():
    n = Neighbour(C1, True, ME)
    assert n.identity == C1
    assert Neighbour(C1, True, ME, router_id=IPv4Address("9.9.9.9")).identity == IPv4Address(
        "9.9.9.9"
    )
