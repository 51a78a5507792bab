"""Route reflection on a reflector node (pure): which sessions BIRD serves, which stay with
the node's own ExaBGP, and the one session that joins the two.

A node whose Node carries a route reflector cluster ID reflects with BIRD 2, as Calico's
reflectors do (ExaBGP reflects through its API at 0.5-1 ms per route per client and keeps a
copy per client: 2·N² routes out, O(N²) memory; BIRD serves a thousand clients in seconds).
On such a node:

- BIRD holds every iBGP session: the route reflector clients (l3fabric nodes and iBGP
  `peerIP` routers) and the non-clients (other reflectors), with the cluster ID, next hop
  unchanged (or self where a BGPPeer says `nextHopMode: Self`), the pool-only import policy
  (plus a `peerIP` peer's accept list), its max-prefix limit, password and graceful restart.
- The node's own ExaBGP keeps its eBGP sessions (top-of-rack routers, external peers) and
  gets one more: to the local BIRD over loopback (`NODE_SPEAKER_PEER`), as a route
  reflector client. Over it the node announces its own blocks (BIRD rewrites their next
  hop to the node's address) and learns every reflected route, which the agent installs in
  the kernel as on any node.
- That loopback session sits in a cluster of its own (cluster ID = the node's address):
  BIRD prepends the cluster ID of the session a client's route came from, so the node's own
  blocks leave with the node's address in their CLUSTER_LIST, not the shared cluster ID,
  and the other reflectors of the same cluster accept them (with the shared ID they would
  drop them as a loop, and never learn this reflector's own blocks).
- BIRD's side of that session has a router ID of its own (`NODE_SPEAKER_BIRD_ID`): the
  node's ExaBGP and BIRD would otherwise open with the same BGP identifier, which iBGP
  refuses. Everywhere else BIRD's router ID is the node's address.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address

from bgp_speaker.bgp.policy import AcceptRule
from bgp_speaker.bgp.routes import IPAddr, IPNet, PeerType, SessionSpec

__all__ = [
    "NODE_SPEAKER_BIRD_ID",
    "NODE_SPEAKER_LOCAL",
    "NODE_SPEAKER_PEER",
    "ReflectorDesired",
    "ReflectorSession",
    "ReflectorSessionState",
    "TakenOver",
    "node_speaker_session",
    "reflector_desired",
    "split_sessions",
]

NODE_SPEAKER_PEER = IPv4Address("127.0.0.1")
"""BIRD's end of the loopback session with the node's own ExaBGP."""
NODE_SPEAKER_LOCAL = IPv4Address("127.0.0.2")
"""ExaBGP's end of it (any loopback address binds on Linux)."""
NODE_SPEAKER_BIRD_ID = IPv4Address("127.0.0.1")
TAKEOVER_WAIT = 120.0
"""Seconds a taken-over session's routes stay without graceful restart time of its own."""


@dataclass(frozen=True)
class ReflectorSession:
    """One BIRD session with what BIRD needs beyond the session itself."""

    spec: SessionSpec
    next_hop_self: bool = False
    accept: tuple[AcceptRule, ...] = ()
    """Prefixes outside the pools this peer may teach (installed by this node, never
    reflected)."""


@dataclass(frozen=True)
class ReflectorDesired:
    """Everything BIRD's configuration is rendered from."""

    router_id: IPv4Address
    cluster_id: IPv4Address
    local_as: int
    pools: tuple[tuple[IPNet, int], ...]
    """Enabled pools with their block sizes: the routes reflected."""
    sessions: tuple[ReflectorSession, ...]
    node_speaker: SessionSpec
    """The node's ExaBGP session to BIRD, as ExaBGP sees it."""
    node_speaker_accept: tuple[AcceptRule, ...] = field(default_factory=tuple)

    @property
    def peers(self) -> frozenset[IPAddr]:
        return frozenset(s.spec.peer_ip for s in self.sessions)


