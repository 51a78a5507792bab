"""Administrative changes to pools, nodes and workload records (the `pool`/`node` verbs)."""

from __future__ import annotations

import contextlib

from ipam_blocks import block as blockmath
from ipam_blocks.allocator import IPAM
from ipam_blocks.errors import AlreadyExists, InUse, InvalidInput, NotFound
from ipam_blocks.handles import find_by_handle, name_taken
from ipam_blocks.model import (
    IPPool,
    Node,
    Workload,
    check_object_name,
    render_node,
    render_pool,
    render_workload,
)


def add_pool(ipam: IPAM, pool: IPPool) -> IPPool:
    """Create a pool; refuses a name in use or a CIDR overlapping another pool."""
    for other in ipam.pools():
        if other.name == pool.name:
            raise InvalidInput("name", f"pool {pool.name!r} already exists")
        if other.cidr.version == pool.cidr.version and (
            pool.cidr in other.cidr or other.cidr in pool.cidr
        ):
            raise InvalidInput("cidr", f"{pool.cidr} overlaps pool {other.name!r} ({other.cidr})")
    try:
        ipam.store.create(render_pool(pool))
    except AlreadyExists:
        raise InvalidInput("name", f"pool {pool.name!r} already exists") from None
    return pool


def delete_pool(ipam: IPAM, name: str) -> None:
    """Delete a pool and its (empty) blocks; refused while any address in it is in use."""
    pool = next((p for p in ipam.pools() if p.name == name), None)
    if pool is None:
        raise InvalidInput("name", f"unknown pool {name!r}")
    blocks = [b for b in ipam.blocks() if b.cidr in pool.cidr]
    in_use = sum(blockmath.in_use_count(b) for b in blocks)
    if in_use:
        raise InUse(f"pool {name!r} still has addresses in use ({in_use}); release them first")
    for aff in ipam.affinities():
        if aff.cidr in pool.cidr:
            ipam.release_affinity(aff.node, aff.cidr)
    for blk in ipam.blocks():
        if blk.cidr in pool.cidr:
            with contextlib.suppress(NotFound):
                ipam.store.delete("IPAMBlock", blk.name, blk.revision)
    ipam.store.delete("IPPool", name)


def add_node(ipam: IPAM, node: Node) -> Node:
    check_object_name(node.name, "name")
    try:
        ipam.store.create(render_node(node))
    except AlreadyExists:
        raise InvalidInput("name", f"node {node.name!r} already exists") from None
    return node


def record_workload(ipam: IPAM, workload: Workload) -> None:
    """Declare a live workload (embedded mode's liveness source); idempotent."""
    try:
        ipam.store.create(render_workload(workload))
    except AlreadyExists:
        if find_by_handle(ipam.store, "Workload", workload.handle_id) is None:
            raise name_taken(ipam.store, "Workload", workload.handle_id) from None


def forget_workload(ipam: IPAM, handle_id: str) -> None:
    res = find_by_handle(ipam.store, "Workload", handle_id)
    if res is not None:
        with contextlib.suppress(NotFound):
            ipam.store.delete("Workload", res.name, res.revision)
