"""Who uses which addresses: usage per pool and per block, borrowed addresses, one address.

Pure functions of pools and blocks, except `address_use`, which reads the store; rendering is
the front end's (`l3fabric.views.ipam`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from netaddr import IPAddress

from ipam_blocks import block as blockmath
from ipam_blocks.allocator import IPAM
from ipam_blocks.model import Attribute, Block, IPPool


@dataclass(frozen=True)
class Usage:
    total: int
    in_use: int

    @property
    def free(self) -> int:
        return self.total - self.in_use


@dataclass(frozen=True)
class PoolUsage:
    pool: IPPool
    blocks: int
    """Blocks of the pool claimed so far (of `pool.block_count`)."""
    addresses: Usage


@dataclass(frozen=True)
class BlockUsage:
    block: Block
    pool: str | None
    """Name of the pool the block belongs to; None when no pool holds it any more."""
    addresses: Usage


@dataclass(frozen=True)
class Borrowed:
    """An address used on another node than the one its block is affine to."""

    ip: IPAddress
    handle_id: str
    node: str
    block: Block


@dataclass(frozen=True)
class Allocation:
    block: Block
    holder: Attribute
    sequence: int


@dataclass(frozen=True)
class AddressUse:
    """`allocation` when `ip` is allocated; else `pool` when it is free in one; else neither."""

    ip: IPAddress
    allocation: Allocation | None = None
    pool: IPPool | None = None


def _sorted_blocks(blocks: Sequence[Block]) -> list[Block]:
    return sorted(blocks, key=lambda b: (b.cidr.version, b.cidr.first))


def pool_usage(pools: Sequence[IPPool], blocks: Sequence[Block]) -> list[PoolUsage]:
    usage = []
    for pool in pools:
        inside = [b for b in blocks if b.cidr in pool.cidr]
        in_use = sum(blockmath.in_use_count(b) for b in inside)
        usage.append(PoolUsage(pool, len(inside), Usage(pool.cidr.size, in_use)))
    return usage


def block_usage(pools: Sequence[IPPool], blocks: Sequence[Block]) -> list[BlockUsage]:
    return [
        BlockUsage(
            blk,
            next((p.name for p in pools if blk.cidr in p.cidr), None),
            Usage(blk.size, blockmath.in_use_count(blk)),
        )
        for blk in _sorted_blocks(blocks)
    ]


def borrowed(blocks: Sequence[Block]) -> list[Borrowed]:
    return [
        Borrowed(ip, attr.handle_id, attr.node, blk)
        for blk in _sorted_blocks(blocks)
        for ip, attr, _ in blockmath.allocated(blk)
        if attr.node != blk.affinity
    ]


def address_use(ipam: IPAM, ip: IPAddress) -> AddressUse:
    held = ipam.holder_of(ip)
    if held is not None:
        return AddressUse(ip, allocation=Allocation(*held))
    return AddressUse(ip, pool=next((p for p in ipam.pools() if ip in p.cidr), None))
