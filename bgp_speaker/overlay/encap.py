"""Encapsulation of learned routes, per pool (pure): plain, IP-in-IP or VXLAN (DESIGN §5).

A pool's ``ipipMode``/``vxlanMode`` (at most one of them on) says how routes to its blocks
leave this node:

- ``Never``: plain, ``via <peer node IP>`` (the next hop must be on a connected subnet);
- ``Always``: encapsulated to the peer node, whatever subnet it is on;
- ``CrossSubnet``: encapsulated only when the next hop is outside this node's own subnet
  (its IPv4 address with prefix length), plain otherwise.

Encapsulated routes, per next hop:

- IP-in-IP: ``via <peer> dev tunl0 onlink``. ``tunl0`` is the kernel's catch-all IPIP
  device; it carries a tunnel address from an IPIP pool so that traffic the node itself
  sends through it has a source the fabric routes back.
- VXLAN: ``via <peer> dev vxlan.l3f onlink``; the peer's node IP is its VTEP address and its
  VTEP MAC is *derived* from that IP (``vtep_mac``), as is every node's own device MAC. The
  neighbour and FDB entries that tie the two together therefore follow from the BGP next
  hop alone: no datastore object carries tunnel addresses or MACs.

A route that needs an encapsulation this kernel cannot do (no ``ipip`` module) is refused:
it gets no kernel route at all rather than one that would black-hole or leak traffic, and
the agent reports the mode as unavailable.

Everything here is a function of frozen values; the adapters (``tunnels``, ``nat``) and the
routing controller apply the results.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from functools import cached_property
from ipaddress import IPv4Address, IPv4Interface, ip_network

from bgp_speaker.bgp.config import DEFAULT_VXLAN_PORT, DEFAULT_VXLAN_VNI
from bgp_speaker.bgp.routes import IPAddr, IPNet, KernelRoute, NextHop, within
from ipam_blocks.model import EncapMode, IPPool

__all__ = [
    "IPIP_DEVICE",
    "IPIP_OVERHEAD",
    "MAX_POD_MTU",
    "MIN_POD_MTU",
    "TUNNEL_DEVICES",
    "VXLAN_DEVICE",
    "VXLAN_OVERHEAD",
    "Encap",
    "EncapPolicy",
    "PoolEncap",
    "VxlanSettings",
    "encap_for",
    "encap_policy",
    "encapsulate",
    "ipip_tunnel_handle",
    "pod_mtu",
    "tunnel_mtu",
    "vtep_mac",
    "vteps_of",
]

IPIP_DEVICE = "tunl0"
VXLAN_DEVICE = "vxlan.l3f"
TUNNEL_DEVICES = frozenset({IPIP_DEVICE, VXLAN_DEVICE})
IPIP_OVERHEAD = 20  # outer IPv4 header
VXLAN_OVERHEAD = 50  # outer IPv4 + UDP + VXLAN headers + inner Ethernet header
# Pod MTUs stay between IPv6's minimum link MTU and the largest jumbo frame fabrics carry.
MIN_POD_MTU, MAX_POD_MTU = 1280, 9000
VTEP_MAC_PREFIX = (0x0E, 0x4C)  # locally administered, unicast; "L" for l3fabric


class Encap(StrEnum):
    NONE = "none"
    IPIP = "ipip"
    VXLAN = "vxlan"


@dataclass(frozen=True)
class VxlanSettings:
    vni: int = DEFAULT_VXLAN_VNI
    port: int = DEFAULT_VXLAN_PORT


@dataclass(frozen=True)
class PoolEncap:
    """What routing needs of one enabled pool."""

    cidr: IPNet
    name: str = ""
    ipip: EncapMode = EncapMode.NEVER
    vxlan: EncapMode = EncapMode.NEVER
    nat_outgoing: bool = False

    @property
    def encap(self) -> tuple[Encap, EncapMode]:
        """The pool's one encapsulation and its mode (NONE/NEVER when neither is on)."""
        if self.ipip is not EncapMode.NEVER:
            return Encap.IPIP, self.ipip
        if self.vxlan is not EncapMode.NEVER:
            return Encap.VXLAN, self.vxlan
        return Encap.NONE, EncapMode.NEVER


@dataclass(frozen=True)
class EncapPolicy:
    """Per-pool encapsulation as seen from one node."""

    pools: tuple[PoolEncap, ...] = ()
    node_address: IPv4Interface | None = None
    """This node's IPv4 address with its prefix length: what "this subnet" means."""
    vxlan: VxlanSettings = VxlanSettings()

    @cached_property
    def wanted(self) -> frozenset[Encap]:
        """Encapsulations some pool asks for: the devices this node needs (asked per route:
        computed once)."""
        return frozenset(p.encap[0] for p in self.pools) - {Encap.NONE}

    @property
    def ipip_pools(self) -> tuple[PoolEncap, ...]:
        return tuple(p for p in self.pools if p.ipip is not EncapMode.NEVER)

    def pool_of(self, prefix: IPNet) -> PoolEncap | None:
        for pool in self.pools:
            if within(prefix, pool.cidr):
                return pool
        return None


