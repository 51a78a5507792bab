"""Pure allocation logic on one in-memory block (no I/O).

Functions take a `Block` and return a new one. The stored sequence number is bumped by the
single write path in `blockstore`, not here; an allocation records the sequence number the
block had when it was made, so a later release can prove it still means the same allocation.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace

from netaddr import IPAddress, IPNetwork

from ipam_blocks.errors import InUse, InvalidInput
from ipam_blocks.model import Attribute, Block


def new_block(cidr: IPNetwork, node: str | None) -> Block:
    size = cidr.size
    return Block(
        cidr=cidr,
        affinity=node,
        allocations=(None,) * size,
        unallocated=tuple(range(size)),
        attributes=(),
    )


def ordinal_of(block: Block, ip: IPAddress) -> int:
    if ip not in block.cidr:
        raise InvalidInput("ip", f"{ip} is not in block {block.cidr}")
    return int(ip) - int(block.cidr.first)


def ip_at(block: Block, ordinal: int) -> IPAddress:
    return IPAddress(block.cidr.first + ordinal, block.cidr.version)


def free_count(block: Block) -> int:
    return len(block.unallocated)


def in_use_count(block: Block) -> int:
    return block.size - len(block.unallocated)


def is_empty(block: Block) -> bool:
    return len(block.unallocated) == block.size


def _attribute_index(attributes: list[Attribute], attr: Attribute) -> int:
    try:
        return attributes.index(attr)
    except ValueError:
        attributes.append(attr)
        return len(attributes) - 1


def assign(block: Block, count: int, attr: Attribute) -> tuple[Block, list[IPAddress]]:
    """Take up to `count` ordinals from the head of the free list."""
    taken = block.unallocated[:count]
    if not taken:
        return block, []
    attributes = list(block.attributes)
    index = _attribute_index(attributes, attr)
    allocations = list(block.allocations)
    seqs = dict(block.seq_for_allocation)
    for ordinal in taken:
        allocations[ordinal] = index
        seqs[ordinal] = block.sequence_number
    new = replace(
        block,
        allocations=tuple(allocations),
        unallocated=block.unallocated[len(taken) :],
        attributes=tuple(attributes),
        seq_for_allocation=seqs,
    )
    return new, [ip_at(block, o) for o in taken]


def assign_ip(block: Block, ip: IPAddress, attr: Attribute) -> Block:
    """Allocate one specific address."""
    ordinal = ordinal_of(block, ip)
    current = block.allocations[ordinal]
    if current is not None:
        holder = block.attributes[current].handle_id
        raise InUse(f"{ip} is already allocated (handle {holder})")
    attributes = list(block.attributes)
    index = _attribute_index(attributes, attr)
    allocations = list(block.allocations)
    allocations[ordinal] = index
    return replace(
        block,
        allocations=tuple(allocations),
        unallocated=tuple(o for o in block.unallocated if o != ordinal),
        attributes=tuple(attributes),
        seq_for_allocation={**block.seq_for_allocation, ordinal: block.sequence_number},
    )


def _release_ordinals(block: Block, ordinals: Iterable[int]) -> Block:
    allocations = list(block.allocations)
    seqs = dict(block.seq_for_allocation)
    freed = []
    for ordinal in ordinals:
        allocations[ordinal] = None
        seqs.pop(ordinal, None)
        freed.append(ordinal)
    # Freed ordinals go to the tail, so a just-released address is the last one handed out
    # again: stale routes and ARP entries for it have time to age out.
    return _compact_attributes(
        replace(
            block,
            allocations=tuple(allocations),
            unallocated=block.unallocated + tuple(freed),
            seq_for_allocation=seqs,
        )
    )


def _compact_attributes(block: Block) -> Block:
    used = sorted({a for a in block.allocations if a is not None})
    if used == list(range(len(block.attributes))):
        return block
    remap = {old: new for new, old in enumerate(used)}
    return replace(
        block,
        allocations=tuple(None if a is None else remap[a] for a in block.allocations),
        attributes=tuple(block.attributes[old] for old in used),
    )


def release_ips(
    block: Block,
    ips: Mapping[IPAddress, int | None],
    handles: Mapping[IPAddress, str] | None = None,
) -> tuple[Block, dict[str, int], list[IPAddress]]:
    """Release addresses; each may carry the allocation sequence number it was read at, and
    (in `handles`) the handle it was held by.

    Returns the new block, the count released per handle, and the addresses skipped because
    they were free already or have been allocated again since: at another sequence number, or
    to another handle. The handle check matters when a block was deleted and created again,
    since a new block's sequence numbers start over.
    """
    ordinals: list[int] = []
    per_handle: dict[str, int] = {}
    skipped: list[IPAddress] = []
    for ip, expected_seq in ips.items():
        ordinal = ordinal_of(block, ip)
        index = block.allocations[ordinal]
        handle = None if index is None else block.attributes[index].handle_id
        if (
            handle is None
            or (expected_seq is not None and block.seq_for_allocation.get(ordinal) != expected_seq)
            or (handles is not None and handles.get(ip, handle) != handle)
        ):
            skipped.append(ip)
            continue
        per_handle[handle] = per_handle.get(handle, 0) + 1
        ordinals.append(ordinal)
    return _release_ordinals(block, ordinals), per_handle, skipped


def release_handle(block: Block, handle_id: str) -> tuple[Block, list[IPAddress]]:
    ordinals = [
        o
        for o, index in enumerate(block.allocations)
        if index is not None and block.attributes[index].handle_id == handle_id
    ]
    return _release_ordinals(block, ordinals), [ip_at(block, o) for o in ordinals]


def allocations_by_handle(block: Block) -> dict[str, int]:
    counts: dict[str, int] = {}
    for index in block.allocations:
        if index is not None:
            handle = block.attributes[index].handle_id
            counts[handle] = counts.get(handle, 0) + 1
    return counts


def allocated(block: Block) -> list[tuple[IPAddress, Attribute, int]]:
    """(address, holder, allocation sequence number) for every allocated ordinal."""
    return [
        (ip_at(block, o), block.attributes[index], block.seq_for_allocation.get(o, -1))
        for o, index in enumerate(block.allocations)
        if index is not None
    ]


def check_block(block: Block) -> list[str]:
    """Invariant violations of one block; empty when it is consistent."""
    problems = []
    if block.size != block.cidr.size:
        problems.append(f"has {block.size} ordinals for a /{block.cidr.prefixlen}")
    free = block.unallocated
    if len(set(free)) != len(free):
        problems.append("free list holds an ordinal twice")
    if any(not 0 <= o < block.size for o in free):
        problems.append("free list holds an ordinal outside the block")
    elif any(block.allocations[o] is not None for o in free):
        problems.append("an ordinal is both allocated and on the free list")
    allocated_count = sum(1 for a in block.allocations if a is not None)
    if len(set(free)) + allocated_count != block.size:
        problems.append(
            f"free ({len(set(free))}) + allocated ({allocated_count}) != block size ({block.size})"
        )
    if any(a is not None and not 0 <= a < len(block.attributes) for a in block.allocations):
        problems.append("an allocation points at a missing attribute")
    if set(block.seq_for_allocation) != {
        o for o, a in enumerate(block.allocations) if a is not None
    }:
        problems.append("allocation sequence numbers do not match the allocations")
    return problems
