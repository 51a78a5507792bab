"""The peering half of the routing controller: which sessions ExaBGP gets, what each peer
may teach us, what we reflect to whom, and the communities on our own routes.

The controller (`routing.RoutingController`) reads its caches and feeds events; this module
holds the decisions that go beyond the node mesh:

- `read_peering` (from the controller's caches): BGPPeers parsed, their passwords resolved
  (a peer whose password cannot be read waits, logged), the desired sessions, the per-peer
  import policy (`policy.PeerPolicy`), the reflector settings and the communities of every
  exported prefix.
- `Peering` (on the event loop): the sessions to configure now (`SessionHandover`:
  make-before-break; `PrefixLimits`: peers cut off for exceeding `maxPrefixes`), the peers'
  BGP identifiers from their OPENs, and the communities on our own routes.

Route reflection is not here: a reflector node runs BIRD for it (`reflection`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field, fields
from ipaddress import IPv4Address
from typing import Any

from bgp_speaker.bgp.config import BgpConfig, BgpPeer, NextHopMode, PasswordRef, parse_bgp_peer
from bgp_speaker.bgp.handover import SessionHandover
from bgp_speaker.bgp.limits import PrefixLimits
from bgp_speaker.bgp.passwords import PasswordUnavailable
from bgp_speaker.bgp.policy import AcceptRule, PeerPolicy, export_communities, parse_accept_rules
from bgp_speaker.bgp.rib import ImportPolicy, Rib
from bgp_speaker.bgp.routes import (
    EndOfRib,
    IPAddr,
    IPNet,
    PeerOpened,
    RoutesAnnounced,
    RoutesWithdrawn,
    SessionSpec,
    SpeakerEvent,
    SpeakerRestarted,
)
from bgp_speaker.bgp.sessions import desired_sessions, node_address
from ipam_blocks.errors import L3FabricError
from ipam_blocks.model import Node
from ipam_blocks.store.base import Resource

__all__ = ["Peering", "PeeringDesired", "describe_routes", "peer_policy", "read_peering"]

log = logging.getLogger("l3fabric.agent.routing")


@dataclass(frozen=True)
class PeeringDesired:
    """What the store says beyond the sessions themselves."""

    cluster_id: IPv4Address | None = None
    """Ours, when this node reflects (and the ID is a valid A.B.C.D)."""
    next_hop_self: frozenset[IPAddr] = frozenset()
    """Peers whose BGPPeer says `nextHopMode: Self` (reflected routes get our address)."""
    accept: tuple[tuple[IPAddr, tuple[AcceptRule, ...]], ...] = ()
    communities: BgpConfig = field(default_factory=BgpConfig)
    """The configuration the export communities come from."""
    node_addresses: frozenset[IPAddr] = frozenset()
    """Of every l3fabric node: sessions to them are kept while a fabric change replaces them."""
    waiting: tuple[tuple[IPAddr, str], ...] = ()
    """Sessions whose password cannot be read (yet), with why: desired, not configured."""


PasswordSource = Callable[[Resource, PasswordRef], str]
"""The password a BGPPeer's reference names (raises `PasswordUnavailable`)."""


