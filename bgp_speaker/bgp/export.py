"""What a node advertises (pure): its confirmed blocks and the addresses it borrowed.

A block is exported only when its affinity to this node is confirmed *and* the block itself
names this node: a pending claim is not ownership. Each exported block also gets a local
blackhole route, so traffic to an unused address in it is dropped here instead of looping
back to the default route; the pods' own /32 routes are more specific and win.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import ip_network

from bgp_speaker.bgp.routes import IPNet, KernelRoute
from ipam_blocks import block as blockmath
from ipam_blocks.model import AffinityState, Block, BlockAffinity


@dataclass(frozen=True)
class Exports:
    blocks: frozenset[IPNet] = frozenset()
    borrowed: frozenset[IPNet] = frozenset()
    """Host routes (/32, /128) for addresses this node holds in other nodes' blocks."""

    @property
    def prefixes(self) -> frozenset[IPNet]:
        return self.blocks | self.borrowed


def compute_exports(
    node: str, blocks: Iterable[Block], affinities: Iterable[BlockAffinity]
) -> Exports:
    confirmed = {
        a.cidr for a in affinities if a.node == node and a.state is AffinityState.CONFIRMED
    }
    own: set[IPNet] = set()
    borrowed: set[IPNet] = set()
    for blk in blocks:
        if blk.affinity == node:
            if blk.cidr in confirmed:
                own.add(ip_network(str(blk.cidr)))
            continue
        for ip, attr, _seq in blockmath.allocated(blk):
            if attr.node == node:
                borrowed.add(ip_network(f"{ip}/{32 if ip.version == 4 else 128}"))
    return Exports(frozenset(own), frozenset(borrowed))


def blackhole_routes(exports: Exports) -> dict[IPNet, KernelRoute]:
    return {prefix: KernelRoute(prefix, blackhole=True) for prefix in exports.blocks}
