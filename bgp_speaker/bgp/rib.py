"""The routing information base (pure): Adj-RIB-In per peer, import policy, best path, ECMP.

Every received route is kept, accepted or not, so a policy change (a pool added, a block
claimed) re-evaluates what was already learned instead of waiting for a route refresh.
Updates return the prefixes whose selection may have changed; the caller turns those into
kernel routes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Address

from bgp_speaker.bgp.routes import (
    IPAddr,
    IPNet,
    KernelRoute,
    NextHop,
    PathAttributes,
    SessionSpec,
    within,
)

_ORIGIN_RANK = {"igp": 0, "egp": 1, "incomplete": 2}
DEFAULT_LOCAL_PREF = 100


@dataclass(frozen=True)
class ImportPolicy:
    """What a fabric peer may teach us (DESIGN §5)."""

    pools: tuple[tuple[IPNet, int], ...] = ()
    """Enabled pools with their block sizes."""
    own_blocks: frozenset[IPNet] = frozenset()
    router_id: IPv4Address | None = None
    local_as: int = 0

    def rejection(self, prefix: IPNet, attrs: PathAttributes, session: SessionSpec | None) -> str:
        """Why the route is dropped, or "" when it is accepted."""
        pool = next((size for net, size in self.pools if within(prefix, net)), None)
        if pool is None:
            return "outside-pools"
        if prefix.prefixlen < pool:
            return "shorter-than-block"
        if prefix in self.own_blocks:
            return "own-block"
        if self.router_id is not None and attrs.originator_id == self.router_id:
            return "own-originator"
        if self.router_id is not None and attrs.next_hop == self.router_id:
            return "own-next-hop"
        if session is not None and session.ebgp and self.local_as in attrs.as_path:
            return "as-path-loop"
        return ""


@dataclass(frozen=True)
class Path:
    peer: IPAddr
    attributes: PathAttributes
    ebgp: bool

    def rank(self) -> tuple[int, int, int, int, int]:
        """Attributes that must tie for paths to share a route (ECMP); lower wins."""
        a = self.attributes
        return (
            -(a.local_pref if a.local_pref is not None else DEFAULT_LOCAL_PREF),
            len(a.as_path),
            _ORIGIN_RANK.get(a.origin, 3),
            a.med or 0,
            0 if self.ebgp else 1,
        )

    def tiebreak(self) -> tuple[int, int, int]:
        a = self.attributes
        router = a.originator_id or self.peer
        return (len(a.cluster_list), int(router), int(self.peer))


@dataclass(frozen=True)
class Selection:
    best: Path
    multipath: tuple[Path, ...]
    """Every accepted path that ties with the best on rank; the best included."""


@dataclass
class PeerCounters:
    dropped: dict[str, int] = field(default_factory=dict)
    """Announcements rejected by policy since the session came up, by reason."""


class Rib:
    def __init__(self, policy: ImportPolicy = ImportPolicy()) -> None:
        self.policy = policy
        # Per prefix and peer: the attributes, and the policy's verdict on them ("" accepted),
        # judged once on arrival and again only when the policy or the sessions change.
        self._paths: dict[IPNet, dict[IPAddr, tuple[PathAttributes, str]]] = {}
        self._by_peer: dict[IPAddr, set[IPNet]] = {}
        self._sessions: dict[IPAddr, SessionSpec] = {}
        self._stale: dict[IPAddr, set[IPNet]] = {}
        self._held: set[IPAddr] = set()
        self.counters: dict[IPAddr, PeerCounters] = {}

    # --- inputs -----------------------------------------------------------------------------

    def set_sessions(self, sessions: Iterable[SessionSpec]) -> set[IPNet]:
        """Forget peers that are no longer wanted; returns prefixes that may have changed."""
        wanted = {s.peer_ip: s for s in sessions}
        changed = {p for p in self._by_peer if self._sessions.get(p) != wanted.get(p)}
        self._sessions = wanted
        affected: set[IPNet] = set()
        for peer in changed:
            if peer in wanted:
                affected |= self._rejudge(self._by_peer[peer], {peer})
            else:
                affected |= self.drop_peer(peer)
        return affected

    def set_policy(self, policy: ImportPolicy) -> set[IPNet]:
        if policy == self.policy:
            return set()
        self.policy = policy
        return self._rejudge(self._paths, None)

    def _rejudge(self, prefixes: Iterable[IPNet], peers: set[IPAddr] | None) -> set[IPNet]:
        """Judge held routes again; returns the prefixes whose acceptance changed."""
        changed = set()
        for prefix in prefixes:
            paths = self._paths[prefix]
            for peer, (attrs, verdict) in paths.items():
                if peers is None or peer in peers:
                    now = self.policy.rejection(prefix, attrs, self._sessions.get(peer))
                    if now != verdict:
                        paths[peer] = (attrs, now)
                        changed.add(prefix)
        return changed

    def announce(
        self, peer: IPAddr, prefixes: Iterable[IPNet], attrs: PathAttributes
    ) -> set[IPNet]:
        held = self._by_peer.setdefault(peer, set())
        counters = self.counters.setdefault(peer, PeerCounters())
        session = self._sessions.get(peer)
        stale = self._stale.get(peer)
        affected = set()
        for prefix in prefixes:
            if stale:
                stale.discard(prefix)  # learned again: no longer stale
            reason = self.policy.rejection(prefix, attrs, session)
            if reason:
                counters.dropped[reason] = counters.dropped.get(reason, 0) + 1
            self._paths.setdefault(prefix, {})[peer] = (attrs, reason)
            held.add(prefix)
            affected.add(prefix)
        return affected

    def withdraw(self, peer: IPAddr, prefixes: Iterable[IPNet]) -> set[IPNet]:
        held = self._by_peer.get(peer, set())
        affected = set()
        for prefix in prefixes:
            if prefix in held:
                held.discard(prefix)
                paths = self._paths[prefix]
                del paths[peer]
                if not paths:
                    del self._paths[prefix]
                affected.add(prefix)
        return affected

    def drop_peer(self, peer: IPAddr) -> set[IPNet]:
        """The session went down: everything it taught us goes."""
        held = self.withdraw(peer, list(self._by_peer.get(peer, ())))
        self._by_peer.pop(peer, None)
        self._stale.pop(peer, None)
        self._held.discard(peer)
        self.counters.pop(peer, None)
        return held

    def hold(self, peer: IPAddr) -> None:
        """Keep what the peer announces out of selection until `release` (its initial table
        is judged as a whole: see `routing`)."""
        self._held.add(peer)

    def release(self, peer: IPAddr) -> set[IPNet]:
        """The held peer's routes become selectable; returns the prefixes they touch."""
        if peer not in self._held:
            return set()
        self._held.discard(peer)
        return set(self._by_peer.get(peer, ()))

    def is_held(self, peer: IPAddr) -> bool:
        return peer in self._held

    def mark_stale(self, peer: IPAddr) -> None:
        """Graceful restart, receiving side (RFC 4724 §4.2): the session went down but the
        peer restarts; keep what it taught us, marked stale, so forwarding goes on. What it
        does not announce again is removed by `sweep_stale` (at its End-of-RIB, or when its
        restart time runs out). Selections do not change."""
        held = self._by_peer.get(peer)
        if held:
            self._stale.setdefault(peer, set()).update(held)
        self.counters.pop(peer, None)

    def sweep_stale(self, peer: IPAddr) -> set[IPNet]:
        """Remove the peer's routes still stale; returns prefixes that may have changed."""
        return self.withdraw(peer, list(self._stale.pop(peer, ())))

    def stale(self, peer: IPAddr) -> int:
        return len(self._stale.get(peer, ()))

    # --- outputs ----------------------------------------------------------------------------

    def _accepted(self, prefix: IPNet) -> list[Path]:
        out = []
        for peer, (attrs, verdict) in self._paths.get(prefix, {}).items():
            if not verdict and peer not in self._held:
                session = self._sessions.get(peer)
                out.append(Path(peer, attrs, bool(session and session.ebgp)))
        return out

    def select(self, prefix: IPNet) -> Selection | None:
        paths = self._accepted(prefix)
        if len(paths) < 2:  # the common case, and nothing to rank
            return Selection(paths[0], (paths[0],)) if paths else None
        best_rank = min(p.rank() for p in paths)
        tied = sorted((p for p in paths if p.rank() == best_rank), key=Path.tiebreak)
        return Selection(tied[0], tuple(tied))

    def prefixes(self) -> list[IPNet]:
        return list(self._paths)

    def learned_from(self, peer: IPAddr) -> set[IPNet]:
        """Every prefix the peer announced and still holds (accepted or not)."""
        return set(self._by_peer.get(peer, ()))

    def candidates(self, prefix: IPNet) -> list[Path]:
        """Every accepted path for the prefix (what `select` chooses from)."""
        return self._accepted(prefix)

    def received(self, peer: IPAddr) -> int:
        return len(self._by_peer.get(peer, ()))

    def accepted(self, peer: IPAddr) -> int:
        return sum(1 for prefix in self._by_peer.get(peer, ()) if not self._paths[prefix][peer][1])

    def dropped_total(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for counters in self.counters.values():
            for reason, n in counters.dropped.items():
                totals[reason] = totals.get(reason, 0) + n
        return totals


def kernel_route(prefix: IPNet, selection: Selection) -> KernelRoute:
    """Plain routes via the selected next hops (encapsulation decides otherwise later)."""
    multipath = selection.multipath
    if len(multipath) == 1:
        return KernelRoute(prefix, (NextHop(multipath[0].attributes.next_hop),))
    hops = sorted({NextHop(p.attributes.next_hop) for p in multipath})
    return KernelRoute(prefix, tuple(hops))


def desired_routes(rib: Rib, prefixes: Iterable[IPNet]) -> dict[IPNet, KernelRoute | None]:
    """Kernel routes for the given prefixes; None where the prefix should have no route."""
    out: dict[IPNet, KernelRoute | None] = {}
    for prefix in prefixes:
        selection = rib.select(prefix)
        out[prefix] = kernel_route(prefix, selection) if selection else None
    return out