def read_peering(
    password: PasswordSource,
    me: Node,
    nodes: Sequence[Node],
    cfg: BgpConfig,
    peer_resources: Iterable[Resource],
) -> tuple[list[SessionSpec], PeeringDesired]:
    """Desired sessions and the rest of the peering configuration (`password` may block: it
    may read a Secret or a file). Invalid BGPPeers are logged and left out."""
    peers: list[BgpPeer] = []
    passwords: dict[str, str] = {}
    missing: dict[str, str] = {}
    accept: dict[IPAddr, tuple[AcceptRule, ...]] = {}
    for res in peer_resources:
        try:
            peer = parse_bgp_peer(res)
            rules = parse_accept_rules(res)
        except L3FabricError as err:
            log.error("ignoring invalid BGPPeer", extra={"op": "peers", "reason": str(err)})
            continue
        if peer.password is not None:
            try:
                passwords[peer.name] = password(res, peer.password)
            except PasswordUnavailable as err:
                log.error(
                    "BGPPeer waits for its password",
                    extra={"op": "peers", "peer": res.name, "reason": str(err)},
                )
                missing[peer.name] = str(err)
        if peer.peer_ip is not None and rules:
            accept[peer.peer_ip] = rules
        peers.append(peer)
    by_name = {p.name: p for p in peers}

    def password_of(ref: PasswordRef) -> str | None:
        # desired_sessions asks per BGPPeer; the refs are resolved above, by peer name.
        return next((passwords.get(p.name) for p in peers if p.password is ref), None)

    sessions = desired_sessions(me, nodes, cfg, peers, password_of)
    addresses = {node_address(n) for n in nodes}
    next_hop_self = frozenset(
        s.peer_ip
        for s in sessions
        if (p := by_name.get(s.name)) is not None and p.next_hop_mode is NextHopMode.SELF
    )
    desired = PeeringDesired(
        cluster_id=_cluster_id(me),
        next_hop_self=next_hop_self,
        accept=tuple(sorted(accept.items(), key=lambda kv: (kv[0].version, kv[0]))),
        communities=cfg,
        node_addresses=frozenset(a for a in addresses if a is not None),
        # Never configured without the password they need: that would only be refused, or
        # come up unauthenticated against a peer that has none.
        waiting=tuple((s.peer_ip, missing[s.name]) for s in sessions if s.name in missing),
    )
    return sessions, desired


def _cluster_id(node: Node) -> IPv4Address | None:
    text = node.route_reflector_cluster_id
    if not text:
        return None
    try:
        return IPv4Address(text)
    except ValueError:
        log.error("invalid route reflector cluster ID", extra={
            "op": "peers", "node": node.name, "reason": f"{text!r} is not A.B.C.D",
        })  # fmt: skip
        return None


def peer_policy(base: ImportPolicy, desired: PeeringDesired) -> PeerPolicy:
    """The controller's fabric policy with the per-peer parts added."""
    values = {f.name: getattr(base, f.name) for f in fields(base) if f.init}
    return PeerPolicy(**values, accept=desired.accept)


