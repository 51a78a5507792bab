"""Route reflection (RFC 4456), pure: which learned path goes to which iBGP neighbour, and
with which ORIGINATOR_ID and CLUSTER_LIST.

A node whose Node carries a route reflector cluster ID reflects. Per prefix it takes the
RIB's best path (deterministic: rank, then the shorter CLUSTER_LIST, the lower ORIGINATOR_ID
or router id, the lower peer address; see `rib.Path`) and gives it to its iBGP neighbours:

- a path from a client goes to every other client and to every non-client (§6);
- a path from a non-client goes to the clients only;
- never back to the neighbour it came from, nor to the neighbour that originated it
  (its router id equals the path's ORIGINATOR_ID: it would drop it, §8), nor to another
  reflector of our own cluster (it would find our cluster ID in the CLUSTER_LIST and drop
  it: clients of one cluster peer with all of its reflectors);
- ORIGINATOR_ID is set to the router id of the neighbour the path came from unless the path
  has one already; our cluster ID is prepended to the CLUSTER_LIST (§8);
- every other attribute goes out unchanged (next hop, AS path, LOCAL_PREF, MED,
  communities), except the next hop for a neighbour whose BGPPeer says `nextHopMode: Self`.

What is *not* reflected, by design (the RIB's import policy decides what is accepted at all):
paths learned over eBGP (a reflector is no transit for external routes: every node that
needs them peers with the external router itself, which is what `nodeSelector` is for),
paths the import policy rejected (prefixes outside the pools, our own blocks, loops), and
the reflector's own blocks, which it exports like any node (`ExaBGPSpeaker.announce`).
Prefixes outside the pools that an external peer may teach a node (a default route) are
installed by that node only and never reflected either: the reflector reflects exactly the
pool routes its clients exchange.

`AdjRibOut` remembers what went to each neighbour, so the controller sends only changes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address

from bgp_speaker.bgp.rib import Path, Selection
from bgp_speaker.bgp.routes import IPAddr, IPNet, PathAttributes, SessionSpec

__all__ = [
    "AdjRibOut",
    "Neighbour",
    "OutChanges",
    "Reflector",
    "neighbours_from_sessions",
]


@dataclass(frozen=True)
class Neighbour:
    """An iBGP session, as route reflection sees it."""

    address: IPAddr
    client: bool
    local_address: IPAddr
    router_id: IPv4Address | None = None
    """Its BGP identifier (from its OPEN); None until known: its address stands in."""
    cluster_id: IPv4Address | None = None
    """Set when the neighbour is a reflector we know of (an l3fabric node with a cluster ID)."""
    next_hop_self: bool = False

    @property
    def identity(self) -> IPAddr:
        return self.router_id or self.address


@dataclass(frozen=True)
class Reflector:
    """A reflector's view of its iBGP neighbours."""

    cluster_id: IPv4Address
    neighbours: Mapping[IPAddr, Neighbour] = field(default_factory=dict)

    def routes_for(self, selection: Selection | None) -> dict[IPAddr, PathAttributes]:
        """What each neighbour should hold for one prefix (absent: nothing)."""
        if selection is None:
            return {}
        best = selection.best
        source = self.neighbours.get(best.peer)
        if best.ebgp or source is None:
            return {}
        reflected = reflected_attributes(best, source, self.cluster_id)
        out: dict[IPAddr, PathAttributes] = {}
        for target in self.neighbours.values():
            if not _passes(source, target, reflected, self.cluster_id):
                continue
            if target.next_hop_self and reflected.next_hop != target.local_address:
                out[target.address] = replace(reflected, next_hop=target.local_address)
            else:
                out[target.address] = reflected
        return out

    def plan(
        self, prefixes: Iterable[IPNet], select: Callable[[IPNet], Selection | None]
    ) -> dict[IPNet, dict[IPAddr, PathAttributes]]:
        return {prefix: self.routes_for(select(prefix)) for prefix in prefixes}


def reflected_attributes(best: Path, source: Neighbour, cluster_id: IPv4Address) -> PathAttributes:
    a = best.attributes
    originator = a.originator_id
    if originator is None:
        identity = source.identity
        originator = identity if isinstance(identity, IPv4Address) else None
    return replace(a, originator_id=originator, cluster_list=(cluster_id, *a.cluster_list))


def _passes(
    source: Neighbour, target: Neighbour, reflected: PathAttributes, cluster_id: IPv4Address
) -> bool:
    if target.address == source.address:
        return False
    if not source.client and not target.client:
        return False  # non-client to non-client: the iBGP split horizon still holds
    if target.identity == reflected.originator_id or target.address == reflected.originator_id:
        return False
    return target.cluster_id != cluster_id


