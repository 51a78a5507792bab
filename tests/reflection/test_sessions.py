"""Which sessions a node configures: selector peerings both ways, reflectors and their
clients, make-before-break handover, max-prefix cut-offs (pure)."""

from __future__ import annotations

from ipaddress import IPv4Address, ip_address, ip_network

from netaddr import IPNetwork

from bgp_speaker.bgp.config import BgpConfig, parse_bgp_peer
from bgp_speaker.bgp.handover import SessionHandover
from bgp_speaker.bgp.limits import PrefixLimits
from bgp_speaker.bgp.routes import PeerType, SessionSpec
from bgp_speaker.bgp.sessions import desired_sessions
from ipam_blocks.model import Node
from ipam_blocks.store.base import Resource

RR_LABELS = {"route-reflector": "true"}
MESH_OFF = BgpConfig(node_to_node_mesh=False)


def node(name, last, labels=None, rr=None, asn=None):
    return Node(name, labels or {}, IPNetwork(f"10.0.0.{last}/24"), asn, rr)


def peer(name, **spec):
    return parse_bgp_peer(Resource("BGPPeer", name, spec))


RR1 = node("rr1", 1, RR_LABELS, rr="244.0.0.1")
RR2 = node("rr2", 2, RR_LABELS, rr="244.0.0.1")
CLIENTS = [node(f"c{i}", 10 + i, {"rack": f"r{1 + i % 2}"}) for i in range(1, 5)]
NODES = [RR1, RR2, *CLIENTS]
TO_RRS = peer("to-rrs", nodeSelector={}, peerSelector={"matchLabels": RR_LABELS})


def kinds(me, nodes=NODES, cfg=MESH_OFF, peers=(TO_RRS,)):
    return {
        str(s.peer_ip): (s.peer_type.value, s.rr_client, s.passive)
        for s in desired_sessions(me, nodes, cfg, list(peers))
    }


def test_the_usual_setup_one_bgppeer_with_an_empty_node_selector():
    # Clients: both reflectors. Reflectors: every client (the peering seen from the other
    # side) and each other, as non-clients of one cluster. Lower address connects.
    for client in CLIENTS:
        assert kinds(client) == {"10.0.0.1": ("rr", False, True), "10.0.0.2": ("rr", False, True)}
    clients = {str(c.ipv4_address.ip): ("rr-client", True, False) for c in CLIENTS}
    assert kinds(RR1) == {"10.0.0.2": ("node", False, False), **clients}
    assert kinds(RR2) == {"10.0.0.1": ("node", False, True), **clients}


def test_reflectors_leave_the_mesh_clients_keep_it_among_themselves():
    mesh_on = BgpConfig()
    assert set(kinds(RR1, cfg=mesh_on)) == {"10.0.0.2", *(str(c.ipv4_address.ip) for c in CLIENTS)}
    c1 = kinds(CLIENTS[0], cfg=mesh_on)
    assert c1["10.0.0.1"][0] == "rr" and c1["10.0.0.12"][0] == "mesh"


def test_node_selector_limits_who_holds_a_selector_peering():
    rack1 = peer("r1-to-rrs", nodeSelector={"matchLabels": {"rack": "r1"}},
                 peerSelector={"matchLabels": RR_LABELS})  # fmt: skip
    r1 = [c for c in CLIENTS if c.labels["rack"] == "r1"]
    r2 = [c for c in CLIENTS if c.labels["rack"] == "r2"]
    assert set(kinds(r1[0], peers=[rack1])) == {"10.0.0.1", "10.0.0.2"}
    assert kinds(r2[0], peers=[rack1]) == {}
    assert set(kinds(RR1, peers=[rack1])) == {str(c.ipv4_address.ip) for c in r1}