class Peering:
    """Event-loop state: configured sessions, limits, router ids and reflection."""

    def __init__(self, rib: Rib) -> None:
        self.rib = rib
        self.handover = SessionHandover()
        self.limits = PrefixLimits()
        self.router_ids: dict[IPAddr, IPv4Address] = {}
        self.exported: dict[IPNet, tuple[str, ...]] = {}
        self.configured: tuple[SessionSpec, ...] = ()
        self.desired = PeeringDesired()

    # --- sessions ---------------------------------------------------------------------------

    def plan_sessions(
        self,
        desired: Sequence[SessionSpec],
        established: Collection[IPAddr],
        end_of_rib: Collection[IPAddr],
        now: float | None = None,
    ) -> tuple[SessionSpec, ...]:
        """The sessions to configure now: desired ones not cut off, plus retiring ones."""
        waiting = dict(self.desired.waiting)
        allowed = [s for s in self.limits.allowed(desired) if s.peer_ip not in waiting]
        nodes = self.desired.node_addresses
        planned = self.handover.plan(
            allowed, established, end_of_rib, self.covered,
            time.monotonic() if now is None else now, lambda peer: peer in nodes,
        )  # fmt: skip
        self.limits.set_sessions(planned)
        self.configured = planned
        return planned

    def covered(self, peer: IPAddr, retiring: Collection[IPAddr]) -> bool:
        """Whether every prefix ``peer`` taught has a path from a session not in ``retiring``."""
        for prefix in self.rib.learned_from(peer):
            paths = self.rib.candidates(prefix)
            if any(p.peer == peer for p in paths) and not any(
                p.peer != peer and p.peer not in retiring for p in paths
            ):
                return False
        return True

    # --- events -----------------------------------------------------------------------------

    def ignores(self, event: SpeakerEvent) -> bool:
        """Events to drop before the RIB: OPENs (recorded here), anything from a peer that
        was cut off and is on its way out, and routes from a session no longer configured
        (ExaBGP keeps it until its reload, which it may defer)."""
        if isinstance(event, PeerOpened):
            self.router_ids[event.peer] = event.router_id
            return True
        if isinstance(event, SpeakerRestarted):
            return False
        peer = event.peer
        if isinstance(event, (RoutesAnnounced, RoutesWithdrawn, EndOfRib)) and not any(
            s.peer_ip == peer for s in self.configured
        ):
            return True
        return self.limits.is_tripped(peer)

    def over_limit(self, event: SpeakerEvent) -> SessionSpec | None:
        """After an announcement went into the RIB: the session to cut off, if any."""
        if not isinstance(event, RoutesAnnounced) or not self.limits.limits:
            return None
        reason = self.limits.exceeded(event.peer, self.rib.received(event.peer))
        if not reason:
            return None
        spec = next((s for s in self.configured if s.peer_ip == event.peer), None)
        if spec is None:
            return None
        self.limits.trip(spec, reason)
        return spec

    # --- exports ----------------------------------------------------------------------------

    def export_changes(self, wanted: Collection[IPNet]) -> dict[tuple[str, ...], list[IPNet]]:
        """Exported prefixes that are new or whose communities changed, grouped by their
        communities; forgets prefixes no longer exported."""
        communities = export_communities(wanted, self.desired.communities)
        groups: dict[tuple[str, ...], list[IPNet]] = {}
        for prefix, values in communities.items():
            if self.exported.get(prefix) != values:
                groups.setdefault(values, []).append(prefix)
                self.exported[prefix] = values
        for prefix in [p for p in self.exported if p not in communities]:
            del self.exported[prefix]
        return groups

    def set_desired(self, desired: PeeringDesired) -> None:
        self.desired = desired

    def retiring(self) -> list[SessionSpec]:
        """Sessions no longer desired, kept until their replacements carry their routes."""
        return [r.spec for r in self.handover.retiring.values()]

    def note(self, peer: IPAddr) -> str:
        """What `node status` says about a session beyond its state."""
        if peer in self.handover.retiring:
            return "retiring: kept until its routes have another path"
        waiting = dict(self.desired.waiting)
        if peer in waiting:
            return f"waiting for its password ({waiting[peer]})"
        return self.limits.reason(peer)


def describe_routes(rib: Rib, prefix: str | None = None) -> dict[str, Any]:
    """The RIB as the `node.routes` verb shows it: per prefix its accepted paths with their
    attributes (the best one marked)."""
    wanted = None if not prefix else {str(p) for p in [prefix]}
    routes = []
    for net in sorted(rib.prefixes(), key=lambda p: (p.version, p)):
        if wanted is not None and str(net) not in wanted:
            continue
        selection = rib.select(net)
        if selection is None:
            continue  # nothing accepted (`node status` counts what policy dropped)
        paths = []
        for path in sorted(rib.candidates(net), key=lambda p: (p.peer.version, p.peer)):
            a = path.attributes
            paths.append({
                "peer": str(path.peer),
                "best": path == selection.best,
                "ebgp": path.ebgp,
                "next_hop": str(a.next_hop),
                "as_path": list(a.as_path),
                "origin": a.origin,
                "local_pref": a.local_pref,
                "med": a.med,
                "originator_id": str(a.originator_id) if a.originator_id else None,
                "cluster_list": [str(c) for c in a.cluster_list],
                "communities": list(a.communities),
            })  # fmt: skip
        routes.append({"prefix": str(net), "paths": paths})
    return {"routes": routes}
