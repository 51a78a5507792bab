"""The desired state of the node's routing, computed from the listings of what it depends on.

`desired_state` is a function of the `Listings` (nodes, the BGP configuration, BGPPeers,
pools, this node's blocks and the blocks it borrowed from, its affinities) and of a password
source (it may block on a Secret or a file: the controller runs it in a worker thread). The
listings come from the agent's caches (`caches.RoutingCaches`), never from a store read.

On a reflector node the sessions are split (`reflection.split_sessions`): the iBGP ones go to
BIRD (`DesiredState.reflector`), ExaBGP keeps the rest plus its loopback session to BIRD.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Interface, ip_network

from bgp_speaker.bgp.config import BgpConfig
from bgp_speaker.bgp.export import Exports, compute_exports
from bgp_speaker.bgp.peering import PasswordSource, PeeringDesired, peer_policy, read_peering
from bgp_speaker.bgp.reflection import (
    ReflectorDesired,
    node_speaker_session,
    reflector_desired,
    split_sessions,
)
from bgp_speaker.bgp.rib import ImportPolicy
from bgp_speaker.bgp.routes import SessionSpec
from bgp_speaker.bgp.sessions import node_address
from bgp_speaker.overlay.encap import EncapPolicy, VxlanSettings, encap_policy
from ipam_blocks.model import Block, BlockAffinity, IPPool, Node
from ipam_blocks.store.base import Resource

__all__ = ["DesiredState", "Listings", "desired_state"]


@dataclass(frozen=True)
class Listings:
    """Everything routing reads, parsed (BGPPeers as stored: `read_peering` parses them)."""

    nodes: Sequence[Node] = ()
    bgp_config: BgpConfig = field(default_factory=BgpConfig)
    peers: Sequence[Resource] = ()
    pools: Sequence[IPPool] = ()
    blocks: Sequence[Block] = ()
    """This node's blocks and the other nodes' blocks it holds addresses in."""
    affinities: Sequence[BlockAffinity] = ()
    """This node's (no other node's affinity changes our routing)."""


@dataclass(frozen=True)
class DesiredState:
    """What the node's routing should be: the sessions, our exports, the import policy, the
    peering settings beyond the sessions and the pools' encapsulation."""

    sessions: tuple[SessionSpec, ...]
    exports: Exports
    policy: ImportPolicy
    peering: PeeringDesired = field(default_factory=PeeringDesired)
    encap: EncapPolicy = field(default_factory=EncapPolicy)
    reflector: ReflectorDesired | None = None
    """BIRD's part, when this node is a route reflector."""


def desired_state(node: str, listings: Listings, password: PasswordSource) -> DesiredState | None:
    """The node's desired routing; None while the node has no IPv4 address."""
    nodes = listings.nodes
    me = next((n for n in nodes if n.name == node), None)
    if me is None or node_address(me) is None:
        return None
    cfg = listings.bgp_config
    sessions, peering = read_peering(password, me, nodes, cfg, listings.peers)
    pools = listings.pools
    exports = compute_exports(node, listings.blocks, listings.affinities)
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
    reflector = None
    if peering.cluster_id is not None:
        bird_sessions, sessions = split_sessions(sessions)
        speaker_session = node_speaker_session(
            router_id, policy.local_as, cfg.hold_time, cfg.keepalive_time,
            cfg.graceful_restart_time or None,
        )  # fmt: skip
        sessions.append(speaker_session)
        reflector = reflector_desired(
            router_id, peering.cluster_id, policy.local_as, policy.pools, bird_sessions,
            speaker_session, peering.next_hop_self, dict(peering.accept),
        )  # fmt: skip
        # What BIRD may pass on from its peers' accept lists arrives over the loopback.
        accept = dict(peering.accept)
        accept[speaker_session.peer_ip] = reflector.node_speaker_accept
        peering = replace(
            peering,
            accept=tuple(accept.items()),
            # BIRD takes these sessions over at once: ExaBGP must not hold on to them while
            # they "retire", or it would keep the address pair BIRD needs.
            node_addresses=peering.node_addresses - reflector.peers,
        )
    return DesiredState(
        tuple(sessions), exports, peer_policy(policy, peering), peering, encap, reflector
    )
