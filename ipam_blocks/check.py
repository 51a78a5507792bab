"""Consistency of the whole IPAM state: what `ipam check` reports and `ipam gc` repairs.

`analyze` is pure: it takes one snapshot of the store and the set of live pods.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from netaddr import IPAddress

from ipam_blocks import block as blockmath
from ipam_blocks.allocator import IPAM
from ipam_blocks.liveness import OwnerLiveness, PodRef
from ipam_blocks.model import (
    AffinityState,
    AllocationType,
    Block,
    BlockAffinity,
    Handle,
    IPPool,
    Node,
    parse_handle,
    parse_node,
)


@dataclass(frozen=True)
class Snapshot:
    pools: list[IPPool]
    blocks: list[Block]
    affinities: list[BlockAffinity]
    handles: list[Handle]
    nodes: list[Node]
    live_pods: frozenset[PodRef]


@dataclass(frozen=True)
class Leak:
    ip: str
    handle: str
    block: str
    sequence: int
    pod: str
    namespace: str
    node: str
    allocated_at: int
    reason: str


@dataclass(frozen=True)
class HandleMismatch:
    handle: str
    recorded: dict[str, int]
    actual: dict[str, int]


@dataclass(frozen=True)
class CheckReport:
    leaks: list[Leak] = field(default_factory=list)
    handle_mismatches: list[HandleMismatch] = field(default_factory=list)
    """Handles whose per-block counts differ from the allocations (orphans have none)."""
    missing_handles: list[str] = field(default_factory=list)
    """Handles that allocations name but that do not exist."""
    outside_pools: list[str] = field(default_factory=list)
    broken_blocks: dict[str, list[str]] = field(default_factory=dict)
    duplicate_addresses: list[str] = field(default_factory=list)
    stale_affinities: list[str] = field(default_factory=list)
    """Pending/pendingDeletion affinities, or confirmed ones whose block is missing or foreign."""
    blocks_of_gone_nodes: list[str] = field(default_factory=list)
    unrecorded_blocks: list[str] = field(default_factory=list)
    """Blocks affine to a node that has no BlockAffinity for them (a claim sets the
    record before the block and a release deletes it after, so this is never in flight)."""

    @property
    def clean(self) -> bool:
        return not any(
            (
                self.leaks,
                self.handle_mismatches,
                self.missing_handles,
                self.outside_pools,
                self.broken_blocks,
                self.duplicate_addresses,
                self.stale_affinities,
                self.blocks_of_gone_nodes,
                self.unrecorded_blocks,
            )
        )

    def to_dict(self) -> dict[str, Any]:
        return {"clean": self.clean, **asdict(self)}


def _leak_reason(
    attr_pod: PodRef,
    attr_type: AllocationType,
    live: frozenset[PodRef],
    live_by_name: dict[tuple[str, str], str],
    nodes: set[str],
) -> str | None:
    if attr_type is AllocationType.POD:
        if not attr_pod.pod:
            return None
        if attr_pod in live:
            return None
        moved_to = live_by_name.get((attr_pod.namespace, attr_pod.pod))
        return f"pod moved to node {moved_to}" if moved_to else "pod no longer exists"
    if attr_pod.node and attr_pod.node not in nodes:
        return "node no longer exists"
    return None


def analyze(snap: Snapshot) -> CheckReport:
    report = CheckReport()
    nodes = {n.name for n in snap.nodes}
    live_by_name = {(p.namespace, p.pod): p.node for p in snap.live_pods}
    handles = {h.handle_id: h for h in snap.handles}
    actual: dict[str, dict[str, int]] = {}
    seen: set[IPAddress] = set()
    for blk in snap.blocks:
        problems = blockmath.check_block(blk)
        if problems:
            report.broken_blocks[blk.name] = problems
            continue
        if not any(blk.cidr in p.cidr for p in snap.pools):
            report.outside_pools.append(str(blk.cidr))
        if blk.affinity and blk.affinity not in nodes:
            report.blocks_of_gone_nodes.append(f"{blk.cidr} (node {blk.affinity})")
        for handle_id, n in blockmath.allocations_by_handle(blk).items():
            actual.setdefault(handle_id, {})[str(blk.cidr)] = n
        for ip, attr, seq in blockmath.allocated(blk):
            if ip in seen:
                report.duplicate_addresses.append(str(ip))
            seen.add(ip)
            owner = PodRef(attr.namespace, attr.pod, attr.node)
            reason = _leak_reason(owner, attr.type, snap.live_pods, live_by_name, nodes)
            if reason:
                report.leaks.append(
                    Leak(
                        str(ip),
                        attr.handle_id,
                        blk.name,
                        seq,
                        attr.pod,
                        attr.namespace,
                        attr.node,
                        attr.allocated_at,
                        reason,
                    )
                )
    for handle_id, counts in actual.items():
        handle = handles.get(handle_id)
        if handle is None:
            report.missing_handles.append(handle_id)
        elif dict(handle.blocks) != counts:
            report.handle_mismatches.append(HandleMismatch(handle_id, dict(handle.blocks), counts))
    for handle_id, handle in handles.items():
        if handle_id not in actual:
            report.handle_mismatches.append(HandleMismatch(handle_id, dict(handle.blocks), {}))
    block_owner = {blk.cidr: blk.affinity for blk in snap.blocks}
    for aff in snap.affinities:
        if aff.state is not AffinityState.CONFIRMED or block_owner.get(aff.cidr) != aff.node:
            report.stale_affinities.append(f"{aff.node} {aff.cidr} ({aff.state.value})")
    recorded = {(aff.node, aff.cidr) for aff in snap.affinities}
    for blk in snap.blocks:
        if blk.affinity and (blk.affinity, blk.cidr) not in recorded:
            report.unrecorded_blocks.append(f"{blk.cidr} (node {blk.affinity})")
    return report


def take_snapshot(ipam: IPAM, liveness: OwnerLiveness) -> Snapshot:
    store = ipam.store
    return Snapshot(
        pools=ipam.pools(),
        blocks=ipam.blocks(),
        affinities=ipam.affinities(),
        handles=[parse_handle(r) for r in store.list("IPAMHandle").items],
        nodes=[parse_node(r) for r in store.list("Node").items],
        live_pods=liveness.live_pods(),
    )


def check(ipam: IPAM, liveness: OwnerLiveness) -> CheckReport:
    return analyze(take_snapshot(ipam, liveness))
