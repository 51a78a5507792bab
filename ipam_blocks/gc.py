"""Garbage collection of leaked addresses and of what interrupted writers left behind.

Nothing is released on a single observation: a leak must be older than the grace period
and still dead when re-checked just before release, and it is released at the allocation
sequence number it was seen with, so an address handed out again meanwhile is never freed.
A handle that counts more than it holds may belong to an allocation in flight (handles are
incremented before the block is written), so it is marked suspect and only settled once it
has stayed untouched for the grace period.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from netaddr import IPAddress, IPNetwork

from ipam_blocks import block as blockmath
from ipam_blocks.allocator import CLAIMED_AT_ANNOTATION, IPAM
from ipam_blocks.check import analyze, take_snapshot
from ipam_blocks.errors import AlreadyExists, Conflict, InUse, NotFound
from ipam_blocks.handles import find_by_handle, name_taken
from ipam_blocks.liveness import OwnerLiveness
from ipam_blocks.model import (
    AffinityState,
    Handle,
    handle_name,
    render_handle,
)
from ipam_blocks.retry import retry_conflicts
from ipam_blocks.store.base import Resource

log = logging.getLogger("l3fabric.gc")

SUSPECT_ANNOTATION = "l3fabric.io/gc-suspect-since"


@dataclass
class GCResult:
    released_ips: list[str] = field(default_factory=list)
    kept_ips: list[str] = field(default_factory=list)
    """Leak candidates found alive, reallocated, or younger than the grace period."""
    settled_handles: list[str] = field(default_factory=list)
    suspect_handles: list[str] = field(default_factory=list)
    resolved_affinities: list[str] = field(default_factory=list)
    released_blocks: list[str] = field(default_factory=list)


def collect_garbage(ipam: IPAM, liveness: OwnerLiveness, grace: float) -> GCResult:
    result = GCResult()
    now = ipam.clock()
    report = analyze(take_snapshot(ipam, liveness))

    candidates = [leak for leak in report.leaks if now - leak.allocated_at >= grace]
    result.kept_ips += [leak.ip for leak in report.leaks if leak not in candidates]
    if candidates:
        recheck = analyze(take_snapshot(ipam, liveness))
        still_leaked = {(leak.ip, leak.sequence) for leak in recheck.leaks}
        confirmed = [c for c in candidates if (c.ip, c.sequence) in still_leaked]
        released = ipam.release_ips(
            {IPAddress(c.ip): c.sequence for c in confirmed},
            handles={IPAddress(c.ip): c.handle for c in confirmed},
        )
        result.released_ips += [str(ip) for ip in released]
        result.kept_ips += [c.ip for c in candidates if IPAddress(c.ip) not in released]
        for c in confirmed:
            log.info(
                "released leaked address",
                extra={"op": "gc", "ip": c.ip, "handle": c.handle, "reason": c.reason},
            )

    report = analyze(take_snapshot(ipam, liveness))
    touched = {m.handle for m in report.handle_mismatches} | set(report.missing_handles)
    for handle_id in sorted(touched):
        if _settle_handle(ipam, handle_id, now, grace):
            result.settled_handles.append(handle_id)
        else:
            result.suspect_handles.append(handle_id)

    _resolve_affinities(ipam, now, grace, result)
    return result


def _actual_counts(ipam: IPAM, handle_id: str) -> tuple[dict[str, int], str | None]:
    """-> (addresses of the handle per block, the node they were allocated for)."""
    counts = {}
    node = None
    for blk in ipam.blocks():
        n = blockmath.allocations_by_handle(blk).get(handle_id, 0)
        if n:
            counts[str(blk.cidr)] = n
            node = node or next(
                (a.node for a in blk.attributes if a.handle_id == handle_id and a.node), None
            )
    return counts, node


def _settle_handle(ipam: IPAM, handle_id: str, now: float, grace: float) -> bool:
    """Make a handle's counts equal its allocations; True once settled."""
    store = ipam.store

    def attempt() -> bool:
        actual, node = _actual_counts(ipam, handle_id)
        res = find_by_handle(store, "IPAMHandle", handle_id)
        if res is None:
            if actual:
                try:
                    store.create(render_handle(Handle(handle_id, actual, node=node)))
                except AlreadyExists:
                    if find_by_handle(store, "IPAMHandle", handle_id) is None:
                        # Never count on another handle's object: left for an operator.
                        log.warning(
                            "cannot settle handle",
                            extra={
                                "op": "gc",
                                "handle": handle_id,
                                "reason": str(name_taken(store, "IPAMHandle", handle_id)),
                            },
                        )
                        return False
                    raise Conflict("IPAMHandle", handle_name(handle_id)) from None
            return True
        recorded = dict(res.spec.get("block") or {})
        if recorded == actual:
            return True
        undercounted = any(recorded.get(cidr, 0) < n for cidr, n in actual.items())
        if not undercounted:
            since = res.annotations.get(SUSPECT_ANNOTATION)
            if since is None:
                res = store.update(_annotate(res, SUSPECT_ANNOTATION, str(int(now))))
                since = str(int(now))
            if now - float(since) < grace:
                return False
        if actual:
            store.update(
                _annotate(res.with_spec({**res.spec, "block": actual}), SUSPECT_ANNOTATION, None)
            )
        else:
            store.delete("IPAMHandle", res.name, res.revision)
        log.info("settled handle", extra={"op": "gc", "handle": handle_id, "actual": actual})
        return True

    return retry_conflicts(attempt, f"settle handle {handle_id}")