def test_external_peers_by_node_selector_and_node():
    tor1 = peer("tor1", peerIP="10.0.0.254:1179", asNumber=65001,
                nodeSelector={"matchLabels": {"rack": "r1"}}, maxPrefixes=100,
                keepaliveTime=3, holdTime=9, sourceAddress="10.0.0.99")  # fmt: skip
    only_c1 = peer("c1-only", peerIP="192.0.2.9", asNumber=65009, node="c1")
    by_node = {
        c.name: {str(x.peer_ip): x for x in desired_sessions(c, NODES, MESH_OFF, [tor1, only_c1])}
        for c in CLIENTS
    }
    assert {n: set(s) for n, s in by_node.items()} == {
        "c1": {"192.0.2.9"},  # rack r2, but named by `node`
        "c2": {"10.0.0.254"},
        "c3": set(),
        "c4": {"10.0.0.254"},
    }
    tor = by_node["c2"]["10.0.0.254"]
    assert tor.peer_type is PeerType.NODE and tor.ebgp and not tor.passive
    assert (tor.peer_port, tor.peer_as, tor.max_prefixes) == (1179, 65001, 100)
    assert (tor.hold_time, tor.keepalive_time) == (9, 3)
    assert tor.local_address == ip_address("10.0.0.99")


def test_ibgp_peer_ip_on_a_reflector_is_a_client_ebgp_is_not():
    bird = peer("bird", peerIP="10.0.0.40", asNumber=64512)
    frr = peer("frr", peerIP="10.0.0.41", asNumber=64512)
    upstream = peer("upstream", peerIP="10.0.0.42", asNumber=65000)
    got = kinds(RR1, peers=[bird, frr, upstream])
    assert got["10.0.0.40"][:2] == ("rr-client", True)
    assert got["10.0.0.41"][:2] == ("rr-client", True)
    assert got["10.0.0.42"][:2] == ("global", False)
    assert kinds(CLIENTS[0], peers=[bird])["10.0.0.40"][:2] == ("global", False)


def test_passwords_reach_both_sides_of_a_selector_peering():
    p = peer("to-rrs", nodeSelector={}, peerSelector={"matchLabels": RR_LABELS},
             password={"file": "/x"})  # fmt: skip
    for me in (RR1, CLIENTS[0]):
        sessions = desired_sessions(me, NODES, MESH_OFF, [p], lambda ref: "s3cret")
        assert {s.md5_password for s in sessions} == {"s3cret"}


# --- handover ----------------------------------------------------------------------------------

ME = ip_address("10.0.0.11")


def spec(last, kind=PeerType.MESH, name="mesh"):
    return SessionSpec(ip_address(f"10.0.0.{last}"), 64512, 64512, ME, IPv4Address(ME), kind,
                       name=name)  # fmt: skip


M12, M13, R1, R2 = spec(12), spec(13), spec(1, PeerType.RR, "to-rrs"), spec(2, PeerType.RR)
ADDR = {s: s.peer_ip for s in (M12, M13, R1, R2)}


def test_mesh_to_reflectors_keeps_the_mesh_until_the_reflectors_carry_its_routes():
    h = SessionHandover(settle=2.0, max_wait=60.0)
    covered = {"ok": False}

    def cover(peer, retiring):
        return covered["ok"]

    up = {M12.peer_ip, M13.peer_ip}
    assert h.plan([M12, M13], up, up, cover, now=0) == (M12, M13)
    # Switch: mesh off, reflectors on. Nothing established yet: mesh stays.
    assert set(h.plan([R1, R2], up, up, cover, now=1)) == {M12, M13, R1, R2}
    assert h.busy
    # Reflectors up with End-of-RIB, but the mesh peers' prefixes have no other path yet.
    up |= {R1.peer_ip, R2.peer_ip}
    assert len(h.plan([R1, R2], up, up, cover, now=2)) == 4
    covered["ok"] = True
    assert len(h.plan([R1, R2], up, up, cover, now=3)) == 4  # settling
    assert len(h.plan([R1, R2], up, up, cover, now=4.5)) == 4
    assert h.plan([R1, R2], up, up, cover, now=5.1) == (R1, R2)
    assert not h.busy


def test_new_sessions_must_be_up_with_end_of_rib():
    h = SessionHandover(settle=0.0, max_wait=60.0)
    up = {M12.peer_ip}
    h.plan([M12], up, up, lambda p, r: True, now=0)
    assert set(h.plan([R1], up, up, lambda p, r: True, now=1)) == {M12, R1}
    up.add(R1.peer_ip)
    assert set(h.plan([R1], up, {M12.peer_ip}, lambda p, r: True, now=2)) == {M12, R1}
    assert h.plan([R1], up, up, lambda p, r: True, now=3) == (R1,)