@dataclass(frozen=True)
class ReflectorSessionState:
    """One of the reflector's sessions as BIRD reports it."""

    name: str
    peer: IPAddr | None
    bgp_state: str
    """Idle, Connect, Active, OpenSent, OpenConfirm, Established (BIRD's words)."""
    since: float
    info: str
    imported: int = 0
    exported: int = 0
    last_error: str = ""

    @property
    def established(self) -> bool:
        return self.bgp_state == "Established"


def split_sessions(sessions: Sequence[SessionSpec]) -> tuple[list[SessionSpec], list[SessionSpec]]:
    """(BIRD's, ExaBGP's) sessions of a reflector node: BIRD takes every iBGP one."""
    bird = [s for s in sessions if not s.ebgp]
    speaker = [s for s in sessions if s.ebgp]
    return bird, speaker


def node_speaker_session(
    router_id: IPv4Address,
    local_as: int,
    hold_time: int,
    keepalive_time: int | None,
    graceful_restart_time: int | None,
) -> SessionSpec:
    """The node's ExaBGP session to its local BIRD, with the fabric's timers."""
    return SessionSpec(
        peer_ip=NODE_SPEAKER_PEER,
        peer_as=local_as,
        local_as=local_as,
        local_address=NODE_SPEAKER_LOCAL,
        router_id=router_id,
        peer_type=PeerType.RR,
        hold_time=hold_time,
        keepalive_time=keepalive_time,
        graceful_restart_time=graceful_restart_time,
        name="node-reflector",
    )


def reflector_desired(
    router_id: IPv4Address,
    cluster_id: IPv4Address,
    local_as: int,
    pools: Sequence[tuple[IPNet, int]],
    bird_sessions: Sequence[SessionSpec],
    node_speaker: SessionSpec,
    next_hop_self: frozenset[IPAddr],
    accept: Mapping[IPAddr, tuple[AcceptRule, ...]],
) -> ReflectorDesired:
    sessions = tuple(
        ReflectorSession(s, s.peer_ip in next_hop_self, accept.get(s.peer_ip, ()))
        for s in bird_sessions
    )
    extras = tuple(dict.fromkeys(r for s in sessions for r in s.accept))
    return ReflectorDesired(
        router_id=router_id,
        cluster_id=cluster_id,
        local_as=local_as,
        pools=tuple(pools),
        sessions=sessions,
        node_speaker=node_speaker,
        node_speaker_accept=extras,
    )


@dataclass
class TakenOver:
    """Sessions BIRD took over from the node's ExaBGP when the node became a reflector.

    BIRD needs their address pairs, so ExaBGP drops them at once (no make-before-break); what
    they taught stays in the RIB, marked stale as in a graceful restart, until BIRD's copies
    of those routes have arrived over the loopback session (not merely its End-of-RIB: BIRD
    feeds a new session at once, before its own peers are back) or their restart time has
    passed. So the node's kernel keeps forwarding meanwhile.
    """

    sessions: dict[IPAddr, tuple[SessionSpec, float]] = field(default_factory=dict)

    def update(
        self,
        before: Sequence[SessionSpec],
        configured: Collection[IPAddr],
        bird_peers: Collection[IPAddr],
        covered: Callable[[IPAddr], bool],
        now: float,
    ) -> list[IPAddr]:
        """Record sessions ExaBGP just gave up to BIRD, forget those done (``covered``: all
        the peer taught has another path, from the loopback); returns the newly taken over
        (for the caller to mark their routes stale)."""
        new = [
            s.peer_ip
            for s in before
            if s.peer_ip in bird_peers and s.peer_ip not in configured
            and s.peer_ip not in self.sessions
        ]  # fmt: skip
        for spec in before:
            if spec.peer_ip in new:
                self.sessions[spec.peer_ip] = (spec, now)
        for peer, (spec, since) in list(self.sessions.items()):
            limit = spec.graceful_restart_time or TAKEOVER_WAIT
            gone = peer not in bird_peers or peer in configured or now - since > limit
            if gone or (peer not in new and covered(peer)):
                del self.sessions[peer]
        return new

    @property
    def specs(self) -> list[SessionSpec]:
        return [spec for spec, _ in self.sessions.values()]
