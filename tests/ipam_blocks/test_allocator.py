"""Allocator behaviour (DESIGN §4) on a real SQLite store in a temporary directory.

Pools are small (a /28 cut into four /30 blocks) so that exhaustion, borrowing and block
limits are a handful of assignments away. Crashes between two writes are simulated by a
store wrapper that raises a BaseException at a chosen call, as a SIGKILL would stop the
process there: nothing after that point runs, no cleanup either.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from netaddr import IPAddress, IPNetwork

from ipam_blocks import block as blockmath
from ipam_blocks.allocator import IPAM, AssignRequest
from ipam_blocks.check import check
from ipam_blocks.errors import InUse, InvalidInput, NoUsablePool, PoolExhausted
from ipam_blocks.gc import collect_garbage
from ipam_blocks.model import (
    AffinityState,
    AllocationType,
    IPAMConfig,
    IPPool,
    Node,
    Workload,
    affinity_name,
    block_name,
    parse_handle,
    render_ipam_config,
)
from ipam_blocks.pools import add_node, add_pool, forget_workload, record_workload
from ipam_blocks.selector import EVERYTHING, parse_selector_text
from ipam_blocks.store.base import Resource
from ipam_blocks.store.sqlite import SqliteStore
from ipam_blocks.store.workloads import WorkloadRecordLiveness

POOL = IPNetwork("10.0.0.0/28")
BLOCKS = [IPNetwork(f"10.0.0.{i * 4}/30") for i in range(4)]
T0 = 1_700_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def ipam(store: SqliteStore, clock: Clock) -> IPAM:
    return IPAM(store, clock)


def make_pool(
    ipam: IPAM, cidr: str = str(POOL), block_size: int = 30, name: str = "pool-a", **kw
) -> IPPool:
    return add_pool(ipam, IPPool(name, IPNetwork(cidr), block_size, **kw))


def make_nodes(ipam: IPAM, *names: str, **labels: str) -> None:
    for name in names:
        add_node(ipam, Node(name, labels=dict(labels)))


def set_config(ipam: IPAM, **kw) -> None:
    ipam.store.create(render_ipam_config(IPAMConfig(**kw)))


def assign(ipam: IPAM, node: str, handle: str, **kw) -> list[IPAddress]:
    return ipam.auto_assign(AssignRequest(node=node, handle_id=handle, **kw))


def one(ipam: IPAM, node: str, handle: str, **kw) -> IPAddress:
    (ip,) = assign(ipam, node, handle, **kw)
    return ip


def block_of(ip: IPAddress, size: int = 30) -> IPNetwork:
    return IPNetwork(f"{ip}/{size}").cidr


def affinities(ipam: IPAM, node: str | None = None) -> dict[IPNetwork, AffinityState]:
    return {a.cidr: a.state for a in ipam.affinities(node)}


def handle_counts(ipam: IPAM, handle: str) -> dict[str, int]:
    return dict(parse_handle(ipam.store.get("IPAMHandle", handle)).blocks)


def liveness(ipam: IPAM) -> WorkloadRecordLiveness:
    return WorkloadRecordLiveness(ipam.store)


# --- affinity and claiming -------------------------------------------------------------------


def test_affine_blocks_are_used_first_then_a_new_block_is_claimed(ipam: IPAM) -> None:
    make_pool(ipam)
    make_nodes(ipam, "n1", "n2")
    first = one(ipam, "n1", "h-1")
    n1_block = block_of(first)
    n2_block = block_of(one(ipam, "n2", "h-2"))
    assert n1_block != n2_block
    # The rest of n1's block is used before anything else, although n2's has room too.
    rest = [one(ipam, "n1", f"h-1-{i}") for i in range(3)]
    assert {block_of(ip) for ip in rest} == {n1_block}
    assert len({first, *rest}) == 4
    # n1's block is full: the next address comes from a *new* block of n1, not n2's.
    fifth = one(ipam, "n1", "h-1-5")
    assert block_of(fifth) not in (n1_block, n2_block)
    assert affinities(ipam, "n1") == {
        n1_block: AffinityState.CONFIRMED,
        block_of(fifth): AffinityState.CONFIRMED,
    }
    assert ipam.read_block(block_of(fifth)).affinity == "n1"


@dataclass
class RecordingStore:
    """Passes every call through to `inner` and notes the writes, in order."""

    inner: SqliteStore
    writes: list[tuple[str, str, str, dict]] = field(default_factory=list)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def create(self, obj: Resource) -> Resource:
        self.writes.append(("create", obj.kind, obj.name, dict(obj.spec)))
        return self.inner.create(obj)

    def update(self, obj: Resource) -> Resource:
        self.writes.append(("update", obj.kind, obj.name, dict(obj.spec)))
        return self.inner.update(obj)

    def delete(self, kind: str, name: str, revision: str | None = None) -> None:
        self.writes.append(("delete", kind, name, {}))
        self.inner.delete(kind, name, revision)


def test_claim_creates_pending_affinity_then_block_then_confirms(
    store: SqliteStore, clock: Clock
) -> None:
    make_pool(IPAM(store, clock))
    make_nodes(IPAM(store, clock), "n1")
    rec = RecordingStore(store)
    ip = one(IPAM(rec, clock), "n1", "h-1")
    cidr = block_of(ip)
    aff_name = f"n1-{block_name(cidr)}"
    steps = [(op, kind, spec.get("state")) for op, kind, _, spec in rec.writes]
    assert steps == [
        ("create", "BlockAffinity", "pending"),
        ("create", "IPAMBlock", None),
        ("update", "BlockAffinity", "confirmed"),
        ("create", "IPAMHandle", None),  # the handle is counted before the block is written
        ("update", "IPAMBlock", None),
    ]
    assert rec.writes[0][2] == aff_name
    block_spec = rec.writes[1][3]
    assert block_spec["affinity"] == "host:n1"
    assert block_spec["cidr"] == str(cidr)
    stored = store.get("IPAMBlock", block_name(cidr))
    assert stored.spec["affinity"] == "host:n1"
    assert store.get("BlockAffinity", aff_name).spec == {
        "node": "n1",
        "cidr": str(cidr),
        "state": "confirmed",
    }
    assert handle_counts(IPAM(store), "h-1") == {str(cidr): 1}


def test_nodes_spread_out_and_each_retries_the_same_order(tmp_path) -> None:
    """Alone in an empty pool, different nodes start at different blocks; a node always
    starts at the same one."""
    nodes = [f"node-{c}" for c in "abcdefgh"]
    starts = {}
    for round_ in range(2):
        for node in nodes:
            s = SqliteStore(tmp_path / f"{node}-{round_}.db")
            ipam = IPAM(s)
            make_pool(ipam, "10.1.0.0/24", 28)
            make_nodes(ipam, node)
            start = block_of(one(ipam, node, "h"), 28)
            assert starts.setdefault(node, start) == start
            s.close()
    assert len(set(starts.values())) >= 5, starts


def test_released_block_is_claimed_again_by_the_same_node(ipam: IPAM) -> None:
    make_pool(ipam)
    make_nodes(ipam, "n1")
    ip = one(ipam, "n1", "h-1")
    ipam.release_handle("h-1")
    ipam.release_affinity("n1", block_of(ip))
    assert affinities(ipam) == {}
    assert ipam.blocks() == []
    assert block_of(one(ipam, "n1", "h-2")) == block_of(ip)


def test_a_new_block_is_claimed_only_when_the_nodes_blocks_are_full(ipam: IPAM) -> None:
    make_pool(ipam)
    make_nodes(ipam, "n1")
    first = [one(ipam, "n1", f"h-{i}") for i in range(8)]  # two full blocks
    assert len(affinities(ipam, "n1")) == 2
    ipam.release_ips({first[1]: None})  # room in the older block only
    again = one(ipam, "n1", "h-again")
    assert again == first[1]
    assert len(affinities(ipam, "n1")) == 2
    # A fresh allocator (another process: no memory of which block it used last) agrees.
    ipam.release_ips({first[6]: None})
    assert one(IPAM(ipam.store), "n1", "h-fresh") == first[6]
    assert len(affinities(ipam, "n1")) == 2


def test_pool_exhaustion_raises_pool_exhausted_naming_node_and_pool(ipam: IPAM) -> None:
    make_pool(ipam)
    make_nodes(ipam, "n1")
    got = [one(ipam, "n1", f"h-{i}") for i in range(16)]
    assert sorted(got) == list(POOL)
    assert set(affinities(ipam, "n1")) == set(BLOCKS)
    with pytest.raises(PoolExhausted) as e:
        assign(ipam, "n1", "h-16")
    assert "no free IPv4 address for node 'n1' in pool(s) pool-a" in str(e.value)
    # The failed request left nothing behind.
    assert check(ipam, liveness(ipam)).clean
    assert "h-16" not in {r.name for r in ipam.store.list("IPAMHandle").items}


def test_multi_address_request_that_cannot_be_met_gives_back_what_it_took(ipam: IPAM) -> None:
    make_pool(ipam)
    make_nodes(ipam, "n1")
    assign(ipam, "n1", "h-many", count=14)
    with pytest.raises(PoolExhausted):
        assign(ipam, "n1", "h-greedy", count=3)
    assert sum(blockmath.free_count(b) for b in ipam.blocks()) == 2
    assert check(ipam, liveness(ipam)).clean


def test_borrows_from_another_nodes_block_when_allowed(ipam: IPAM) -> None:
    make_pool(ipam)
    make_nodes(ipam, "n1", "n2")
    held = [one(ipam, "n1", f"h-{i}") for i in range(13)]  # n1 claims all 4 blocks
    assert set(affinities(ipam, "n1")) == set(BLOCKS)
    borrowed = one(ipam, "n2", "h-n2")
    assert borrowed not in held
    blk = ipam.read_block(block_of(borrowed))
    assert blk.affinity == "n1"  # borrowing does not move the block
    assert affinities(ipam, "n2") == {}
    _, attr, _ = ipam.holder_of(borrowed)
    assert (attr.handle_id, attr.node) == ("h-n2", "n2")
    assert handle_counts(ipam, "h-n2") == {str(blk.cidr): 1}
    assert check(ipam, liveness(ipam)).clean


def test_strict_affinity_forbids_borrowing(ipam: IPAM) -> None:
    make_pool(ipam)
    make_nodes(ipam, "n1", "n2")
    set_config(ipam, strict_affinity=True)
    for i in range(13):
        one(ipam, "n1", f"h-{i}")
    with pytest.raises(PoolExhausted, match="strictAffinity forbids borrowing"):
        assign(ipam, "n2", "h-n2")
    assert sum(blockmath.free_count(b) for b in ipam.blocks()) == 3
    # n1 itself still gets the rest of its own blocks.
    assert len({one(ipam, "n1", f"h-more-{i}") for i in range(3)}) == 3


def test_max_blocks_per_host_limits_claims(ipam: IPAM) -> None:
    make_pool(ipam)
    make_nodes(ipam, "n1", "n2")
    set_config(ipam, max_blocks_per_host=1, strict_affinity=True)
    own = {block_of(one(ipam, "n1", f"h-{i}")) for i in range(4)}
    assert len(own) == 1
    with pytest.raises(PoolExhausted, match="maxBlocksPerHost=1"):
        assign(ipam, "n1", "h-5")
    assert set(affinities(ipam, "n1")) == own
    # Another node is not limited by n1's blocks.
    assert block_of(one(ipam, "n2", "h-n2")) not in own


def test_max_blocks_per_host_borrows_instead_of_claiming(ipam: IPAM) -> None:
    make_pool(ipam)
    make_nodes(ipam, "n1", "n2")
    set_config(ipam, max_blocks_per_host=1)
    n2_block = block_of(one(ipam, "n2", "h-n2"))
    own = {block_of(one(ipam, "n1", f"h-{i}")) for i in range(4)}
    assert len(own) == 1
    fifth = one(ipam, "n1", "h-5")
    assert block_of(fifth) == n2_block
    assert set(affinities(ipam, "n1")) == own


def test_pool_node_selector_decides_which_pool_a_node_uses(ipam: IPAM) -> None:
    make_pool(ipam, "10.0.0.0/28", name="rack1", node_selector=parse_selector_text("rack=r1"))
    make_pool(
        ipam, "10.0.1.0/28", name="others", node_selector=parse_selector_text("rack notin (r1)")
    )
    add_node(ipam, Node("n1", labels={"rack": "r1"}))
    add_node(ipam, Node("n2", labels={"rack": "r2"}))
    assert one(ipam, "n1", "h-1") in IPNetwork("10.0.0.0/28")
    assert one(ipam, "n2", "h-2") in IPNetwork("10.0.1.0/28")
    with pytest.raises(InvalidInput) as e:
        assign(ipam, "n1", "h-3", pools=("nope",))
    assert e.value.field == "pool"
    with pytest.raises(NoUsablePool, match=r"among \['others'\]"):
        assign(ipam, "n1", "h-3", pools=("others",))


def test_node_selected_by_no_pool_gets_no_usable_pool(ipam: IPAM) -> None:
    make_pool(ipam, node_selector=parse_selector_text("rack=r1"))
    add_node(ipam, Node("n9", labels={"rack": "r9"}))
    with pytest.raises(NoUsablePool, match="no enabled IPv4 pool selects node 'n9'"):
        assign(ipam, "n9", "h")


def test_disabled_pool_is_not_used(ipam: IPAM) -> None:
    make_pool(ipam, "10.0.0.0/28", name="old", disabled=True)
    make_nodes(ipam, "n1")
    with pytest.raises(NoUsablePool):
        assign(ipam, "n1", "h-1")
    make_pool(ipam, "10.0.1.0/28", name="new")
    got = [one(ipam, "n1", f"h-{i}") for i in range(16)]
    assert all(ip in IPNetwork("10.0.1.0/28") for ip in got)
    with pytest.raises(PoolExhausted, match=r"pool\(s\) new$"):
        assign(ipam, "n1", "h-17")


# --- specific addresses, release -------------------------------------------------------------


def test_assign_a_specific_ip_and_in_use_on_a_taken_one(ipam: IPAM) -> None:
    make_pool(ipam)
    make_nodes(ipam, "n1", "n2")
    ip = IPAddress("10.0.0.9")
    assert ipam.assign_ip(ip, "n1", "manual-1") == ip
    blk = ipam.read_block(block_of(ip))
    assert blk.affinity == "n1"  # the unclaimed block was claimed for the node
    assert affinities(ipam, "n1") == {blk.cidr: AffinityState.CONFIRMED}
    _, attr, _ = ipam.holder_of(ip)
    assert (attr.handle_id, attr.type) == ("manual-1", AllocationType.MANUAL)
    with pytest.raises(InUse, match=r"10\.0\.0\.9 is already allocated \(handle manual-1\)"):
        ipam.assign_ip(ip, "n2", "manual-2")
    # The refused request left no handle behind.
    names = {r.name for r in ipam.store.list("IPAMHandle").items}
    assert names == {"manual-1"}
    # Auto-assignment on n1 skips the taken address.
    assert ip not in {one(ipam, "n1", f"h-{i}") for i in range(3)}
    with pytest.raises(InvalidInput) as e:
        ipam.assign_ip(IPAddress("192.168.0.1"), "n1", "manual-3")
    assert e.value.field == "ip"


def test_release_by_handle_and_by_ip(ipam: IPAM) -> None:
    make_pool(ipam)
    make_nodes(ipam, "n1")
    pair = assign(ipam, "n1", "h-pair", count=2)
    cidr = block_of(pair[0])
    single = one(ipam, "n1", "h-single")
    assert handle_counts(ipam, "h-pair") == {str(cidr): 2}

    assert ipam.release_ips({pair[0]: None}) == [pair[0]]
    assert handle_counts(ipam, "h-pair") == {str(cidr): 1}
    assert sorted(ipam.release_handle("h-pair")) == [pair[1]]
    assert "h-pair" not in {r.name for r in ipam.store.list("IPAMHandle").items}
    # Releasing again is harmless and releases nothing.
    assert ipam.release_handle("h-pair") == []
    assert ipam.release_ips({pair[0]: None}) == []

    blk = ipam.read_block(cidr)
    freed = [blockmath.ordinal_of(blk, ip) for ip in pair]
    assert list(blk.unallocated[-2:]) == freed  # to the tail, in release order
    assert ipam.holder_of(single)[1].handle_id == "h-single"
    assert check(ipam, liveness(ipam)).clean


def test_stale_release_does_not_free_a_reallocated_address(ipam: IPAM) -> None:
    make_pool(ipam)
    make_nodes(ipam, "n1")
    ip = one(ipam, "n1", "h-old")
    _, _, old_seq = ipam.holder_of(ip)
    assert ipam.release_handle("h-old") == [ip]
    ipam.assign_ip(ip, "n1", "h-new")
    _, _, new_seq = ipam.holder_of(ip)
    assert new_seq != old_seq
    assert ipam.release_ips({ip: old_seq}) == []
    assert ipam.holder_of(ip)[1].handle_id == "h-new"
    assert handle_counts(ipam, "h-new") == {str(block_of(ip)): 1}
    # At the current number the release goes through.
    assert ipam.release_ips({ip: new_seq}) == [ip]
    assert ipam.holder_of(ip) is None


def test_release_affinity_refuses_a_block_in_use(ipam: IPAM) -> None:
    make_pool(ipam)
    make_nodes(ipam, "n1")
    ip = one(ipam, "n1", "h-1")
    cidr = block_of(ip)
    with pytest.raises(InUse, match=f"block {cidr} still has 1 addresses in use"):
        ipam.release_affinity("n1", cidr)
    assert affinities(ipam, "n1") == {cidr: AffinityState.CONFIRMED}
    assert ipam.read_block(cidr).affinity == "n1"
    assert one(ipam, "n1", "h-2") in cidr  # still the node's block
    ipam.release_handle("h-1")
    ipam.release_handle("h-2")
    ipam.release_affinity("n1", cidr)
    assert affinities(ipam) == {}
    assert ipam.blocks() == []


def test_ipv6_pool_allocates_from_122_blocks(ipam: IPAM) -> None:
    make_pool(ipam, "fd00:10:244::/120", 122, name="v6")
    make_pool(ipam, "10.0.0.0/28", 30, name="v4")
    make_nodes(ipam, "n1", "n2")
    v6 = [one(ipam, "n1", f"h6-{i}", version=6) for i in range(65)]
    assert len(set(v6)) == 65
    assert all(ip.version == 6 and ip in IPNetwork("fd00:10:244::/120") for ip in v6)
    blocks = {IPNetwork(f"{ip}/122").cidr for ip in v6}
    assert len(blocks) == 2  # 64 per /122 block, the 65th opened a second one
    assert set(affinities(ipam, "n1")) == blocks
    assert all(ipam.read_block(c).size == 64 for c in blocks)
    v6_n2 = one(ipam, "n2", "h6-n2", version=6)
    assert IPNetwork(f"{v6_n2}/122").cidr not in blocks
    assert one(ipam, "n1", "h4", version=4).version == 4
    ipam.release_handle("h6-0")
    assert ipam.holder_of(v6[0]) is None
    assert check(ipam, liveness(ipam)).clean


# --- bad input -------------------------------------------------------------------------------


def test_unknown_node_is_invalid_input_naming_node(ipam: IPAM) -> None:
    make_pool(ipam)
    with pytest.raises(InvalidInput) as e:
        assign(ipam, "ghost", "h-1")
    assert e.value.field == "node"
    assert "ghost" in str(e.value)
    with pytest.raises(InvalidInput) as e:
        ipam.assign_ip(IPAddress("10.0.0.1"), "ghost", "h-1")
    assert e.value.field == "node"
    assert ipam.blocks() == [] and affinities(ipam) == {}


@pytest.mark.parametrize("bad", ["Bad Handle!", "", "-leading-dash", "x" * 254, "a/b"])
def test_bad_handle_is_invalid_input_naming_handle(ipam: IPAM, bad: str) -> None:
    make_pool(ipam)
    make_nodes(ipam, "n1")
    with pytest.raises(InvalidInput) as e:
        assign(ipam, "n1", bad)
    assert e.value.field == "handle"
    with pytest.raises(InvalidInput) as e:
        ipam.assign_ip(IPAddress("10.0.0.1"), "n1", bad)
    assert e.value.field == "handle"
    assert ipam.blocks() == []


def test_bad_count_and_version_are_invalid_input(ipam: IPAM) -> None:
    make_pool(ipam)
    make_nodes(ipam, "n1")
    with pytest.raises(InvalidInput) as e:
        assign(ipam, "n1", "h", count=0)
    assert e.value.field == "count"
    with pytest.raises(InvalidInput) as e:
        assign(ipam, "n1", "h", version=5)
    assert e.value.field == "version"


# --- interrupted writers ---------------------------------------------------------------------


class Crash(BaseException):
    """Stands for SIGKILL: not an Exception, so no `except Exception` handler sees it."""


class WrappedStore:
    """A real store whose every call goes through `_call(op, what, do)` (`do` performs it),
    for the subclasses to stop or interleave writers at a chosen call."""

    inner: SqliteStore

    def _call(self, op: str, what, do: Callable[[], object]):
        return do()

    def get(self, kind: str, name: str) -> Resource:
        return self._call("get", (kind, name), lambda: self.inner.get(kind, name))

    def list(self, kind: str, selector=EVERYTHING):
        return self._call("list", kind, lambda: self.inner.list(kind, selector))

    def create(self, obj: Resource) -> Resource:
        return self._call("create", obj, lambda: self.inner.create(obj))

    def update(self, obj: Resource) -> Resource:
        return self._call("update", obj, lambda: self.inner.update(obj))

    def delete(self, kind: str, name: str, revision: str | None = None) -> None:
        self._call("delete", (kind, name), lambda: self.inner.delete(kind, name, revision))


@dataclass
class CrashingStore(WrappedStore):
    """Raises `Crash` instead of performing the first write that `when` matches; from then on
    every call raises `Crash` too, so no undo or cleanup of the dying writer reaches the store.
    """

    inner: SqliteStore
    when: Callable[[str, Resource | tuple[str, str]], bool]
    dead: bool = False

    def _call(self, op: str, what, do: Callable[[], object]):
        if self.dead:
            raise Crash(f"{op} after death")
        if op in ("create", "update", "delete") and self.when(op, what):
            self.dead = True
            raise Crash(op)
        return do()


def _write_of(op: str, kind: str) -> Callable[[str, object], bool]:
    """Matches the write `op` of an object of `kind` (a Resource, or (kind, name) for deletes)."""

    def matches(o: str, what: object) -> bool:
        written = what[0] if isinstance(what, tuple) else getattr(what, "kind", None)
        return o == op and written == kind

    return matches


@pytest.mark.parametrize(
    ("crash_before", "block_left"),
    [
        (("create", "IPAMBlock"), False),  # pending affinity, no block
        (("update", "BlockAffinity"), True),  # pending affinity and its block
    ],
)
def test_interrupted_claim_is_finished_by_the_nodes_next_assign(
    store: SqliteStore, clock: Clock, crash_before: tuple[str, str], block_left: bool
) -> None:
    ipam = IPAM(store, clock)
    make_pool(ipam)
    make_nodes(ipam, "n1")
    with pytest.raises(Crash):
        assign(IPAM(CrashingStore(store, _write_of(*crash_before)), clock), "n1", "h-1")
    (cidr,) = affinities(ipam, "n1")
    assert affinities(ipam, "n1") == {cidr: AffinityState.PENDING}
    assert [b.cidr for b in ipam.blocks()] == ([cidr] if block_left else [])
    report = check(ipam, liveness(ipam))
    assert report.stale_affinities == [f"n1 {cidr} (pending)"]

    ip = one(ipam, "n1", "h-2")
    assert ip in cidr  # the interrupted claim was finished, not abandoned
    assert affinities(ipam, "n1") == {cidr: AffinityState.CONFIRMED}
    assert ipam.read_block(cidr).affinity == "n1"
    assert check(ipam, liveness(ipam)).clean


@pytest.mark.parametrize("block_left", [False, True])
def test_interrupted_claim_is_cleaned_by_gc_after_grace(
    store: SqliteStore, clock: Clock, block_left: bool
) -> None:
    ipam = IPAM(store, clock)
    make_pool(ipam)
    make_nodes(ipam, "n1")
    crash_before = ("update", "BlockAffinity") if block_left else ("create", "IPAMBlock")
    with pytest.raises(Crash):
        assign(IPAM(CrashingStore(store, _write_of(*crash_before)), clock), "n1", "h-1")
    (cidr,) = affinities(ipam, "n1")

    # Within the grace period the claim may still be in flight: gc leaves it alone.
    clock.now += 10
    result = collect_garbage(ipam, liveness(ipam), grace=60)
    assert result.resolved_affinities == []
    assert affinities(ipam, "n1") == {cidr: AffinityState.PENDING}

    clock.now += 60
    result = collect_garbage(ipam, liveness(ipam), grace=60)
    assert result.resolved_affinities == [f"n1 {cidr} (pending)"]
    if block_left:
        assert affinities(ipam, "n1") == {cidr: AffinityState.CONFIRMED}
        assert ipam.read_block(cidr).affinity == "n1"
    else:
        assert affinities(ipam, "n1") == {}
        assert ipam.blocks() == []
    assert check(ipam, liveness(ipam)).clean


def test_pending_affinity_for_a_block_another_node_won_is_dropped(
    store: SqliteStore, clock: Clock
) -> None:
    ipam = IPAM(store, clock)
    make_pool(ipam)
    make_nodes(ipam, "n1", "n2")
    with pytest.raises(Crash):
        assign(IPAM(CrashingStore(store, _write_of("create", "IPAMBlock")), clock), "n1", "h")
    (cidr,) = affinities(ipam, "n1")
    ipam.assign_ip(cidr.network, "n2", "h-n2")  # n2 claims the very block n1 was after
    assert ipam.read_block(cidr).affinity == "n2"
    ip = one(ipam, "n1", "h-1")
    assert ip not in cidr
    assert cidr not in affinities(ipam, "n1")
    assert check(ipam, liveness(ipam)).clean


def test_handle_counted_but_block_not_written_is_a_mismatch_gc_settles(
    store: SqliteStore, clock: Clock
) -> None:
    ipam = IPAM(store, clock)
    make_pool(ipam)
    make_nodes(ipam, "n1")
    ip = one(ipam, "n1", "h-1")
    ip2 = one(ipam, "n1", "h-2")
    cidr = str(block_of(ip))
    # A second assignment for h-1 that died between the handle and the block write.
    with pytest.raises(Crash):
        assign(IPAM(CrashingStore(store, _write_of("update", "IPAMBlock")), clock), "n1", "h-1")
    assert store.get("IPAMHandle", "h-1").spec["block"] == {cidr: 2}
    # The same state made by hand: h-2's count bumped with no block write behind it.
    res = store.get("IPAMHandle", "h-2")
    store.update(res.with_spec({**res.spec, "block": {cidr: 2}}))
    # And a new handle that never reached its block at all.
    store.create(Resource("IPAMHandle", "h-orphan", {"handleID": "h-orphan", "block": {cidr: 1}}))

    report = check(ipam, liveness(ipam))
    mismatches = {m.handle: (m.recorded, m.actual) for m in report.handle_mismatches}
    assert mismatches == {
        "h-1": ({cidr: 2}, {cidr: 1}),
        "h-2": ({cidr: 2}, {cidr: 1}),
        "h-orphan": ({cidr: 1}, {}),
    }
    assert not report.clean

    # With a grace period the handles are only marked suspect (an assign may be in flight).
    result = collect_garbage(ipam, liveness(ipam), grace=30)
    assert sorted(result.suspect_handles) == ["h-1", "h-2", "h-orphan"]
    assert result.settled_handles == []
    assert store.get("IPAMHandle", "h-1").spec["block"] == {cidr: 2}

    result = collect_garbage(ipam, liveness(ipam), grace=0)
    assert sorted(result.settled_handles) == ["h-1", "h-2", "h-orphan"]
    assert handle_counts(ipam, "h-1") == {cidr: 1}
    assert handle_counts(ipam, "h-2") == {cidr: 1}
    assert "h-orphan" not in {r.name for r in store.list("IPAMHandle").items}
    assert result.released_ips == []  # the addresses the handles do hold are untouched
    assert ipam.holder_of(ip)[1].handle_id == "h-1"
    assert ipam.holder_of(ip2)[1].handle_id == "h-2"
    assert check(ipam, liveness(ipam)).clean
    # Settled means consistent: releasing the handles now leaves nothing behind.
    assert ipam.release_handle("h-1") == [ip]
    assert ipam.release_handle("h-2") == [ip2]
    assert store.list("IPAMHandle").items == []


def test_suspect_handle_is_settled_once_the_grace_period_has_passed(
    store: SqliteStore, clock: Clock
) -> None:
    ipam = IPAM(store, clock)
    make_pool(ipam)
    make_nodes(ipam, "n1")
    with pytest.raises(Crash):
        assign(IPAM(CrashingStore(store, _write_of("update", "IPAMBlock")), clock), "n1", "h-1")
    assert collect_garbage(ipam, liveness(ipam), grace=30).suspect_handles == ["h-1"]
    clock.now += 29
    assert collect_garbage(ipam, liveness(ipam), grace=30).suspect_handles == ["h-1"]
    clock.now += 2
    assert collect_garbage(ipam, liveness(ipam), grace=30).settled_handles == ["h-1"]
    assert check(ipam, liveness(ipam)).clean


@dataclass
class ConflictingStore:
    """Makes the first `times` block updates lose a race: another writer changes the block
    (takes its next free address) just before ours lands, so ours is a stale-revision CAS."""

    inner: SqliteStore
    times: int
    stolen: list[IPAddress] = field(default_factory=list)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def update(self, obj: Resource) -> Resource:
        if obj.kind == "IPAMBlock" and self.times:
            self.times -= 1
            other = IPAM(self.inner)
            blk = other.read_block(IPNetwork(obj.spec["cidr"]))
            new, ips = blockmath.assign(blk, 1, blockmath.Attribute("racer"))
            other._adjust_handle("racer", blk.cidr, 1)
            other._write_block(new)
            self.stolen += ips
        return self.inner.update(obj)


def test_lost_block_race_undoes_the_handle_and_retries(store: SqliteStore, clock: Clock) -> None:
    ipam = IPAM(store, clock)
    make_pool(ipam)
    make_nodes(ipam, "n1")
    one(ipam, "n1", "h-0")  # the block exists: the next assign goes straight to it
    racing = ConflictingStore(store, times=2)
    ip = one(IPAM(racing, clock), "n1", "h-1")
    assert len(racing.stolen) == 2 and ip not in racing.stolen
    cidr = str(block_of(ip))
    assert handle_counts(ipam, "h-1") == {cidr: 1}  # counted once, not once per attempt
    assert handle_counts(ipam, "racer") == {cidr: 2}
    assert check(ipam, liveness(ipam)).clean


# --- a release and a claim of the same block by one node, interleaved -------------------------


@dataclass
class InterleavingStore(WrappedStore):
    """Runs `then` once, right after the first write `when` matches has reached the store
    (or failed there): the other writer's steps land exactly between two of this one's."""

    inner: SqliteStore
    when: Callable[[str, Resource | tuple[str, str]], bool]
    then: Callable[[], object]
    done: bool = False

    def _call(self, op: str, what, do: Callable[[], object]):
        try:
            return do()
        finally:
            if not self.done and op in ("create", "update", "delete") and self.when(op, what):
                self.done = True
                self.then()


def _empty_block_of(ipam: IPAM, node: str) -> IPNetwork:
    ip = one(ipam, node, "h-tmp")
    ipam.release_handle("h-tmp")
    return block_of(ip)


def _n1_with_an_empty_block(store: SqliteStore, clock: Clock) -> tuple[IPAM, IPNetwork]:
    ipam = IPAM(store, clock)
    make_pool(ipam)
    make_nodes(ipam, "n1")
    return ipam, _empty_block_of(ipam, "n1")


def _n1_holds(ipam: IPAM, cidr: IPNetwork) -> None:
    assert ipam.read_block(cidr).affinity == "n1"
    assert affinities(ipam, "n1") == {cidr: AffinityState.CONFIRMED}
    assert check(ipam, liveness(ipam)).clean


def test_release_racing_a_reclaim_by_the_same_node_leaves_the_block_recorded(
    store: SqliteStore, clock: Clock
) -> None:
    ipam, cidr = _n1_with_an_empty_block(store, clock)
    # The release has deleted the empty block; before it drops its record, a pod ADD on the
    # same node claims that block again (it is free now).
    releasing = IPAM(
        InterleavingStore(
            store,
            when=_write_of("delete", "IPAMBlock"),
            then=lambda: ipam.assign_ip(cidr.network, "n1", "h-new"),
        ),
        clock,
    )
    releasing.release_affinity("n1", cidr)
    _n1_holds(ipam, cidr)


def test_claim_whose_record_a_finishing_release_dropped_writes_it_again(
    store: SqliteStore, clock: Clock
) -> None:
    ipam, cidr = _n1_with_an_empty_block(store, clock)
    # The release is past its block delete; the claim finds the release's record in place
    # (AlreadyExists), and the release drops that record before the claim confirms it.
    ipam._set_affinity_state("n1", cidr, AffinityState.PENDING_DELETION)
    store.delete("IPAMBlock", block_name(cidr))
    claiming = IPAM(
        InterleavingStore(
            store,
            when=_write_of("create", "BlockAffinity"),
            then=lambda: ipam._drop_released_affinity("n1", cidr),
        ),
        clock,
    )
    claiming.assign_ip(cidr.network, "n1", "h-new")
    _n1_holds(ipam, cidr)


def test_check_reports_a_block_without_its_affinity_and_gc_records_it(
    store: SqliteStore, clock: Clock
) -> None:
    ipam = IPAM(store, clock)
    make_pool(ipam)
    make_nodes(ipam, "n1", "gone")
    in_use = block_of(one(ipam, "n1", "h-1"))
    empty_of_gone = _empty_block_of(ipam, "gone")
    for cidr, node in ((in_use, "n1"), (empty_of_gone, "gone")):
        store.delete("BlockAffinity", affinity_name(node, cidr))
    store.delete("Node", "gone")

    report = check(ipam, liveness(ipam))
    assert sorted(report.unrecorded_blocks) == sorted(
        [f"{in_use} (node n1)", f"{empty_of_gone} (node gone)"]
    )
    assert not report.clean

    result = collect_garbage(ipam, liveness(ipam), grace=60)
    assert f"n1 {in_use} (no record)" in result.resolved_affinities
    assert result.released_blocks == [str(empty_of_gone)]
    assert affinities(ipam) == {in_use: AffinityState.CONFIRMED}
    assert [b.cidr for b in ipam.blocks()] == [in_use]
    assert check(ipam, liveness(ipam)).clean


# --- gc of leaked addresses ------------------------------------------------------------------


def _pod(ipam: IPAM, node: str, pod: str) -> IPAddress:
    handle = f"k8s-pod-network.{pod}"
    record_workload(ipam, Workload(handle, node, namespace="default", pod=pod))
    return one(ipam, node, handle, pod=pod, namespace="default")


def test_gc_releases_addresses_of_gone_pods_only_after_grace(
    store: SqliteStore, clock: Clock
) -> None:
    ipam = IPAM(store, clock)
    make_pool(ipam)
    make_nodes(ipam, "n1", "n2")
    ips = {pod: _pod(ipam, "n1", pod) for pod in ("a", "b", "c")}
    manual = ipam.assign_ip(IPAddress("10.0.0.14"), "n2", "manual")  # no pod: never a leak
    unnamed = one(ipam, "n2", "no-pod")  # assigned without a pod name: never a leak
    assert check(ipam, liveness(ipam)).clean

    forget_workload(ipam, "k8s-pod-network.b")
    report = check(ipam, liveness(ipam))
    assert [(leak.ip, leak.reason) for leak in report.leaks] == [
        (str(ips["b"]), "pod no longer exists")
    ]
    clock.now += 10
    result = collect_garbage(ipam, liveness(ipam), grace=60)
    assert result.released_ips == [] and result.kept_ips == [str(ips["b"])]
    assert ipam.holder_of(ips["b"]) is not None

    clock.now += 60
    result = collect_garbage(ipam, liveness(ipam), grace=60)
    assert result.released_ips == [str(ips["b"])]
    assert ipam.holder_of(ips["b"]) is None
    for ip in (ips["a"], ips["c"], manual, unnamed):
        assert ipam.holder_of(ip) is not None
    assert "k8s-pod-network.b" not in {r.name for r in store.list("IPAMHandle").items}
    assert check(ipam, liveness(ipam)).clean


def test_gc_treats_a_pod_that_moved_node_as_a_leak(store: SqliteStore, clock: Clock) -> None:
    ipam = IPAM(store, clock)
    make_pool(ipam)
    make_nodes(ipam, "n1", "n2")
    ip = _pod(ipam, "n1", "web")
    forget_workload(ipam, "k8s-pod-network.web")
    record_workload(ipam, Workload("k8s-pod-network.web-2", "n2", "default", "web"))
    (leak,) = check(ipam, liveness(ipam)).leaks
    assert (leak.ip, leak.reason) == (str(ip), "pod moved to node n2")
    assert collect_garbage(ipam, liveness(ipam), grace=0).released_ips == [str(ip)]


class HookedLiveness:
    """Workload-record liveness that runs `hook` just before answering the n-th time."""

    def __init__(self, store: SqliteStore, at_call: int, hook: Callable[[], None]) -> None:
        self.inner = WorkloadRecordLiveness(store)
        self.calls = 0
        self.at_call = at_call
        self.hook = hook

    def live_pods(self):
        self.calls += 1
        if self.calls == self.at_call:
            self.hook()
        return self.inner.live_pods()


def test_gc_never_releases_an_address_reallocated_since_it_looked(
    store: SqliteStore, clock: Clock
) -> None:
    ipam = IPAM(store, clock)
    make_pool(ipam)
    make_nodes(ipam, "n1")
    ip = _pod(ipam, "n1", "gone")
    forget_workload(ipam, "k8s-pod-network.gone")

    def reallocate() -> None:
        # Between gc's re-check snapshot of the blocks and its release, the leaked address
        # is released by someone else and handed to a new pod.
        ipam.release_ips({ip: None})
        record_workload(ipam, Workload("k8s-pod-network.new", "n1", "default", "new"))
        ipam.assign_ip(
            ip, "n1", "k8s-pod-network.new", pod="new", namespace="default", type=AllocationType.POD
        )

    # take_snapshot reads the blocks before asking liveness; call 2 is gc's re-check.
    hooked = HookedLiveness(store, at_call=2, hook=reallocate)
    result = collect_garbage(ipam, hooked, grace=0)
    assert hooked.calls >= 2
    assert result.released_ips == []
    assert result.kept_ips == [str(ip)]
    _, attr, _ = ipam.holder_of(ip)
    assert attr.handle_id == "k8s-pod-network.new"
    assert check(ipam, liveness(ipam)).clean


def test_gc_never_releases_an_address_reallocated_in_a_recreated_block(
    store: SqliteStore, clock: Clock
) -> None:
    """A block deleted and created again starts its sequence numbers over, so the number
    alone cannot tell the old allocation from the new one; the holding handle can."""
    ipam = IPAM(store, clock)
    make_pool(ipam)
    make_nodes(ipam, "n1")
    ip = _pod(ipam, "n1", "gone")
    _, _, old_seq = ipam.holder_of(ip)
    forget_workload(ipam, "k8s-pod-network.gone")

    def recycle_block() -> None:
        ipam.release_ips({ip: None})
        ipam.release_affinity("n1", block_of(ip))  # empty: the block is deleted
        assert ipam.blocks() == []
        assert _pod(ipam, "n1", "new") == ip  # the block is created again, same address
        assert ipam.holder_of(ip)[2] == old_seq  # ... at the same sequence number

    result = collect_garbage(ipam, HookedLiveness(store, 2, recycle_block), grace=0)
    assert result.released_ips == []
    assert ipam.holder_of(ip)[1].handle_id == "k8s-pod-network.new"
    assert check(ipam, liveness(ipam)).clean


def test_gc_rechecks_liveness_before_releasing(store: SqliteStore, clock: Clock) -> None:
    ipam = IPAM(store, clock)
    make_pool(ipam)
    make_nodes(ipam, "n1")
    ip = _pod(ipam, "n1", "flaky")
    forget_workload(ipam, "k8s-pod-network.flaky")

    def comes_back() -> None:
        record_workload(ipam, Workload("k8s-pod-network.flaky", "n1", "default", "flaky"))

    result = collect_garbage(ipam, HookedLiveness(store, at_call=2, hook=comes_back), grace=0)
    assert result.released_ips == []
    assert ipam.holder_of(ip) is not None