def test_retiring_goes_after_max_wait_or_when_it_drops():
    h = SessionHandover(settle=0.0, max_wait=10.0)
    up = {M12.peer_ip, M13.peer_ip}
    h.plan([M12, M13], up, up, lambda p, r: False, now=0)
    assert len(h.plan([R1], up, up, lambda p, r: False, now=1)) == 3
    up.discard(M13.peer_ip)  # a retiring session that goes down is not kept
    assert set(h.plan([R1], up, up, lambda p, r: False, now=2)) == {M12, R1}
    assert h.plan([R1], up, up, lambda p, r: False, now=11.5) == (R1,)


def test_same_address_other_type_is_no_handover_and_down_sessions_just_go():
    h = SessionHandover()
    up = {M12.peer_ip}
    h.plan([M12, M13], up, up, lambda p, r: False, now=0)
    as_rr = spec(12, PeerType.RR, "to-rrs")
    assert h.plan([as_rr], up, up, lambda p, r: False, now=1) == (as_rr,)  # M13 was down
    assert not h.busy


# --- limits ------------------------------------------------------------------------------------


def test_prefix_limits_trip_once_and_are_forgiven_when_the_peer_changes():
    limited = SessionSpec(ip_address("10.0.0.254"), 65001, 64512, ME, IPv4Address(ME),
                          PeerType.NODE, max_prefixes=100, name="tor")  # fmt: skip
    limits = PrefixLimits()
    limits.set_sessions([limited, M12])
    assert limits.exceeded(limited.peer_ip, 100) == ""
    assert limits.exceeded(M12.peer_ip, 10**6) == ""  # no limit
    reason = limits.exceeded(limited.peer_ip, 150)
    assert reason == "max-prefixes 100 exceeded (150 received)"
    limits.trip(limited, reason)
    assert limits.is_tripped(limited.peer_ip) and limits.reason(limited.peer_ip) == reason
    assert limits.exceeded(limited.peer_ip, 200) == ""  # once
    assert limits.allowed([limited, M12]) == [M12]  # stays down while unchanged
    raised = SessionSpec(limited.peer_ip, 65001, 64512, ME, IPv4Address(ME), PeerType.NODE,
                         max_prefixes=1000, name="tor")  # fmt: skip
    assert limits.allowed([raised, M12]) == [raised, M12]
    assert not limits.is_tripped(limited.peer_ip)


def test_covered_counts_only_paths_from_sessions_that_stay():
    from bgp_speaker.bgp.peering import Peering
    from bgp_speaker.bgp.rib import ImportPolicy, Rib
    from bgp_speaker.bgp.routes import PathAttributes

    pool = ip_network("10.244.0.0/16")
    rib = Rib(ImportPolicy(((pool, 26),), frozenset(), IPv4Address(ME), 64512))
    rib.set_sessions([M12, R1])
    block = ip_network("10.244.5.0/26")
    rib.announce(M12.peer_ip, [block], PathAttributes(next_hop=M12.peer_ip))
    peering = Peering(rib)
    assert not peering.covered(M12.peer_ip, {M12.peer_ip})
    rib.announce(R1.peer_ip, [block], PathAttributes(
        next_hop=M12.peer_ip, originator_id=IPv4Address("10.0.0.12"),
        cluster_list=(IPv4Address("244.0.0.1"),),
    ))  # fmt: skip
    assert peering.covered(M12.peer_ip, {M12.peer_ip})
    assert not peering.covered(M12.peer_ip, {M12.peer_ip, R1.peer_ip})


def test_sessions_to_external_routers_never_linger():
    h = SessionHandover(settle=0.0, max_wait=60.0)
    up = {M12.peer_ip, M13.peer_ip}
    nodes = {M12.peer_ip}  # M13 stands for an external router here
    h.plan([M12, M13], up, up, lambda p, r: False, now=0)
    planned = h.plan([R1], up, up, lambda p, r: False, now=1, may_retire=nodes.__contains__)
    assert set(planned) == {M12, R1}
