"""Property tests of the pure block logic (`ipam_blocks.block`).

A state machine drives one block through any sequence of assign / assign_ip / release_ips
(with no, the current, or a stale sequence number; with no, the right or the wrong
holding handle) / release_handle and keeps a model of its
own next to it. As in Calico's block tests, the invariant checker runs after every step.
A "write" is modelled like the allocator's single write path: a step that changed the block
bumps its sequence number, so allocations made in different writes carry different numbers.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from netaddr import IPAddress, IPNetwork

from ipam_blocks import block as blockmath
from ipam_blocks.errors import InUse, InvalidInput
from ipam_blocks.model import Attribute, Block, parse_block, render_block

CIDRS = [
    IPNetwork("10.0.0.0/30"),
    IPNetwork("10.0.0.16/28"),
    IPNetwork("10.244.1.0/26"),
    IPNetwork("fd00:10:244::/122"),
    IPNetwork("fd00:10:244::40/126"),
]
HANDLES = ["h-a", "h-b", "h-c", "k8s-pod-network.d"]

SEQ_NONE, SEQ_CURRENT, SEQ_STALE = "none", "current", "stale"
HOLDER_ANY, HOLDER_RIGHT, HOLDER_WRONG = "any", "right", "wrong"


def _attr(handle: str, stamp: int) -> Attribute:
    # Two stamps per handle: the same handle may hold ordinals through two attribute entries.
    return Attribute(
        handle_id=handle, pod=f"pod-{handle}", namespace="ns", node="n1", allocated_at=stamp
    )


class BlockMachine(RuleBasedStateMachine):
    block: Block

    @initialize(cidr=st.sampled_from(CIDRS))
    def start(self, cidr: IPNetwork) -> None:
        self.block = blockmath.new_block(cidr, "n1")
        self.free: list[int] = list(range(cidr.size))
        self.owner: dict[int, tuple[str, int]] = {}  # ordinal -> (handle, allocation seq)
        self.past_seqs: dict[int, list[int]] = {}  # ordinal -> seqs of released allocations
        self.handed_out = 0

    # --- helpers ---------------------------------------------------------------------------

    def _write(self, new: Block) -> None:
        """What `IPAM._write_block` does to a block besides persisting it."""
        self.block = replace(new, sequence_number=new.sequence_number + 1)

    def _free_in_model(self, ordinals: list[int]) -> None:
        for o in ordinals:
            _, seq = self.owner.pop(o)
            self.past_seqs.setdefault(o, []).append(seq)
        self.free += ordinals

    def _ip(self, ordinal: int) -> IPAddress:
        return IPAddress(self.block.cidr.first + ordinal, self.block.cidr.version)

    # --- rules -----------------------------------------------------------------------------

    @rule(count=st.integers(1, 6), handle=st.sampled_from(HANDLES), stamp=st.integers(0, 1))
    def assign(self, count: int, handle: str, stamp: int) -> None:
        new, ips = blockmath.assign(self.block, count, _attr(handle, stamp))
        expected = self.free[:count]
        assert ips == [self._ip(o) for o in expected]
        got = [blockmath.ordinal_of(self.block, ip) for ip in ips]
        assert not set(got) & set(self.owner), "an allocated address was handed out again"
        assert len(set(got)) == len(got)
        if not ips:
            assert new == self.block
            return
        for o in got:
            self.owner[o] = (handle, self.block.sequence_number)
        self.free = self.free[len(got) :]
        self.handed_out += len(got)
        self._write(new)

    @rule(data=st.data(), handle=st.sampled_from(HANDLES), stamp=st.integers(0, 1))
    def assign_ip(self, data: st.DataObject, handle: str, stamp: int) -> None:
        ordinal = data.draw(st.integers(0, self.block.size - 1), label="ordinal")
        ip = self._ip(ordinal)
        if ordinal in self.owner:
            with pytest.raises(InUse, match=str(ip)):
                blockmath.assign_ip(self.block, ip, _attr(handle, stamp))
            return
        new = blockmath.assign_ip(self.block, ip, _attr(handle, stamp))
        self.owner[ordinal] = (handle, self.block.sequence_number)
        self.free.remove(ordinal)
        self.handed_out += 1
        self._write(new)

    @rule(data=st.data())
    def release_ips(self, data: st.DataObject) -> None:
        size = self.block.size
        ordinals = data.draw(
            st.lists(st.integers(0, size - 1), min_size=1, max_size=min(size, 8), unique=True),
            label="ordinals",
        )
        modes = data.draw(
            st.lists(
                st.sampled_from([SEQ_NONE, SEQ_CURRENT, SEQ_STALE]),
                min_size=len(ordinals),
                max_size=len(ordinals),
            ),
            label="modes",
        )
        holder_modes = data.draw(
            st.lists(
                st.sampled_from([HOLDER_ANY, HOLDER_RIGHT, HOLDER_WRONG]),
                min_size=len(ordinals),
                max_size=len(ordinals),
            ),
            label="holder modes",
        )
        wanted: dict[IPAddress, int | None] = {}
        holders: dict[IPAddress, str] = {}
        expect_freed: list[int] = []
        expect_per_handle: dict[str, int] = {}
        expect_skipped: list[IPAddress] = []
        for o, mode, holder_mode in zip(ordinals, modes, holder_modes, strict=True):
            ip = self._ip(o)
            current = self.owner.get(o)
            holder = current[0] if current else HANDLES[0]
            if holder_mode == HOLDER_RIGHT:
                holders[ip] = holder
            elif holder_mode == HOLDER_WRONG:
                holders[ip] = "someone-else"
            if mode == SEQ_NONE:
                seq = None
            elif mode == SEQ_CURRENT and current is not None:
                seq = current[1]
            else:
                # Stale: the number an earlier allocation of this ordinal had, else one that
                # no allocation of it ever had.
                past = self.past_seqs.get(o)
                seq = past[-1] if past else self.block.sequence_number + 1000
            wanted[ip] = seq
            if (
                current is None
                or (seq is not None and seq != current[1])
                or holder_mode == HOLDER_WRONG
            ):
                expect_skipped.append(ip)
            else:
                expect_freed.append(o)
                expect_per_handle[current[0]] = expect_per_handle.get(current[0], 0) + 1
        held_before = {o: self.owner[o] for o in self.owner}
        new, per_handle, skipped = blockmath.release_ips(
            self.block, wanted, holders if holders or data.draw(st.booleans()) else None
        )
        assert per_handle == expect_per_handle
        assert skipped == expect_skipped
        for ip in expect_skipped:
            o = blockmath.ordinal_of(new, ip)
            if o in held_before:
                # A stale release never frees an address that is still (or again) allocated.
                assert new.allocations[o] is not None
                assert new.seq_for_allocation[o] == held_before[o][1]
        self._free_in_model(expect_freed)
        if per_handle:
            self._write(new)
        else:
            assert new.allocations == self.block.allocations

    @rule(handle=st.sampled_from(HANDLES))
    def release_handle(self, handle: str) -> None:
        expected = sorted(o for o, (h, _) in self.owner.items() if h == handle)
        new, ips = blockmath.release_handle(self.block, handle)
        assert ips == [self._ip(o) for o in expected]
        self._free_in_model(expected)
        if ips:
            self._write(new)

    @precondition(lambda self: any(self.past_seqs.get(o) for o in self.owner))
    @rule(data=st.data())
    def stale_release_of_reallocated(self, data: st.DataObject) -> None:
        """An address released and handed out again: a release at its old number is a no-op."""
        reused = sorted(o for o in self.owner if self.past_seqs.get(o))
        o = data.draw(st.sampled_from(reused), label="reallocated ordinal")
        old_seq = data.draw(st.sampled_from(self.past_seqs[o]), label="old seq")
        ip = self._ip(o)
        new, per_handle, skipped = blockmath.release_ips(self.block, {ip: old_seq})
        assert per_handle == {} and skipped == [ip]
        assert new == self.block

    # --- invariants (after every step) -----------------------------------------------------

    @invariant()
    def block_is_consistent(self) -> None:
        blk = self.block
        assert blockmath.check_block(blk) == []
        assert blockmath.free_count(blk) + blockmath.in_use_count(blk) == blk.size
        assert blockmath.in_use_count(blk) == len(self.owner)
        # Exact free list: freed ordinals went to the tail, in the order they were freed.
        assert list(blk.unallocated) == self.free
        counts: dict[str, int] = {}
        for handle, _ in self.owner.values():
            counts[handle] = counts.get(handle, 0) + 1
        assert blockmath.allocations_by_handle(blk) == counts
        assert dict(blk.seq_for_allocation) == {o: s for o, (_, s) in self.owner.items()}
        holders = {
            blockmath.ordinal_of(blk, ip): (a.handle_id, seq)
            for ip, a, seq in blockmath.allocated(blk)
        }
        assert holders == self.owner
        # Attributes are compacted: every entry is referenced by some allocation.
        assert {a for a in blk.allocations if a is not None} == set(range(len(blk.attributes)))
        assert blockmath.is_empty(blk) == (not self.owner)

    @invariant()
    def survives_the_store(self) -> None:
        """Rendering to the CRD form and parsing back loses nothing."""
        assert parse_block(render_block(self.block)) == self.block


BlockMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestBlockMachine = BlockMachine.TestCase


# --- targeted examples (each also pins one rule the machine relies on) -----------------------


def test_freed_ordinals_go_to_the_tail() -> None:
    blk = blockmath.new_block(IPNetwork("10.0.0.0/29"), "n1")
    blk, ips = blockmath.assign(blk, 3, Attribute("h1"))
    assert [str(ip) for ip in ips] == ["10.0.0.0", "10.0.0.1", "10.0.0.2"]
    blk, _, _ = blockmath.release_ips(blk, {IPAddress("10.0.0.1"): None})
    assert blk.unallocated == (3, 4, 5, 6, 7, 1)
    blk, ips = blockmath.assign(blk, 5, Attribute("h2"))
    assert [str(ip) for ip in ips] == [f"10.0.0.{i}" for i in (3, 4, 5, 6, 7)]
    blk, ips = blockmath.assign(blk, 1, Attribute("h3"))
    assert [str(ip) for ip in ips] == ["10.0.0.1"]


def test_stale_release_never_frees_a_reallocated_address() -> None:
    blk = blockmath.new_block(IPNetwork("fd00::/126"), "n1")
    ip = IPAddress("fd00::2")
    blk = blockmath.assign_ip(blk, ip, Attribute("old"))
    old_seq = blk.seq_for_allocation[2]
    blk = replace(blk, sequence_number=blk.sequence_number + 1)  # the write
    blk, per_handle, _ = blockmath.release_ips(blk, {ip: old_seq})
    assert per_handle == {"old": 1}
    blk = replace(blk, sequence_number=blk.sequence_number + 1)
    blk = blockmath.assign_ip(blk, ip, Attribute("new"))
    blk = replace(blk, sequence_number=blk.sequence_number + 1)
    after, per_handle, skipped = blockmath.release_ips(blk, {ip: old_seq})
    assert (per_handle, skipped) == ({}, [ip])
    assert blockmath.allocations_by_handle(after) == {"new": 1}


def test_check_block_catches_broken_blocks() -> None:
    """The invariant checker the machine relies on must itself see damage."""
    blk, _ = blockmath.assign(
        blockmath.new_block(IPNetwork("10.0.0.0/30"), "n1"), 2, Attribute("h")
    )
    assert blockmath.check_block(blk) == []
    lost = replace(blk, unallocated=blk.unallocated[1:])
    assert any(
        "free (1) + allocated (2) != block size (4)" in p for p in blockmath.check_block(lost)
    )
    doubled = replace(blk, unallocated=(*blk.unallocated, 0))
    assert "an ordinal is both allocated and on the free list" in blockmath.check_block(doubled)
    no_seq = replace(blk, seq_for_allocation={})
    assert blockmath.check_block(no_seq) == [
        "allocation sequence numbers do not match the allocations"
    ]


@given(cidr=st.sampled_from(CIDRS), outside=st.integers(1, 1000))
def test_addresses_outside_the_block_are_invalid_input(cidr: IPNetwork, outside: int) -> None:
    blk = blockmath.new_block(cidr, "n1")
    ip = IPAddress(cidr.last + outside, cidr.version)
    with pytest.raises(InvalidInput) as e:
        blockmath.assign_ip(blk, ip, Attribute("h"))
    assert e.value.field == "ip"
    with pytest.raises(InvalidInput):
        blockmath.release_ips(blk, {ip: None})
