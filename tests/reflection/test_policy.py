"""Per-peer import policy and export communities (pure)."""

from __future__ import annotations

import logging
from ipaddress import IPv4Address, ip_network

import pytest

from bgp_speaker.bgp.config import parse_bgp_config
from bgp_speaker.bgp.policy import AcceptRule, PeerPolicy, export_communities, parse_accept_rules
from bgp_speaker.bgp.rib import ImportPolicy, Rib
from bgp_speaker.bgp.routes import PathAttributes, PeerType, SessionSpec
from ipam_blocks.errors import InvalidInput
from ipam_blocks.store.base import Resource

ME = IPv4Address("10.0.1.11")
TOR = IPv4Address("10.0.1.1")
NODE = IPv4Address("10.0.1.12")
POOL = ip_network("10.244.0.0/16")
OWN = ip_network("10.244.1.0/26")
OTHER = ip_network("10.244.2.0/26")
DEFAULT = ip_network("0.0.0.0/0")
CLUSTER = IPv4Address("244.0.0.1")

TOR_SESSION = SessionSpec(TOR, 65001, 65101, ME, ME, PeerType.NODE, name="rack1-tor")
NODE_SESSION = SessionSpec(NODE, 65101, 65101, ME, ME, PeerType.MESH, name="mesh")


def policy(**extra) -> PeerPolicy:
    return PeerPolicy(((POOL, 26),), frozenset({OWN}), ME, 65101, **extra)


def rules(text: str):
    return parse_accept_rules(
        Resource("BGPPeer", "p", {}, annotations={"l3fabric.io/accept-prefixes": text})
    )


def test_fabric_rules_are_kept():
    p = policy()
    base = ImportPolicy(((POOL, 26),), frozenset({OWN}), ME, 65101)
    for prefix in (OWN, OTHER, DEFAULT, POOL, ip_network("192.168.0.0/24")):
        for session in (TOR_SESSION, NODE_SESSION):
            attrs = PathAttributes(next_hop=session.peer_ip, as_path=(65001,))
            assert p.rejection(prefix, attrs, session) == base.rejection(prefix, attrs, session)


def test_external_peer_may_teach_a_default_route_fabric_peers_may_not():
    p = policy(accept=((TOR, rules("0.0.0.0/0")),))
    attrs = PathAttributes(next_hop=TOR, as_path=(65001,))
    assert p.rejection(DEFAULT, attrs, TOR_SESSION) == ""
    assert p.rejection(ip_network("8.8.8.0/24"), attrs, TOR_SESSION) == "outside-pools"
    assert p.rejection(DEFAULT, PathAttributes(next_hop=NODE), NODE_SESSION) == "outside-pools"
    # loop checks still hold for what the list lets in
    looped = PathAttributes(next_hop=TOR, as_path=(65001, 65101))
    assert p.rejection(DEFAULT, looped, TOR_SESSION) == "as-path-loop"


def test_accept_list_never_opens_pool_space():
    p = policy(accept=((TOR, rules("0.0.0.0/0+")),))
    attrs = PathAttributes(next_hop=TOR, as_path=(65001,))
    assert p.rejection(ip_network("10.1.0.0/16"), attrs, TOR_SESSION) == ""  # or longer
    assert p.rejection(OWN, attrs, TOR_SESSION) == "own-block"
    assert p.rejection(POOL, attrs, TOR_SESSION) == "shorter-than-block"
    assert p.rejection(ip_network("10.244.2.0/27"), attrs, TOR_SESSION) == ""  # fabric rules
    assert p.rejection(OTHER, attrs, TOR_SESSION) == ""  # another rack's block via the ToR


def test_reflected_routes_are_accepted_and_own_originator_dropped():
    """A reflector node's ExaBGP learns reflected routes from its BIRD with CLUSTER_LISTs: the
    cluster list is BIRD's business, the originator check stays."""
    attrs = PathAttributes(next_hop=NODE, originator_id=NODE, cluster_list=(CLUSTER,))
    assert policy().rejection(OTHER, attrs, NODE_SESSION) == ""
    own = PathAttributes(next_hop=NODE, originator_id=ME, cluster_list=(CLUSTER,))
    assert policy().rejection(OTHER, own, NODE_SESSION) == "own-originator"


def test_policy_plugs_into_the_rib_and_counts():
    rib = Rib(policy(accept=((TOR, rules("0.0.0.0/0")),)))
    rib.set_sessions([TOR_SESSION, NODE_SESSION])
    rib.announce(TOR, [DEFAULT, OTHER], PathAttributes(next_hop=TOR, as_path=(65001,)))
    rib.announce(NODE, [ip_network("10.244.3.0/26")],
                 PathAttributes(next_hop=NODE, originator_id=ME))  # fmt: skip
    assert rib.select(DEFAULT).best.peer == TOR
    assert rib.select(OTHER).best.peer == TOR
    assert rib.select(ip_network("10.244.3.0/26")) is None
    assert rib.dropped_total() == {"own-originator": 1}
    assert policy() == policy() and hash(policy(accept=((TOR, rules("0.0.0.0/0")),)))


def test_accept_rules_parse_and_name_the_field():
    assert rules(" 0.0.0.0/0 , 192.0.2.0/24+,") == (
        AcceptRule(DEFAULT), AcceptRule(ip_network("192.0.2.0/24"), True),
    )  # fmt: skip
    assert str(AcceptRule(ip_network("192.0.2.0/24"), True)) == "192.0.2.0/24+"
    with pytest.raises(InvalidInput) as err:
        rules("10.0.0.1/8")
    assert "accept-prefixes" in err.value.field


def config(**spec):
    return parse_bgp_config(Resource("BGPConfiguration", "default", spec))


def test_export_communities_by_name_and_value_inside_the_cidr():
    cfg = config(
        communities=[{"name": "pods", "value": "64512:100"}],
        prefixAdvertisements=[
            {"cidr": "10.244.0.0/16", "communities": ["pods"]},
            {"cidr": "10.244.1.0/26", "communities": ["64512:7", "65000:1"]},
        ],
    )
    out = export_communities([OWN, OTHER, ip_network("10.9.0.0/26")], cfg)
    assert out == {
        OWN: ("64512:7", "64512:100", "65000:1"),  # sorted numerically
        OTHER: ("64512:100",),
        ip_network("10.9.0.0/26"): (),
    }


def test_bad_community_entries_are_logged_and_skipped(caplog):
    cfg = config(prefixAdvertisements=[
        {"cidr": "10.244.0.0/16", "communities": ["nosuchname", "64512:100", "1:2:3"]},
        {"cidr": "not-a-cidr", "communities": ["64512:1"]},
    ])  # fmt: skip
    with caplog.at_level(logging.ERROR):
        assert export_communities([OWN], cfg) == {OWN: ("64512:100",)}
    reasons = " ".join(r.reason for r in caplog.records)
    assert "prefixAdvertisements[0].communities[0]" in reasons
    assert "prefixAdvertisements[0].communities[2]" in reasons
    assert "prefixAdvertisements[1].cidr" in reasons
