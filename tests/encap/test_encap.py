"""Per-pool encapsulation decisions (pure: bgp_speaker.overlay.encap)."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Interface, ip_network

import pytest
from netaddr import IPNetwork

from bgp_speaker.bgp.config import parse_bgp_config
from bgp_speaker.bgp.routes import KernelRoute, NextHop
from bgp_speaker.overlay.encap import (
    IPIP_DEVICE,
    VXLAN_DEVICE,
    Encap,
    EncapPolicy,
    PoolEncap,
    encap_for,
    encap_policy,
    encapsulate,
    pod_mtu,
    tunnel_mtu,
    vtep_mac,
    vteps_of,
)
from ipam_blocks.errors import InvalidInput
from ipam_blocks.model import EncapMode, IPPool, parse_pool
from ipam_blocks.store.base import Resource

POOL = ip_network("10.244.0.0/16")
OTHER = ip_network("10.96.0.0/16")
BLOCK = ip_network("10.244.7.0/26")
NODE = IPv4Interface("10.0.1.11/24")
SAME, CROSS = IPv4Address("10.0.1.12"), IPv4Address("10.0.2.13")
ALL = frozenset(Encap)


def policy(ipip: str = "Never", vxlan: str = "Never") -> EncapPolicy:
    return EncapPolicy((PoolEncap(POOL, "p", EncapMode(ipip), EncapMode(vxlan)),), NODE)


@pytest.mark.parametrize(
    ("ipip", "vxlan", "same", "cross"),
    [
        ("Never", "Never", Encap.NONE, Encap.NONE),
        ("Always", "Never", Encap.IPIP, Encap.IPIP),
        ("CrossSubnet", "Never", Encap.NONE, Encap.IPIP),
        ("Never", "Always", Encap.VXLAN, Encap.VXLAN),
        ("Never", "CrossSubnet", Encap.NONE, Encap.VXLAN),
    ],
)
def test_modes_decide_per_next_hop(ipip: str, vxlan: str, same: Encap, cross: Encap) -> None:
    p = policy(ipip, vxlan)
    assert encap_for(BLOCK, SAME, p) is same
    assert encap_for(BLOCK, CROSS, p) is cross
    # Outside every pool: plain, whatever the pools say.
    assert encap_for(ip_network("192.168.0.0/24"), CROSS, p) is Encap.NONE


def test_cross_subnet_without_a_node_address_encapsulates() -> None:
    p = EncapPolicy((PoolEncap(POOL, "p", vxlan=EncapMode.CROSS_SUBNET),), None)
    assert encap_for(BLOCK, SAME, p) is Encap.VXLAN


def test_encapsulated_routes_go_onlink_through_the_tunnel_device() -> None:
    plain = KernelRoute(BLOCK, (NextHop(CROSS),))
    assert encapsulate(plain, policy(ipip="Always"), ALL) == KernelRoute(
        BLOCK, (NextHop(CROSS, IPIP_DEVICE, onlink=True),)
    )
    assert encapsulate(plain, policy(vxlan="Always"), ALL) == KernelRoute(
        BLOCK, (NextHop(CROSS, VXLAN_DEVICE, onlink=True),)
    )
    assert encapsulate(plain, policy(), ALL) == plain


def test_ecmp_hops_are_decided_one_by_one() -> None:
    route = KernelRoute(BLOCK, (NextHop(SAME), NextHop(CROSS)))
    out = encapsulate(route, policy(vxlan="CrossSubnet"), ALL)
    assert out == KernelRoute(BLOCK, (NextHop(SAME), NextHop(CROSS, VXLAN_DEVICE, True)))


def test_a_route_needing_an_unavailable_encapsulation_is_refused() -> None:
    route = KernelRoute(BLOCK, (NextHop(SAME), NextHop(CROSS)))
    p = policy(ipip="CrossSubnet")
    assert encapsulate(route, p, frozenset({Encap.VXLAN})) is None
    # The same-subnet hop alone needs no tunnel: kept.
    same_only = KernelRoute(BLOCK, (NextHop(SAME),))
    assert encapsulate(same_only, p, frozenset()) == same_only


def test_blackholes_pass_unchanged() -> None:
    hole = KernelRoute(BLOCK, blackhole=True)
    assert encapsulate(hole, policy(ipip="Always"), frozenset()) == hole


def test_policy_from_pools_leaves_disabled_pools_out() -> None:
    pools = [
        IPPool("b", IPNetwork("10.96.0.0/16"), 26, vxlan_mode=EncapMode.ALWAYS, disabled=True),
        IPPool("a", IPNetwork("10.244.0.0/16"), 26, ipip_mode=EncapMode.CROSS_SUBNET,
               nat_outgoing=True),
    ]  # fmt: skip
    p = encap_policy(NODE, pools)
    assert p.pools == (PoolEncap(POOL, "a", EncapMode.CROSS_SUBNET, EncapMode.NEVER, True),)
    assert p.wanted == {Encap.IPIP}
    assert [x.name for x in p.ipip_pools] == ["a"]
    assert p.pool_of(BLOCK) == p.pools[0] and p.pool_of(ip_network("10.96.1.0/26")) is None


def test_vtep_macs_derive_from_the_node_address() -> None:
    mac = vtep_mac(IPv4Address("10.0.2.13"))
    assert mac == "0e:4c:0a:00:02:0d"
    first = int(mac.split(":")[0], 16)
    assert first & 0x02 and not first & 0x01  # locally administered unicast
    assert vtep_mac(IPv4Address("10.0.2.14")) != mac


def test_vteps_are_the_gateways_of_vxlan_routes() -> None:
    routes = [
        KernelRoute(BLOCK, (NextHop(CROSS, VXLAN_DEVICE, True), NextHop(SAME))),
        KernelRoute(ip_network("10.244.8.0/26"), (NextHop(SAME, IPIP_DEVICE, True),)),
        KernelRoute(ip_network("10.244.9.0/26"), blackhole=True),
    ]
    assert vteps_of(routes) == {CROSS}


def test_mtus_follow_the_encapsulation() -> None:
    assert tunnel_mtu(1500, Encap.IPIP) == 1480
    assert tunnel_mtu(1500, Encap.VXLAN) == 1450
    assert pod_mtu(1500, policy()) == 1500
    assert pod_mtu(1500, policy(ipip="CrossSubnet")) == 1480
    assert pod_mtu(9000, policy(vxlan="Always")) == 8950
    both = EncapPolicy(
        (PoolEncap(POOL, "a", ipip=EncapMode.ALWAYS), PoolEncap(OTHER, "b", vxlan=EncapMode.ALWAYS))
    )
    assert pod_mtu(1500, both) == 1450  # the largest overhead wins


def test_pod_mtus_stay_within_what_links_and_ipv6_allow() -> None:
    assert pod_mtu(65536, policy()) == 9000  # a loopback's MTU is no pod MTU
    assert pod_mtu(1300, policy(vxlan="Always")) == 1280
    assert pod_mtu(9000, policy()) == 9000 and pod_mtu(1280, policy()) == 1280


def test_vxlan_vni_and_port_come_from_the_bgp_configuration() -> None:
    assert (parse_bgp_config(None).vxlan_vni, parse_bgp_config(None).vxlan_port) == (4096, 4789)
    cfg = parse_bgp_config(Resource("BGPConfiguration", "default",
                                    {"vxlanVNI": 77, "vxlanPort": 8472}))  # fmt: skip
    assert (cfg.vxlan_vni, cfg.vxlan_port) == (77, 8472)
    with pytest.raises(InvalidInput, match="vxlanVNI"):
        parse_bgp_config(Resource("BGPConfiguration", "default", {"vxlanVNI": 1 << 24}))


def test_both_encapsulations_on_one_pool_is_refused() -> None:
    with pytest.raises(InvalidInput, match="cannot both"):
        parse_pool(Resource("IPPool", "p", {"cidr": "10.244.0.0/16", "ipipMode": "Always",
                                            "vxlanMode": "CrossSubnet"}))  # fmt: skip