def encap_policy(
    node_address: IPv4Interface | None,
    pools: Sequence[IPPool],
    vxlan: VxlanSettings = VxlanSettings(),
) -> EncapPolicy:
    """The policy from the store's pools (disabled ones carry no routes: left out)."""
    return EncapPolicy(
        pools=tuple(
            PoolEncap(ip_network(str(p.cidr)), p.name, p.ipip_mode, p.vxlan_mode, p.nat_outgoing)
            for p in sorted(pools, key=lambda p: (p.cidr.version, p.cidr.first, p.name))
            if not p.disabled
        ),
        node_address=node_address,
        vxlan=vxlan,
    )


def encap_for(prefix: IPNet, next_hop: IPAddr, policy: EncapPolicy) -> Encap:
    """How traffic to ``prefix`` via ``next_hop`` leaves this node."""
    pool = policy.pool_of(prefix)
    if pool is None:
        return Encap.NONE
    kind, mode = pool.encap
    if mode is EncapMode.ALWAYS:
        return kind
    if mode is EncapMode.CROSS_SUBNET:
        node = policy.node_address
        same_subnet = node is not None and next_hop.version == 4 and next_hop in node.network
        return Encap.NONE if same_subnet else kind
    return Encap.NONE


_DEVICE = {Encap.IPIP: IPIP_DEVICE, Encap.VXLAN: VXLAN_DEVICE}


def encapsulate(
    route: KernelRoute, policy: EncapPolicy, available: frozenset[Encap]
) -> KernelRoute | None:
    """``route`` (plain next hops, as the RIB selects them) with each next hop sent the way
    its pool says; None when some next hop needs an encapsulation not in ``available``
    (refused: no route beats a broken one)."""
    if route.blackhole or not route.nexthops or not policy.wanted:
        return route
    hops = []
    for hop in route.nexthops:
        if hop.gateway is None:
            hops.append(hop)
            continue
        kind = encap_for(route.prefix, hop.gateway, policy)
        if kind is Encap.NONE:
            hops.append(NextHop(hop.gateway))
        elif kind not in available:
            return None
        else:
            hops.append(NextHop(hop.gateway, _DEVICE[kind], onlink=True))
    return KernelRoute(route.prefix, tuple(sorted(set(hops), key=_hop_order)))


def _hop_order(hop: NextHop) -> tuple[int, int, str, bool]:
    gateway = hop.gateway
    return (
        0 if gateway is None else gateway.version,
        0 if gateway is None else int(gateway),
        hop.device or "",
        hop.onlink,
    )


def vteps_of(routes: Iterable[KernelRoute]) -> frozenset[IPv4Address]:
    """The remote VTEPs (peer node IPs) that routes through the VXLAN device use."""
    return frozenset(
        hop.gateway
        for route in routes
        for hop in route.nexthops
        if hop.device == VXLAN_DEVICE and isinstance(hop.gateway, IPv4Address)
    )


def vtep_mac(address: IPv4Address) -> str:
    """The VXLAN device MAC of the node with this IPv4 address: 0e:4c:<the 4 address bytes>.

    Every node sets its own device's MAC this way and derives its peers' the same way, so
    the neighbour and FDB entries follow from a BGP next hop alone."""
    return ":".join(f"{b:02x}" for b in (*VTEP_MAC_PREFIX, *address.packed))


def tunnel_mtu(underlay_mtu: int, kind: Encap) -> int:
    overhead = {Encap.IPIP: IPIP_OVERHEAD, Encap.VXLAN: VXLAN_OVERHEAD}.get(kind, 0)
    return underlay_mtu - overhead


def pod_mtu(underlay_mtu: int, policy: EncapPolicy) -> int:
    """The pod interface MTU when the CNI config sets none: the underlay's, less the largest
    overhead of the encapsulations some pool uses (1480 for IPIP, 1450 for VXLAN on 1500),
    so encapsulated pod packets still fit the underlay unfragmented; within
    [MIN_POD_MTU, MAX_POD_MTU] whatever the underlay device says (a loopback's 65536, say)."""
    mtu = min((tunnel_mtu(underlay_mtu, k) for k in policy.wanted), default=underlay_mtu)
    return max(MIN_POD_MTU, min(MAX_POD_MTU, mtu))


def ipip_tunnel_handle(node: str) -> str:
    """The IPAM handle of a node's tunl0 address (allocation type Tunnel)."""
    return f"ipip-tunnel-addr-{node}"
