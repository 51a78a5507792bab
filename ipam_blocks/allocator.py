"""Block IPAM operations against a store (DESIGN §4).

Orderings that keep the store consistent if a process dies between two writes:

- assign: increment the handle first, then CAS the block; undo the handle if the block write
  fails. A crash in between leaves a handle counting more than it holds, never an address
  without a handle; `ipam gc` settles the count.
- release: CAS the block first, then decrement the handle.
- claim: create the affinity *pending*, create the block, confirm the affinity. A pending
  affinity is not ownership: its block is neither used nor advertised.
"""

from __future__ import annotations

import contextlib
import logging
import time
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace

from netaddr import IPAddress, IPNetwork

from ipam_blocks import block as blockmath
from ipam_blocks.errors import (
    AlreadyExists,
    Conflict,
    InUse,
    InvalidInput,
    NotFound,
    NoUsablePool,
    PoolExhausted,
)
from ipam_blocks.handles import find_by_handle, name_taken
from ipam_blocks.model import (
    IPAM_CONFIG_NAME,
    NODE_LABEL,
    AffinityState,
    AllocationType,
    Attribute,
    Block,
    BlockAffinity,
    Handle,
    IPAMConfig,
    IPPool,
    Node,
    affinity_name,
    block_name,
    handle_name,
    node_labels,
    parse_affinity,
    parse_block,
    parse_handle,
    parse_ipam_config,
    parse_node,
    parse_pool,
    render_affinity,
    render_block,
    render_handle,
)
from ipam_blocks.retry import retry_conflicts
from ipam_blocks.selector import parse_selector_text
from ipam_blocks.store.base import Resource, Store

log = logging.getLogger("l3fabric.ipam")

CLAIMED_AT_ANNOTATION = "l3fabric.io/claimed-at"


@dataclass(frozen=True)
class AssignRequest:
    node: str
    handle_id: str
    count: int = 1
    version: int = 4
    pod: str = ""
    namespace: str = ""
    type: AllocationType = AllocationType.POD
    pools: tuple[str, ...] = ()
    """Restrict to these pool names (empty: every pool that selects the node)."""


