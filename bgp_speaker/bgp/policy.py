"""Per-peer import and export policy (pure), on top of the fabric rules of `rib.ImportPolicy`.

Import, by the kind of session:

- every peer: a prefix inside an enabled pool is accepted under the fabric rules (DESIGN §5:
  no shorter than the pool's block size, never one of this node's own blocks, never a route
  whose ORIGINATOR_ID is this node, never one whose AS path holds our AS on eBGP). That is
  how a top-of-rack router teaches a node the other racks' blocks.
- fabric peers (other l3fabric nodes): nothing outside the pools (`outside-pools`).
- external peers (a BGPPeer with `peerIP`) may be given more to install: the prefixes listed
  in the BGPPeer's annotation `l3fabric.io/accept-prefixes` (comma-separated; `CIDR` is that
  prefix exactly, `CIDR+` that prefix or any longer one inside it), e.g. `0.0.0.0/0` for a
  default route from the top-of-rack router. The list only ever widens what is accepted
  *outside* the pools: a prefix inside a pool is judged by the fabric rules alone, so no
  list lets an external peer take over a block another node owns.

Export: a node advertises its own confirmed blocks and the addresses it borrowed (never a
block another node owns: learned routes are only ever re-advertised by a reflector, to its
iBGP neighbours, see `reflection`). Communities come from `BGPConfiguration`:
`prefixAdvertisements[].communities` apply to every exported prefix inside the entry's CIDR;
an entry is a community value `ASN:VALUE` or the name of one in `communities`.
Large communities (`A:B:C`) are not sent (ExaBGP's API is driven with standard ones only);
they are reported and skipped, as is any other malformed entry — a typo in one entry must not
stop the node from advertising.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import ip_network

from bgp_speaker.bgp.config import BgpConfig
from bgp_speaker.bgp.rib import ImportPolicy
from bgp_speaker.bgp.routes import IPAddr, IPNet, PathAttributes, SessionSpec, within
from ipam_blocks.errors import InvalidInput
from ipam_blocks.store.base import Resource

__all__ = [
    "ACCEPT_PREFIXES_ANNOTATION",
    "AcceptRule",
    "PeerPolicy",
    "export_communities",
    "parse_accept_rules",
]

log = logging.getLogger("l3fabric.agent.policy")

ACCEPT_PREFIXES_ANNOTATION = "l3fabric.io/accept-prefixes"


@dataclass(frozen=True)
class AcceptRule:
    prefix: IPNet
    or_longer: bool = False

    def matches(self, prefix: IPNet) -> bool:
        if prefix.version != self.prefix.version:
            return False
        if self.or_longer:
            return within(prefix, self.prefix)
        return prefix == self.prefix

    def __str__(self) -> str:
        return f"{self.prefix}{'+' if self.or_longer else ''}"


def parse_accept_rules(res: Resource) -> tuple[AcceptRule, ...]:
    """The accept list of a BGPPeer (its annotation); InvalidInput names the bad entry."""
    text = (res.annotations or {}).get(ACCEPT_PREFIXES_ANNOTATION, "")
    where = f"BGPPeer/{res.name}.metadata.annotations.{ACCEPT_PREFIXES_ANNOTATION}"
    rules = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        longer = item.endswith("+")
        try:
            prefix = ip_network(item.removesuffix("+"))
        except ValueError:
            raise InvalidInput(where, f"{item!r} is not CIDR or CIDR+") from None
        rules.append(AcceptRule(prefix, longer))
    return tuple(rules)


@dataclass(frozen=True)
class PeerPolicy(ImportPolicy):
    """The fabric rules plus external peers' extras."""

    accept: tuple[tuple[IPAddr, tuple[AcceptRule, ...]], ...] = ()
    """Per external peer, what it may teach outside the pools."""
    _accept: Mapping[IPAddr, tuple[AcceptRule, ...]] = field(
        default_factory=dict, init=False, compare=False, repr=False
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "_accept", dict(self.accept))

    def rejection(self, prefix: IPNet, attrs: PathAttributes, session: SessionSpec | None) -> str:
        reason = super().rejection(prefix, attrs, session)
        if reason == "outside-pools" and session is not None and self._accept:
            rules = self._accept.get(session.peer_ip)
            if rules and any(rule.matches(prefix) for rule in rules):
                reason = self._loops(attrs, session)
        return reason

    def _loops(self, attrs: PathAttributes, session: SessionSpec) -> str:
        if self.router_id is not None and attrs.originator_id == self.router_id:
            return "own-originator"
        if self.router_id is not None and attrs.next_hop == self.router_id:
            return "own-next-hop"
        if session.ebgp and self.local_as in attrs.as_path:
            return "as-path-loop"
        return ""


def export_communities(prefixes: Iterable[IPNet], cfg: BgpConfig) -> dict[IPNet, tuple[str, ...]]:
    """Per exported prefix, the communities it goes out with (sorted numerically)."""
    named = {c.name: c.value for c in cfg.communities}
    rules: list[tuple[IPNet, frozenset[str]]] = []
    for i, adv in enumerate(cfg.prefix_advertisements):
        where = f"BGPConfiguration.prefixAdvertisements[{i}]"
        try:
            cidr = ip_network(adv.cidr)
        except ValueError:
            log.error(
                "ignoring prefix advertisement",
                extra={"op": "policy", "reason": f"{where}.cidr: {adv.cidr!r} not a CIDR"},
            )
            continue
        values: set[str] = set()
        for j, entry in enumerate(adv.communities):
            value = named.get(entry, entry)
            if not _standard_community(value):
                log.error("ignoring community", extra={
                    "op": "policy",
                    "reason": f"{where}.communities[{j}]: {entry!r} is neither ASN:VALUE "
                              "(16 bits each) nor the name of one in communities",
                })  # fmt: skip
                continue
            values.add(value)
        if values:
            rules.append((cidr, frozenset(values)))
    out: dict[IPNet, tuple[str, ...]] = {}
    for prefix in prefixes:
        found: set[str] = set()
        for cidr, communities in rules:
            if within(prefix, cidr):
                found |= communities
        out[prefix] = tuple(sorted(found, key=_community_key))
    return out


def _standard_community(value: str) -> bool:
    high, sep, low = value.partition(":")
    return bool(sep) and high.isdigit() and low.isdigit() and int(high) < 65536 > int(low)


def _community_key(value: str) -> tuple[int, int]:
    high, _, low = value.partition(":")
    return int(high), int(low)
