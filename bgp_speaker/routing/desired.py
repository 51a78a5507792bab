"""The desired state of the node's routing, read from the store into one typed value.

One read covers everything routing depends on: nodes, the BGP configuration, BGPPeers (their
passwords resolved), pools, blocks and affinities. It is blocking I/O: the controller runs it
in a worker thread.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import IPv4Interface, ip_network

from bgp_speaker.bgp.config import BGP_CONFIG_NAME, parse_bgp_config
from bgp_speaker.bgp.export import Exports, compute_exports
from bgp_speaker.bgp.peering import PeeringDesired, peer_policy, read_peering
from bgp_speaker.bgp.rib import ImportPolicy
from bgp_speaker.bgp.routes import SessionSpec
from bgp_speaker.bgp.sessions import node_address
from bgp_speaker.overlay.encap import EncapPolicy, VxlanSettings, encap_policy
from ipam_blocks.errors import NotFound
from ipam_blocks.model import parse_affinity, parse_block, parse_node, parse_pool
from ipam_blocks.store.base import Store

__all__ = ["DesiredState", "read_desired"]


@dataclass(frozen=True)
class DesiredState:
    """What the node's routing should be: the sessions, our exports, the import policy, the
    peering settings beyond the sessions and the pools' encapsulation."""

    sessions: tuple[SessionSpec, ...]
    exports: Exports
    policy: ImportPolicy
    peering: PeeringDesired = field(default_factory=PeeringDesired)
    encap: EncapPolicy = field(default_factory=EncapPolicy)


def read_desired(store: Store, node: str) -> DesiredState | None:
    """One consistent-enough read of everything routing depends on (blocking I/O); None while
    the node has no IPv4 address."""
    nodes = [parse_node(r) for r in store.list("Node").items]
    me = next((n for n in nodes if n.name == node), None)
    if me is None or node_address(me) is None:
        return None
    try:
        cfg = parse_bgp_config(store.get("BGPConfiguration", BGP_CONFIG_NAME))
    except NotFound:
        cfg = parse_bgp_config(None)
    sessions, peering = read_peering(store, me, nodes, cfg, store.list("BGPPeer").items)
    pools = [parse_pool(r) for r in store.list("IPPool").items]
    blocks = [parse_block(r) for r in store.list("IPAMBlock").items]
    affinities = [parse_affinity(r) for r in store.list("BlockAffinity").items]
    exports = compute_exports(node, blocks, affinities)
    router_id = node_address(me)
    assert router_id is not None
    policy = ImportPolicy(
        pools=tuple((ip_network(str(p.cidr)), p.block_size) for p in pools if not p.disabled),
        own_blocks=exports.blocks,
        router_id=router_id,
        local_as=me.as_number or cfg.as_number,
    )
    encap = encap_policy(
        # parse_node accepts only IPv4 addresses here.
        None if me.ipv4_address is None else IPv4Interface(str(me.ipv4_address)),
        pools,
        VxlanSettings(cfg.vxlan_vni, cfg.vxlan_port),
    )
    return DesiredState(tuple(sessions), exports, peer_policy(policy, peering), peering, encap)