def neighbours_from_sessions(
    sessions: Iterable[SessionSpec],
    router_ids: Mapping[IPAddr, IPv4Address],
    cluster_ids: Mapping[IPAddr, IPv4Address],
    next_hop_self: Iterable[IPAddr] = (),
) -> dict[IPAddr, Neighbour]:
    """The iBGP sessions among `sessions` as neighbours; eBGP sessions are not reflected to."""
    nh_self = set(next_hop_self)
    return {
        s.peer_ip: Neighbour(
            address=s.peer_ip,
            client=s.rr_client,
            local_address=s.local_address,
            router_id=router_ids.get(s.peer_ip),
            cluster_id=cluster_ids.get(s.peer_ip),
            next_hop_self=s.peer_ip in nh_self,
        )
        for s in sessions
        if not s.ebgp
    }


@dataclass(frozen=True)
class OutChanges:
    """What to send: per neighbour, announcements grouped by attributes, and withdrawals."""

    announce: dict[IPAddr, dict[PathAttributes, list[IPNet]]] = field(default_factory=dict)
    withdraw: dict[IPAddr, list[IPNet]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.announce or self.withdraw)

    def announce_groups(self) -> list[tuple[tuple[IPAddr, ...], PathAttributes, list[IPNet]]]:
        """The announcements as (neighbours, attributes, prefixes): a route going to several
        neighbours with the same attributes (a client's block, to every other client) is one
        group, sent once to all of them."""
        peers_of: dict[PathAttributes, dict[IPNet, list[IPAddr]]] = {}
        for address, groups in self.announce.items():
            for attributes, prefixes in groups.items():
                by_prefix = peers_of.setdefault(attributes, {})
                for prefix in prefixes:
                    by_prefix.setdefault(prefix, []).append(address)
        out: list[tuple[tuple[IPAddr, ...], PathAttributes, list[IPNet]]] = []
        for attributes, by_prefix in peers_of.items():
            for peers, prefixes in _by_peer_set(by_prefix).items():
                out.append((peers, attributes, prefixes))
        return out

    def withdraw_groups(self) -> list[tuple[tuple[IPAddr, ...], list[IPNet]]]:
        """The withdrawals as (neighbours, prefixes), grouped as `announce_groups`."""
        by_prefix: dict[IPNet, list[IPAddr]] = {}
        for address, prefixes in self.withdraw.items():
            for prefix in prefixes:
                by_prefix.setdefault(prefix, []).append(address)
        return list(_by_peer_set(by_prefix).items())

    @property
    def routes(self) -> int:
        return sum(len(p) for groups in self.announce.values() for p in groups.values()) + sum(
            len(p) for p in self.withdraw.values()
        )


def _by_peer_set(
    by_prefix: Mapping[IPNet, list[IPAddr]],
) -> dict[tuple[IPAddr, ...], list[IPNet]]:
    out: dict[tuple[IPAddr, ...], list[IPNet]] = {}
    for prefix, peers in by_prefix.items():
        out.setdefault(tuple(sorted(peers)), []).append(prefix)
    return out


class AdjRibOut:
    """Per neighbour, the reflected routes it was sent (level state, diffed on update)."""

    def __init__(self) -> None:
        self.routes: dict[IPAddr, dict[IPNet, PathAttributes]] = {}

    def forget(self, neighbours: Iterable[IPAddr]) -> None:
        """These sessions are gone from the speaker (and with them what it held for them)."""
        for address in neighbours:
            self.routes.pop(address, None)

    def neighbours(self) -> set[IPAddr]:
        return set(self.routes)

    def prefixes(self) -> set[IPNet]:
        return {prefix for table in self.routes.values() for prefix in table}

    def count(self, neighbour: IPAddr) -> int:
        return len(self.routes.get(neighbour, ()))

    def update(
        self,
        plan: Mapping[IPNet, Mapping[IPAddr, PathAttributes]],
        neighbours: Iterable[IPAddr],
    ) -> OutChanges:
        """Bring the given prefixes to `plan` for `neighbours` (the sessions the plan covers);
        returns the changes and records them as sent."""
        changes = OutChanges()
        for address in neighbours:
            table = self.routes.setdefault(address, {})
            groups: dict[PathAttributes, list[IPNet]] = {}
            gone: list[IPNet] = []
            for prefix, per_peer in plan.items():
                wanted = per_peer.get(address)
                held = table.get(prefix)
                if wanted is None:
                    if held is not None:
                        del table[prefix]
                        gone.append(prefix)
                elif wanted != held:
                    table[prefix] = wanted
                    groups.setdefault(wanted, []).append(prefix)
            if groups:
                changes.announce[address] = groups
            if gone:
                changes.withdraw[address] = gone
            if not table:
                del self.routes[address]
        return changes
