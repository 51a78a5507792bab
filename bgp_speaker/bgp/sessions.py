"""Which BGP sessions a node wants (pure): node mesh, explicit peers, selector peerings.

Sessions between two l3fabric nodes are opened by the node with the lower address; the
other side is passive, so the two never race each other into a connection collision.
Explicit BGPPeer sessions win over mesh sessions to the same address.

A selector peering works both ways, as it does in Calico: a BGPPeer with `peerSelector` makes
the nodes it holds for (`nodeSelector`/`node`) peer with the nodes `peerSelector` matches,
and therefore also the matched nodes with the nodes it holds for. So the usual reflector
setup is one BGPPeer (empty nodeSelector, `peerSelector: route-reflector == "true"`): the
clients get sessions to the reflectors, the reflectors to the clients and to each other.

On a route reflector (a node with a cluster ID), an iBGP `peerIP` peer is a route reflector
client (reflected routes go to it: a BIRD or FRR box beside the nodes); an eBGP one is an
external peer that only gets the node's own routes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from ipaddress import IPv4Address

from bgp_speaker.bgp.config import BgpConfig, BgpPeer, PasswordRef
from bgp_speaker.bgp.routes import IPAddr, PeerType, SessionSpec
from ipam_blocks.model import Node

PasswordResolver = Callable[[PasswordRef], str | None]


def node_address(node: Node) -> IPv4Address | None:
    return IPv4Address(str(node.ipv4_address.ip)) if node.ipv4_address is not None else None


def _holds(me: Node, peer: BgpPeer) -> bool:
    if peer.node is not None:
        return peer.node == me.name
    return peer.node_selector is None or peer.node_selector.matches(me.labels)


def _node_peer_type(me: Node, other: Node) -> tuple[PeerType, bool]:
    """(type, whether we reflect to it) for a session between two l3fabric nodes."""
    mine, theirs = me.route_reflector_cluster_id, other.route_reflector_cluster_id
    if mine and (not theirs or theirs != mine):
        return (PeerType.RR_CLIENT, True) if not theirs else (PeerType.NODE, False)
    if theirs and not mine:
        return PeerType.RR, False
    return PeerType.NODE, False


def desired_sessions(
    me: Node,
    nodes: Sequence[Node],
    cfg: BgpConfig,
    peers: Sequence[BgpPeer],
    resolve_password: PasswordResolver = lambda ref: None,
) -> list[SessionSpec]:
    my_address = node_address(me)
    if my_address is None:
        return []
    local_as = me.as_number or cfg.as_number
    sessions: dict[IPAddr, SessionSpec] = {}

    def add(spec: SessionSpec) -> None:
        if spec.peer_ip != my_address and spec.peer_ip not in sessions:
            sessions[spec.peer_ip] = spec

    def between_nodes(
        other: Node, peer_type: PeerType, rr_client: bool, name: str, peer: BgpPeer | None
    ) -> SessionSpec | None:
        address = node_address(other)
        if address is None or other.name == me.name:
            return None
        return SessionSpec(
            peer_ip=address,
            peer_as=other.as_number or cfg.as_number,
            local_as=local_as,
            local_address=my_address,
            router_id=my_address,
            peer_type=peer_type,
            passive=my_address > address,
            hold_time=(peer.hold_time if peer and peer.hold_time else cfg.hold_time),
            keepalive_time=(
                peer.keepalive_time if peer and peer.keepalive_time else cfg.keepalive_time
            ),
            md5_password=resolve_password(peer.password) if peer and peer.password else None,
            graceful_restart_time=cfg.graceful_restart_time or None,
            max_restart_time=peer.max_restart_time if peer else None,
            max_prefixes=peer.max_prefixes if peer else None,
            rr_client=rr_client,
            name=name,
        )

    for peer in sorted(peers, key=lambda p: p.name):
        if not _holds(me, peer):
            continue
        if peer.peer_ip is not None:
            peer_as = peer.as_number or cfg.as_number
            client = bool(me.route_reflector_cluster_id) and peer_as == local_as
            kind = PeerType.GLOBAL if peer.selects_all_nodes else PeerType.NODE
            add(
                SessionSpec(
                    peer_ip=peer.peer_ip,
                    peer_as=peer_as,
                    local_as=local_as,
                    local_address=peer.source_address or my_address,
                    router_id=my_address,
                    peer_type=PeerType.RR_CLIENT if client else kind,
                    peer_port=peer.peer_port,
                    hold_time=peer.hold_time or cfg.hold_time,
                    keepalive_time=peer.keepalive_time or cfg.keepalive_time,
                    md5_password=resolve_password(peer.password) if peer.password else None,
                    graceful_restart_time=cfg.graceful_restart_time or None,
                    max_restart_time=peer.max_restart_time,
                    max_prefixes=peer.max_prefixes,
                    rr_client=client,
                    name=peer.name,
                )
            )
            continue
        assert peer.peer_selector is not None
        for other in nodes:
            if peer.peer_selector.matches(other.labels):
                peer_type, rr_client = _node_peer_type(me, other)
                spec = between_nodes(other, peer_type, rr_client, peer.name, peer)
                if spec is not None:
                    add(spec)

    # The other direction of selector peerings: we are matched by a peerSelector, so we peer
    # with the nodes that BGPPeer holds for.
    for peer in sorted(peers, key=lambda p: p.name):
        if peer.peer_selector is None or not peer.peer_selector.matches(me.labels):
            continue
        for other in nodes:
            if _holds(other, peer):
                peer_type, rr_client = _node_peer_type(me, other)
                spec = between_nodes(other, peer_type, rr_client, peer.name, peer)
                if spec is not None:
                    add(spec)

    if cfg.node_to_node_mesh and not me.route_reflector_cluster_id:
        for other in nodes:
            if other.route_reflector_cluster_id or (other.as_number or cfg.as_number) != local_as:
                continue
            spec = between_nodes(other, PeerType.MESH, False, "mesh", None)
            if spec is not None:
                add(spec)
    return sorted(sessions.values(), key=lambda s: (s.peer_ip.version, s.peer_ip))
