"""Desired sessions: mesh, explicit peers, selector peerings, reflectors (pure)."""

import pytest
from netaddr import IPNetwork

from bgp_speaker.bgp.config import BgpConfig, parse_bgp_config, parse_bgp_peer
from bgp_speaker.bgp.routes import PeerType
from bgp_speaker.bgp.sessions import desired_sessions
from ipam_blocks.errors import InvalidInput
from ipam_blocks.model import Node
from ipam_blocks.store.base import Resource


def node(name, last, labels=None, asn=None, rr=None):
    return Node(name, labels or {}, IPNetwork(f"10.0.0.{last}/24"), asn, rr)


N1, N2, N3 = node("n1", 11, {"rack": "r1"}), node("n2", 12, {"rack": "r1"}), node("n3", 13)
NODES = [N1, N2, N3]


def peer(name, **spec):
    return parse_bgp_peer(Resource("BGPPeer", name, spec))


def test_mesh_is_every_other_node_and_lower_address_connects():
    sessions = desired_sessions(N2, NODES, BgpConfig(), [])
    assert [(str(s.peer_ip), s.peer_type, s.passive) for s in sessions] == [
        ("10.0.0.11", PeerType.MESH, True),  # n1 is lower: it connects, we wait
        ("10.0.0.13", PeerType.MESH, False),
    ]
    assert all(s.local_as == s.peer_as == 64512 for s in sessions)
    assert all(str(s.router_id) == "10.0.0.12" for s in sessions)


def test_mesh_off_and_other_as_left_out():
    assert desired_sessions(N1, NODES, BgpConfig(node_to_node_mesh=False), []) == []
    other_as = node("n4", 14, asn=65001)
    assert [str(s.peer_ip) for s in desired_sessions(N1, [*NODES, other_as], BgpConfig(), [])] == [
        "10.0.0.12",
        "10.0.0.13",
    ]


def test_explicit_peer_by_node_selector_and_global():
    tor = peer(
        "tor-r1", peerIP="10.0.0.254", asNumber=65010, nodeSelector={"matchLabels": {"rack": "r1"}}
    )
    everyone = peer("rr-ext", peerIP="192.168.0.1:1790", asNumber=64512)
    cfg = BgpConfig(node_to_node_mesh=False)
    s1 = {str(s.peer_ip): s for s in desired_sessions(N1, NODES, cfg, [tor, everyone])}
    s3 = {str(s.peer_ip): s for s in desired_sessions(N3, NODES, cfg, [tor, everyone])}
    assert set(s1) == {"10.0.0.254", "192.168.0.1"} and set(s3) == {"192.168.0.1"}
    assert s1["10.0.0.254"].peer_type is PeerType.NODE and s1["10.0.0.254"].ebgp
    assert not s1["10.0.0.254"].passive
    assert s1["192.168.0.1"].peer_type is PeerType.GLOBAL and s1["192.168.0.1"].peer_port == 1790


def test_explicit_peer_wins_over_mesh_for_same_address():
    p = peer("to-n2", peerIP="10.0.0.12", asNumber=64512, node="n1", holdTime=9)
    sessions = {str(s.peer_ip): s for s in desired_sessions(N1, NODES, BgpConfig(), [p])}
    assert sessions["10.0.0.12"].peer_type is PeerType.NODE
    assert sessions["10.0.0.12"].hold_time == 9


def test_route_reflectors_by_peer_selector():
    rr1 = node("rr1", 1, {"route-reflector": "true"}, rr="1.0.0.1")
    rr2 = node("rr2", 2, {"route-reflector": "true"}, rr="1.0.0.1")
    nodes = [rr1, rr2, *NODES]
    to_rrs = peer("to-rrs", peerSelector={"matchLabels": {"route-reflector": "true"}})
    cfg = BgpConfig(node_to_node_mesh=False)
    client = desired_sessions(N1, nodes, cfg, [to_rrs])
    assert [(str(s.peer_ip), s.peer_type, s.rr_client) for s in client] == [
        ("10.0.0.1", PeerType.RR, False),
        ("10.0.0.2", PeerType.RR, False),
    ]
    assert all(s.passive for s in client)  # reflectors have the lower addresses here
    # the reflector holds the same BGPPeer (empty nodeSelector = all nodes) towards rr2, and
    # reflects to clients, which in turn need a BGPPeer selecting them from the reflector
    to_clients = peer(
        "rr-to-clients",
        peerSelector={"matchExpressions": [{"key": "route-reflector", "operator": "DoesNotExist"}]},
        nodeSelector={"matchLabels": {"route-reflector": "true"}},
    )
    reflector = desired_sessions(rr1, nodes, BgpConfig(), [to_rrs, to_clients])
    kinds = {str(s.peer_ip): (s.peer_type, s.rr_client) for s in reflector}
    assert kinds == {
        "10.0.0.2": (PeerType.NODE, False),
        "10.0.0.11": (PeerType.RR_CLIENT, True),
        "10.0.0.12": (PeerType.RR_CLIENT, True),
        "10.0.0.13": (PeerType.RR_CLIENT, True),
    }  # and no mesh sessions although the mesh is on: reflectors leave the mesh


def test_node_without_address_has_no_sessions():
    assert desired_sessions(Node("bare"), NODES, BgpConfig(), []) == []


@pytest.mark.parametrize(
    "spec, field",
    [
        ({"asNumber": 1}, "peerIP"),
        ({"peerIP": "10.0.0.1", "peerSelector": {}, "asNumber": 1}, "peerIP"),
        ({"peerIP": "10.0.0.1"}, "asNumber"),
        ({"peerIP": "10.0.0.x", "asNumber": 1}, "peerIP"),
        ({"peerIP": "10.0.0.1:99999", "asNumber": 1}, "peerIP"),
        ({"peerIP": "10.0.0.1", "asNumber": 1, "keepaliveTime": 5, "holdTime": 9}, "keepaliveTime"),
        ({"peerIP": "10.0.0.1", "asNumber": 1, "nextHopMode": "Sometimes"}, "nextHopMode"),
        ({"peerIP": "10.0.0.1", "asNumber": 1, "node": "a", "nodeSelector": {}}, "nodeSelector"),
    ],
)
def test_bad_peers_name_the_field(spec, field):
    with pytest.raises(InvalidInput) as err:
        peer("bad", **spec)
    assert err.value.field == f"BGPPeer/bad.{field}"


def test_bgp_configuration_defaults_and_parsing():
    assert parse_bgp_config(None) == BgpConfig()
    cfg = parse_bgp_config(
        Resource(
            "BGPConfiguration",
            "default",
            {"asNumber": 65001, "nodeToNodeMeshEnabled": False, "holdTime": 9, "keepaliveTime": 3},
        )
    )
    assert (cfg.as_number, cfg.node_to_node_mesh, cfg.hold_time, cfg.keepalive_time) == (
        65001,
        False,
        9,
        3,
    )
    with pytest.raises(InvalidInput, match="nodeToNodeMeshEnabled"):
        parse_bgp_config(Resource("BGPConfiguration", "default", {"nodeToNodeMeshEnabled": "no"}))
