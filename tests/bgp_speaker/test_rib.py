"""RIB: import policy, best path, ECMP, peer loss (pure, no root)."""

from ipaddress import IPv4Address, ip_address, ip_network

import pytest

from bgp_speaker.bgp.rib import ImportPolicy, Rib, desired_routes, kernel_route
from bgp_speaker.bgp.routes import KernelRoute, NextHop, PathAttributes, PeerType, SessionSpec

ME = IPv4Address("10.0.0.1")
A, B, C = (ip_address(f"10.0.0.{i}") for i in (2, 3, 4))
POOL = ip_network("10.244.0.0/16")
OWN = ip_network("10.244.1.0/26")


def session(peer, peer_as=64512, peer_type=PeerType.MESH):
    return SessionSpec(peer, peer_as, 64512, ME, ME, peer_type)


def attrs(next_hop, **kw):
    return PathAttributes(next_hop=next_hop, **kw)


@pytest.fixture
def rib():
    r = Rib(ImportPolicy(((POOL, 26),), frozenset({OWN}), ME, 64512))
    r.set_sessions([session(A), session(B), session(C, peer_as=65000, peer_type=PeerType.NODE)])
    return r


def test_accepts_pool_blocks_and_longer(rib):
    block, host = ip_network("10.244.2.0/26"), ip_network("10.244.1.7/32")
    rib.announce(A, [block, host], attrs(A))
    assert rib.select(block).best.peer == A
    # a /32 borrowed from our own block is someone else's address: it must be accepted
    assert rib.select(host).best.peer == A
    assert rib.accepted(A) == 2


@pytest.mark.parametrize(
    "prefix, reason",
    [
        ("192.168.0.0/24", "outside-pools"),
        ("10.244.0.0/16", "shorter-than-block"),
        ("10.244.0.0/24", "shorter-than-block"),
        ("10.244.1.0/26", "own-block"),
    ],
)
def test_policy_drops_and_counts(rib, prefix, reason):
    rib.announce(A, [ip_network(prefix)], attrs(A))
    assert rib.select(ip_network(prefix)) is None
    assert rib.counters[A].dropped == {reason: 1}
    assert rib.received(A) == 1 and rib.accepted(A) == 0
    assert rib.dropped_total() == {reason: 1}


def test_drops_routes_we_originated_or_looped(rib):
    p = ip_network("10.244.3.0/26")
    rib.announce(A, [p], attrs(A, originator_id=ME))
    rib.announce(C, [p], attrs(C, as_path=(65000, 64512)))
    assert rib.select(p) is None
    assert rib.counters[A].dropped == {"own-originator": 1}
    assert rib.counters[C].dropped == {"as-path-loop": 1}


def test_ecmp_when_paths_tie_and_best_is_deterministic(rib):
    p = ip_network("10.244.4.0/26")
    rib.announce(B, [p], attrs(B))
    rib.announce(A, [p], attrs(A))
    sel = rib.select(p)
    assert {x.peer for x in sel.multipath} == {A, B}
    assert sel.best.peer == A  # lowest router id breaks the tie
    assert kernel_route(p, sel) == KernelRoute(p, (NextHop(A), NextHop(B)))


def test_preference_order(rib):
    p = ip_network("10.244.5.0/26")
    rib.announce(A, [p], attrs(A, as_path=(1, 2)))
    rib.announce(B, [p], attrs(B, as_path=(1,)))
    assert rib.select(p).best.peer == B and len(rib.select(p).multipath) == 1
    rib.announce(A, [p], attrs(A, local_pref=200, as_path=(1, 2)))
    assert rib.select(p).best.peer == A
    # eBGP beats iBGP when everything before ties
    q = ip_network("10.244.6.0/26")
    rib.announce(A, [q], attrs(A, as_path=(65000,)))
    rib.announce(C, [q], attrs(C, as_path=(65000,)))
    assert rib.select(q).best.peer == C


def test_withdraw_and_peer_loss(rib):
    p, q = ip_network("10.244.7.0/26"), ip_network("10.244.8.0/26")
    rib.announce(A, [p, q], attrs(A))
    rib.announce(B, [p], attrs(B))
    assert rib.withdraw(A, [p]) == {p}
    assert rib.select(p).best.peer == B
    assert rib.drop_peer(A) == {q}
    assert rib.select(q) is None
    assert desired_routes(rib, [p, q]) == {p: KernelRoute(p, (NextHop(B),)), q: None}
    # withdrawing what a peer never sent changes nothing
    assert rib.withdraw(A, [p]) == set()


def test_policy_change_reevaluates_learned_routes(rib):
    p = ip_network("10.244.9.0/26")
    rib.announce(A, [p], attrs(A))
    assert rib.select(p) is not None
    affected = rib.set_policy(ImportPolicy(((POOL, 26),), frozenset({OWN, p}), ME, 64512))
    assert p in affected and rib.select(p) is None


def test_unwanted_peers_are_forgotten(rib):
    p = ip_network("10.244.10.0/26")
    rib.announce(B, [p], attrs(B))
    assert rib.set_sessions([session(A)]) == {p}
    assert rib.select(p) is None