class IPAM:
    def __init__(self, store: Store, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock
        self._last_used: dict[str, IPNetwork] = {}
        """Per node, the affine block this IPAM last assigned from; tried first next time. A
        hint only (the block is read and checked like any other): it spares a node with many
        full blocks from reading all of them on every assignment."""

    # --- reads ------------------------------------------------------------------------------

    def pools(self) -> list[IPPool]:
        return sorted(
            (parse_pool(r) for r in self.store.list("IPPool").items), key=lambda p: p.name
        )

    def config(self) -> IPAMConfig:
        try:
            return parse_ipam_config(self.store.get("IPAMConfig", IPAM_CONFIG_NAME))
        except NotFound:
            return IPAMConfig()

    def node(self, name: str) -> Node:
        try:
            return parse_node(self.store.get("Node", name))
        except NotFound:
            raise InvalidInput("node", f"unknown node {name!r}") from None

    def read_block(self, cidr: IPNetwork) -> Block:
        return parse_block(self.store.get("IPAMBlock", block_name(cidr)))

    def blocks(self) -> list[Block]:
        return [parse_block(r) for r in self.store.list("IPAMBlock").items]

    def affinities(self, node: str | None = None) -> list[BlockAffinity]:
        selector = parse_selector_text(f"{NODE_LABEL}={node}" if node else None)
        return [parse_affinity(r) for r in self.store.list("BlockAffinity", selector).items]

    def _affinities_in(self, node: str, pools: list[IPPool]) -> list[BlockAffinity]:
        return [a for a in self.affinities(node) if any(a.cidr in p.cidr for p in pools)]

    def usable_pools(self, node: Node, version: int, names: Iterable[str] = ()) -> list[IPPool]:
        pools = self.pools()
        wanted = set(names)
        unknown = wanted - {p.name for p in pools}
        if unknown:
            raise InvalidInput("pool", f"unknown pool(s) {sorted(unknown)}")
        return [
            p
            for p in pools
            if (not wanted or p.name in wanted)
            and not p.disabled
            and p.version == version
            and p.node_selector.matches(node.labels)
        ]

    # --- the one write path for blocks --------------------------------------------------------

    def _write_block(self, block: Block) -> Block:
        """CAS-write a block, bumping its sequence number (the only place that does)."""
        bumped = replace(block, sequence_number=block.sequence_number + 1)
        return parse_block(self.store.update(render_block(bumped)))

    def _create_block(self, block: Block) -> Block:
        return parse_block(self.store.create(render_block(block)))

    # --- handles ----------------------------------------------------------------------------

    def _adjust_handle(
        self, handle_id: str, cidr: IPNetwork, delta: int, node: str | None = None
    ) -> None:
        """Count `delta` more addresses of the handle in `cidr`; `node`, the node they are
        allocated for, labels a handle created here or one that has no label yet."""

        def attempt() -> None:
            res = find_by_handle(self.store, "IPAMHandle", handle_id)
            if res is None:
                if delta <= 0:
                    return
                try:
                    self.store.create(
                        render_handle(Handle(handle_id, {str(cidr): delta}, node=node))
                    )
                except AlreadyExists:
                    if find_by_handle(self.store, "IPAMHandle", handle_id) is None:
                        raise name_taken(self.store, "IPAMHandle", handle_id) from None
                    # Created by another writer since our read: count on top of theirs.
                    raise Conflict("IPAMHandle", handle_name(handle_id)) from None
                return
            handle = parse_handle(res)
            counts = dict(handle.blocks)
            counts[str(cidr)] = max(0, counts.get(str(cidr), 0) + delta)
            if counts[str(cidr)] == 0:
                del counts[str(cidr)]
            if counts:
                owner = handle.node or node
                self.store.update(render_handle(replace(handle, blocks=counts, node=owner)))
            else:
                self.store.delete("IPAMHandle", handle.name, handle.revision)

        retry_conflicts(attempt, f"handle {handle_id}")

    # --- assignment -------------------------------------------------------------------------

    def auto_assign(self, req: AssignRequest) -> list[IPAddress]:
        """Addresses for a workload: affine blocks, then a new block, then borrowing."""
        if req.count < 1:
            raise InvalidInput("count", "must be at least 1")
        if req.version not in (4, 6):
            raise InvalidInput("version", "must be 4 or 6")
        handle_name(req.handle_id)
        node = self.node(req.node)
        pools = self.usable_pools(node, req.version, req.pools)
        if not pools:
            raise NoUsablePool(
                f"no enabled IPv{req.version} pool selects node {req.node!r}"
                + (f" among {list(req.pools)}" if req.pools else "")
            )
        attr = Attribute(
            handle_id=req.handle_id,
            pod=req.pod,
            namespace=req.namespace,
            node=req.node,
            type=req.type,
            allocated_at=int(self.clock()),
        )
        cfg = self.config()
        ips: list[IPAddress] = []
        try:
            self._assign_into(ips, req, attr, cfg, pools)
        except BaseException:
            if ips:
                self.release_ips(dict.fromkeys(ips))
            raise
        return ips

    def _assign_into(
        self,
        ips: list[IPAddress],
        req: AssignRequest,
        attr: Attribute,
        cfg: IPAMConfig,
        pools: list[IPPool],
    ) -> None:
        mine = self._affinities_in(req.node, pools)
        # A pending affinity is a claim this node started and did not finish (a crash, or a
        # sibling process mid-claim): finishing it is safe either way, and it must happen
        # here because the walk for new blocks skips blocks that already exist.
        pending = [a for a in mine if a.state is AffinityState.PENDING]
        for aff in pending:
            self._claim(req.node, aff.cidr)
        if pending:
            mine = self._affinities_in(req.node, pools)
        in_pools = [a for a in mine if a.state is AffinityState.CONFIRMED]
        last = self._last_used.get(req.node)
        for aff in sorted(in_pools, key=lambda a: (a.cidr != last, a.cidr.version, a.cidr.first)):
            got = self._assign_from_block(aff.cidr, req.count - len(ips), attr, req.node)
            if got:
                self._last_used[req.node] = aff.cidr
                ips += got
            if len(ips) == req.count:
                return
        owned = len(in_pools)
        while cfg.auto_allocate_blocks and (
            cfg.max_blocks_per_host == 0 or owned < cfg.max_blocks_per_host
        ):
            claimed = self._claim_new_block(req.node, pools)
            if claimed is None:
                break
            owned += 1
            self._last_used[req.node] = claimed
            ips += self._assign_from_block(claimed, req.count - len(ips), attr, req.node)
            if len(ips) == req.count:
                return
        if not cfg.strict_affinity:
            for blk in self.blocks():
                if (
                    blk.affinity != req.node
                    and blockmath.free_count(blk)
                    and any(blk.cidr in p.cidr for p in pools)
                ):
                    ips += self._assign_from_block(blk.cidr, req.count - len(ips), attr, None)
                    if len(ips) == req.count:
                        log.info("borrowed", extra={"op": "assign", "node": req.node})
                        return
        raise PoolExhausted(
            f"no free IPv{req.version} address for node {req.node!r} in pool(s) "
            f"{', '.join(p.name for p in pools)}"
            + (" (strictAffinity forbids borrowing)" if cfg.strict_affinity else "")
            + (
                f" (node holds maxBlocksPerHost={cfg.max_blocks_per_host} blocks)"
                if cfg.max_blocks_per_host and owned >= cfg.max_blocks_per_host
                else ""
            )
        )

    def _assign_from_block(
        self, cidr: IPNetwork, count: int, attr: Attribute, affine_node: str | None
    ) -> list[IPAddress]:
        def attempt() -> list[IPAddress]:
            try:
                res = self.store.get("IPAMBlock", block_name(cidr))
            except NotFound:
                return []
            if not res.spec.get("unallocated"):
                # Full: skip parsing it. A node walks all its blocks on every assignment, and
                # parsing a full block's attributes dominated the time once it held many.
                return []
            blk = parse_block(res)
            if affine_node is not None and blk.affinity != affine_node:
                return []
            new, ips = blockmath.assign(blk, count, attr)
            if not ips:
                return []
            self._adjust_handle(attr.handle_id, cidr, len(ips), attr.node)
            try:
                self._write_block(new)
            except BaseException:
                self._adjust_handle(attr.handle_id, cidr, -len(ips))
                raise
            return ips

        return retry_conflicts(attempt, f"assign from block {cidr}")

    def assign_ip(
        self,
        ip: IPAddress,
        node_name: str,
        handle_id: str,
        *,
        pod: str = "",
        namespace: str = "",
        type: AllocationType = AllocationType.MANUAL,
    ) -> IPAddress:
        """Allocate one specific address (claiming its block for the node if unclaimed)."""
        handle_name(handle_id)
        self.node(node_name)
        pool = next((p for p in self.pools() if ip in p.cidr), None)
        if pool is None:
            raise InvalidInput("ip", f"{ip} is not inside any pool")
        cidr = IPNetwork(f"{ip}/{pool.block_size}").cidr
        try:
            self.read_block(cidr)
        except NotFound:
            self._claim(node_name, cidr)
        attr = Attribute(handle_id, pod, namespace, node_name, type, int(self.clock()))

        def attempt() -> IPAddress:
            blk = self.read_block(cidr)
            new = blockmath.assign_ip(blk, ip, attr)
            self._adjust_handle(handle_id, cidr, 1, node_name)
            try:
                self._write_block(new)
            except BaseException:
                self._adjust_handle(handle_id, cidr, -1)
                raise
            return ip

        return retry_conflicts(attempt, f"assign {ip}")

    # --- claiming blocks --------------------------------------------------------------------

    def _claim_new_block(self, node: str, pools: list[IPPool]) -> IPNetwork | None:
        """Claim the first free block, walking each pool from a start seeded by the node name."""
        taken = {b.name for b in (parse_block(r) for r in self.store.list("IPAMBlock").items)}
        for pool in pools:
            count = pool.block_count
            start = zlib.crc32(node.encode()) % count
            for i in range(count):
                cidr = pool.block_at((start + i) % count)
                if block_name(cidr) in taken:
                    continue
                if self._claim(node, cidr):
                    return cidr
                taken.add(block_name(cidr))
        return None

    def _affinity_resource(self, node: str, cidr: IPNetwork, state: AffinityState) -> Resource:
        return replace(
            render_affinity(BlockAffinity(node, cidr, state)),
            annotations={CLAIMED_AT_ANNOTATION: str(int(self.clock()))},
        )

    def _claim(self, node: str, cidr: IPNetwork) -> bool:
        """Make `cidr` this node's block; False when another node won it."""
        # AlreadyExists: ours, from an interrupted claim or a release of the same block by
        # this node that is still running; finish the claim below either way.
        with contextlib.suppress(AlreadyExists):
            self.store.create(self._affinity_resource(node, cidr, AffinityState.PENDING))
        try:
            self._create_block(blockmath.new_block(cidr, node))
        except AlreadyExists:
            if self.read_block(cidr).affinity != node:
                self._delete_affinity(node, cidr)
                return False
        self._set_affinity_state(node, cidr, AffinityState.CONFIRMED)
        log.info("claimed block", extra={"op": "claim", "node": node, "block": str(cidr)})
        return True

    def _set_affinity_state(self, node: str, cidr: IPNetwork, state: AffinityState) -> None:
        """Upsert: a release racing a claim of the same block may have deleted the record."""

        def attempt() -> None:
            try:
                res = self.store.get("BlockAffinity", affinity_name(node, cidr))
            except NotFound:
                try:
                    self.store.create(self._affinity_resource(node, cidr, state))
                except AlreadyExists:
                    raise Conflict("BlockAffinity", affinity_name(node, cidr)) from None
                return
            labels = {**res.labels, **node_labels(node)}  # one written before labels: now
            if res.spec.get("state") != state.value or labels != res.labels:
                spec = {**res.spec, "state": state.value}
                self.store.update(replace(res, spec=spec, labels=labels))

        retry_conflicts(attempt, f"affinity {node} {cidr} -> {state}")

    def _delete_affinity(self, node: str, cidr: IPNetwork) -> None:
        with contextlib.suppress(NotFound):
            self.store.delete("BlockAffinity", affinity_name(node, cidr))

    def _drop_released_affinity(self, node: str, cidr: IPNetwork) -> None:
        """Deletes the record only while it still says pendingDeletion: a claim of the same
        block by this node that ran meanwhile has made it its own again (confirmed)."""

        def attempt() -> None:
            try:
                res = self.store.get("BlockAffinity", affinity_name(node, cidr))
            except NotFound:
                return
            if res.spec.get("state") != AffinityState.PENDING_DELETION.value:
                return
            with contextlib.suppress(NotFound):
                self.store.delete("BlockAffinity", res.name, res.revision)

        retry_conflicts(attempt, f"drop affinity {node} {cidr}")

    def release_affinity(self, node: str, cidr: IPNetwork, *, require_empty: bool = True) -> None:
        """Give a block up: delete it when empty, else (require_empty=False) just un-own it."""
        self._set_affinity_state(node, cidr, AffinityState.PENDING_DELETION)

        def attempt() -> None:
            try:
                blk = self.read_block(cidr)
            except NotFound:
                return
            if blk.affinity != node:
                return
            if blockmath.is_empty(blk):
                self.store.delete("IPAMBlock", blk.name, blk.revision)
            elif require_empty:
                raise InUse(
                    f"block {cidr} still has {blockmath.in_use_count(blk)} addresses in use"
                )
            else:
                self._write_block(replace(blk, affinity=None))

        try:
            retry_conflicts(attempt, f"release block {cidr}")
        except InUse:
            self._set_affinity_state(node, cidr, AffinityState.CONFIRMED)
            raise
        self._drop_released_affinity(node, cidr)
        log.info(
            "released block", extra={"op": "release-affinity", "node": node, "block": str(cidr)}
        )

    # --- release ----------------------------------------------------------------------------

    def release_handle(self, handle_id: str) -> list[IPAddress]:
        """Release everything a handle holds. An unknown handle releases nothing."""
        res = find_by_handle(self.store, "IPAMHandle", handle_id)
        if res is None:
            return []
        handle = parse_handle(res)
        released: list[IPAddress] = []
        for cidr_text in handle.blocks:
            cidr = IPNetwork(cidr_text)

            def attempt(cidr: IPNetwork = cidr) -> list[IPAddress]:
                try:
                    blk = self.read_block(cidr)
                except NotFound:
                    return []
                new, ips = blockmath.release_handle(blk, handle_id)
                if ips:
                    self._write_block(new)
                return ips

            released += retry_conflicts(attempt, f"release handle {handle_id} in {cidr}")
            self._adjust_handle(handle_id, cidr, -handle.blocks[cidr_text])
        return released

    def release_ips(
        self,
        ips: Mapping[IPAddress, int | None],
        handles: Mapping[IPAddress, str] | None = None,
    ) -> list[IPAddress]:
        """Release addresses, each optionally only if still at the given allocation sequence
        number and held by the handle `handles` names for it (so a stale release never frees
        an address that was handed out again, even in a block deleted and created anew)."""
        by_block: dict[IPNetwork, dict[IPAddress, int | None]] = {}
        blocks = self.blocks()
        for ip, seq in ips.items():
            blk = next((b for b in blocks if ip in b.cidr), None)
            if blk is not None:
                by_block.setdefault(blk.cidr, {})[ip] = seq
        released: list[IPAddress] = []
        for cidr, wanted in by_block.items():

            def attempt(cidr: IPNetwork = cidr, wanted: dict = wanted) -> tuple[dict, list]:
                try:
                    blk = self.read_block(cidr)
                except NotFound:
                    return {}, []
                new, per_handle, skipped = blockmath.release_ips(blk, wanted, handles)
                if per_handle:
                    self._write_block(new)
                return per_handle, [ip for ip in wanted if ip not in skipped]

            per_handle, freed = retry_conflicts(attempt, f"release in {cidr}")
            released += freed
            for handle_id, n in per_handle.items():
                self._adjust_handle(handle_id, cidr, -n)
        return released

    def holder_of(self, ip: IPAddress) -> tuple[Block, Attribute, int] | None:
        """The block, holder and allocation sequence number of an allocated address."""
        for blk in self.blocks():
            if ip in blk.cidr:
                index = blk.allocations[blockmath.ordinal_of(blk, ip)]
                if index is None:
                    return None
                return (
                    blk,
                    blk.attributes[index],
                    blk.seq_for_allocation.get(blockmath.ordinal_of(blk, ip), -1),
                )
        return None
