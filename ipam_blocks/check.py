"""Consistency of the whole IPAM state: what `ipam check` reports and `ipam gc` repairs.

`analyze` is pure: it takes one snapshot of the store and the set of live pods. A snapshot
is several reads, and writers keep working between them (an assignment counts on its handle
before it writes the block), so `check` reports only what a fresh snapshot, taken a moment
later, finds again unchanged; it says how many findings it skipped.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
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
    Workload,
    parse_handle,
    parse_node,
    parse_workload,
)

RECHECK_AFTER = 1.0
"""Seconds between the read that finds a problem and the fresh read that must confirm it:
longer than one write sequence of an allocation in flight against a Kubernetes API."""


@dataclass(frozen=True)
class Snapshot:
    pools: list[IPPool]
    blocks: list[Block]
    affinities: list[BlockAffinity]
    handles: list[Handle]
    nodes: list[Node]
    live_pods: frozenset[PodRef]
    workloads: list[Workload] = field(default_factory=list)
    """Embedded mode: the attachments the agents made, with the addresses they use."""


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
    addresses_not_held: list[str] = field(default_factory=list)
    """Addresses a live pod interface uses (its Workload record names them) that IPAM shows
    as free or as held by another handle: the next assignment may hand them out again."""
    skipped: int = 0
    """Findings of the first read that a fresh read did not confirm (writes in flight)."""

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
                self.addresses_not_held,
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
    report.addresses_not_held.extend(_addresses_not_held(snap))
    return report


def _addresses_not_held(snap: Snapshot) -> list[str]:
    holders = {
        ip: attr.handle_id
        for blk in snap.blocks
        if not blockmath.check_block(blk)
        for ip, attr, _ in blockmath.allocated(blk)
    }
    found = []
    for w in snap.workloads:
        for text in w.addresses:
            holder = holders.get(IPAddress(text))
            if holder == w.handle_id:
                continue
            where = "free in IPAM" if holder is None else f"held by handle {holder!r}"
            pod = f"{w.namespace}/{w.pod}" if w.pod else "-"
            found.append(
                f"{text} used by pod {pod} interface {w.ifname or '-'} on node {w.node} "
                f"(handle {w.handle_id!r}) but {where}"
            )
    return found


def take_snapshot(ipam: IPAM, liveness: OwnerLiveness) -> Snapshot:
    store = ipam.store
    return Snapshot(
        pools=ipam.pools(),
        blocks=ipam.blocks(),
        affinities=ipam.affinities(),
        handles=[parse_handle(r) for r in store.list("IPAMHandle").items],
        nodes=[parse_node(r) for r in store.list("Node").items],
        live_pods=liveness.live_pods(),
        workloads=(
            [parse_workload(r) for r in store.list("Workload").items]
            if store.holds_workloads
            else []
        ),
    )


def check(
    ipam: IPAM,
    liveness: OwnerLiveness,
    recheck_after: float = RECHECK_AFTER,
    sleep: Callable[[float], None] = time.sleep,
) -> CheckReport:
    """The findings of one snapshot that a fresh snapshot `recheck_after` seconds later
    finds again, unchanged; the others are counted as skipped."""
    first = analyze(take_snapshot(ipam, liveness))
    if first.clean:
        return first
    sleep(recheck_after)
    return confirmed(first, analyze(take_snapshot(ipam, liveness)))


def confirmed(first: CheckReport, fresh: CheckReport) -> CheckReport:
    """`fresh`'s findings that `first` had too; how many of `first`'s it did not repeat."""
    kept: dict[str, Any] = {}
    skipped = 0
    for f in fields(CheckReport):
        before, now = getattr(first, f.name), getattr(fresh, f.name)
        if isinstance(before, dict):
            kept[f.name] = {k: v for k, v in now.items() if before.get(k) == v}
        elif isinstance(before, list):
            kept[f.name] = [item for item in now if item in before]
        else:
            continue
        skipped += max(0, len(before) - len(kept[f.name]))
    return CheckReport(**kept, skipped=skipped)