def _annotate(res: Resource, key: str, value: str | None) -> Resource:
    annotations = {k: v for k, v in res.annotations.items() if k != key}
    if value is not None:
        annotations[key] = value
    return Resource(res.kind, res.name, res.spec, res.labels, annotations, res.revision)


def _resolve_affinities(ipam: IPAM, now: float, grace: float, result: GCResult) -> None:
    nodes = {r.name for r in ipam.store.list("Node").items}
    blocks = {blk.cidr: blk for blk in ipam.blocks()}
    for res in ipam.store.list("BlockAffinity").items:
        node, cidr = res.spec["node"], IPNetwork(res.spec["cidr"])
        state = AffinityState(res.spec["state"])
        claimed_at = float(res.annotations.get(CLAIMED_AT_ANNOTATION, 0))
        blk = blocks.get(cidr)
        if state is AffinityState.CONFIRMED and blk is not None and blk.affinity == node:
            if node in nodes:
                continue
        elif now - claimed_at < grace:
            continue
        where = f"{node} {cidr} ({state.value})"
        try:
            if blk is not None and blk.affinity == node and node in nodes:
                ipam._set_affinity_state(node, cidr, AffinityState.CONFIRMED)
            elif blk is not None and blk.affinity == node:
                ipam.release_affinity(node, cidr, require_empty=True)
                result.released_blocks.append(str(cidr))
            else:
                # At the revision looked at: a claim finishing meanwhile keeps its record.
                ipam.store.delete("BlockAffinity", res.name, res.revision)
            result.resolved_affinities.append(where)
        except InUse:
            result.resolved_affinities.append(f"{where}: kept, addresses still in use")
        except (NotFound, Conflict):
            pass
    _record_unrecorded_blocks(ipam, nodes, result)


def _record_unrecorded_blocks(ipam: IPAM, nodes: set[str], result: GCResult) -> None:
    """A block affine to a node without a BlockAffinity (deleted by hand, or left by an
    older release racing a claim) gets its record back; a gone node's is released as any."""
    recorded = {(a.node, a.cidr) for a in ipam.affinities()}
    for blk in ipam.blocks():
        node = blk.affinity
        if not node or (node, blk.cidr) in recorded:
            continue
        where = f"{node} {blk.cidr} (no record)"
        try:
            if node in nodes:
                ipam._set_affinity_state(node, blk.cidr, AffinityState.CONFIRMED)
            else:
                ipam.release_affinity(node, blk.cidr, require_empty=True)
                result.released_blocks.append(str(blk.cidr))
            result.resolved_affinities.append(where)
        except InUse:
            result.resolved_affinities.append(f"{where}: recorded, addresses still in use")
