"""The node label (model.NODE_LABEL) on IPAMBlocks, BlockAffinities and IPAMHandles: written on
every IPAM write path, followed when a block's affinity changes, and added to old objects by
`label_node_objects` (ipam_blocks/node_labels.py)."""

from __future__ import annotations

from dataclasses import replace

import pytest
from netaddr import IPAddress, IPNetwork

from ipam_blocks.allocator import IPAM, AssignRequest
from ipam_blocks.errors import Conflict, InUse
from ipam_blocks.gc import collect_garbage
from ipam_blocks.model import NODE_LABEL, IPPool, Node, affinity_name, block_name
from ipam_blocks.node_labels import label_node_objects
from ipam_blocks.pools import add_node, add_pool
from ipam_blocks.selector import parse_selector_text
from ipam_blocks.store.base import Resource
from ipam_blocks.store.sqlite import SqliteStore
from ipam_blocks.store.workloads import WorkloadRecordLiveness

SCOPED_KINDS = ("IPAMBlock", "BlockAffinity", "IPAMHandle")


@pytest.fixture
def ipam(store: SqliteStore) -> IPAM:
    ipam = IPAM(store)
    # Two /30 blocks: the second node's first block is the last one free.
    add_pool(ipam, IPPool("pool-a", IPNetwork("10.0.0.0/29"), 30))
    for name in ("n1", "n2"):
        add_node(ipam, Node(name))
    return ipam


def assign(ipam: IPAM, node: str, handle: str) -> IPAddress:
    (ip,) = ipam.auto_assign(AssignRequest(node=node, handle_id=handle))
    return ip


def owned(store: SqliteStore, node: str) -> dict[str, list[str]]:
    """What a watch scoped to `node` would see, by kind."""
    selector = parse_selector_text(f"{NODE_LABEL}={node}")
    return {k: [r.name for r in store.list(k, selector).items] for k in SCOPED_KINDS}


def block_of(ip: IPAddress) -> IPNetwork:
    return IPNetwork(f"{ip}/30").cidr


def test_an_assignment_labels_its_block_affinity_and_handle(ipam: IPAM, store) -> None:
    ip1 = assign(ipam, "n1", "h-1")
    ip2 = assign(ipam, "n2", "h-2")
    b1, b2 = block_of(ip1), block_of(ip2)
    assert owned(store, "n1") == {
        "IPAMBlock": [block_name(b1)],
        "BlockAffinity": [affinity_name("n1", b1)],
        "IPAMHandle": ["h-1"],
    }
    assert owned(store, "n2") == {
        "IPAMBlock": [block_name(b2)],
        "BlockAffinity": [affinity_name("n2", b2)],
        "IPAMHandle": ["h-2"],
    }


def test_a_borrowed_address_labels_the_handle_not_the_block(ipam: IPAM, store) -> None:
    """n2 takes addresses from n1's block once no block is free: the block stays n1's, the
    handle is n2's (its pod runs there)."""
    for i in range(3):
        assign(ipam, "n1", f"h1-{i}")
    for i in range(4):
        assign(ipam, "n2", f"h2-{i}")  # the fourth fills n2's block ...
    borrowed = assign(ipam, "n2", "h2-borrowed")  # ... this one is n1's last address
    n1_block = block_name(block_of(borrowed))
    assert n1_block in owned(store, "n1")["IPAMBlock"]
    assert n1_block not in owned(store, "n2")["IPAMBlock"]
    assert "h2-borrowed" in owned(store, "n2")["IPAMHandle"]


def test_a_manual_assignment_labels_the_handle_with_its_node(ipam: IPAM, store) -> None:
    ipam.assign_ip(IPAddress("10.0.0.5"), "n2", "manual-1")
    assert owned(store, "n2") == {
        "IPAMBlock": [block_name(IPNetwork("10.0.0.4/30"))],
        "BlockAffinity": [affinity_name("n2", IPNetwork("10.0.0.4/30"))],
        "IPAMHandle": ["manual-1"],
    }


def test_a_block_given_up_loses_its_node_label(ipam: IPAM, store) -> None:
    ip = assign(ipam, "n1", "h-1")
    assert owned(store, "n1")["IPAMBlock"] == [block_name(block_of(ip))]
    ipam.release_affinity("n1", block_of(ip), require_empty=False)  # addresses stay in use
    block = store.get("IPAMBlock", block_name(block_of(ip)))
    assert "affinity" not in block.spec and NODE_LABEL not in block.labels


def test_a_handle_updated_keeps_its_label(ipam: IPAM, store) -> None:
    ipam.auto_assign(AssignRequest(node="n1", handle_id="h-1", count=2))
    ipam.release_ips({ip: None for ip in [IPAddress("10.0.0.0")]}, {})  # one of its two
    assert store.get("IPAMHandle", "h-1").labels == {NODE_LABEL: "n1"}


def test_gc_labels_a_handle_it_recreates(ipam: IPAM, store) -> None:
    assign(ipam, "n1", "h-1")
    store.delete("IPAMHandle", "h-1")  # lost: GC writes it again from the blocks
    collect_garbage(ipam, WorkloadRecordLiveness(store), grace=60)
    assert store.get("IPAMHandle", "h-1").labels == {NODE_LABEL: "n1"}


def strip_labels(store: SqliteStore) -> None:
    """Turn every IPAM object into one written before IPAM labelled them."""
    for kind in SCOPED_KINDS:
        for res in store.list(kind).items:
            store.update(replace(res, labels={}))


def test_an_old_affinity_is_labelled_when_its_state_changes(ipam: IPAM, store) -> None:
    """A release rewrites the affinity's state: an unlabelled one gets its label then."""
    ip = assign(ipam, "n1", "h-1")
    store.update(replace(store.get("BlockAffinity", affinity_name("n1", block_of(ip))), labels={}))
    with pytest.raises(InUse):  # sets pendingDeletion, then back to confirmed
        ipam.release_affinity("n1", block_of(ip), require_empty=True)
    assert owned(store, "n1")["BlockAffinity"] == [affinity_name("n1", block_of(ip))]


def test_label_node_objects_labels_only_that_nodes_old_objects(ipam: IPAM, store) -> None:
    for i in range(3):
        assign(ipam, "n1", f"h1-{i}")
    for i in range(4):
        assign(ipam, "n2", f"h2-{i}")
    assign(ipam, "n2", "h2-borrowed")  # in n1's block
    labelled_before = {n: owned(store, n) for n in ("n1", "n2")}
    strip_labels(store)
    assert owned(store, "n2") == {k: [] for k in SCOPED_KINDS}

    assert label_node_objects(store, "n2") == 1 + 1 + 5  # block, affinity, handles
    assert owned(store, "n2") == labelled_before["n2"]
    assert owned(store, "n1") == {k: [] for k in SCOPED_KINDS}  # n1's own call does those
    assert label_node_objects(store, "n2") == 0  # idempotent
    assert label_node_objects(store, "n1") == 1 + 1 + 3
    assert owned(store, "n1") == labelled_before["n1"]


def test_label_node_objects_retries_a_conflict(ipam: IPAM, store) -> None:
    assign(ipam, "n1", "h-1")
    strip_labels(store)

    class RacingStore:
        """Another writer changes the first object labelled just before the label lands."""

        def __init__(self) -> None:
            self.raced = False

        def update(self, obj: Resource) -> Resource:
            if not self.raced:
                self.raced = True
                raise Conflict(obj.kind, obj.name)
            return store.update(obj)

        def __getattr__(self, name: str):
            return getattr(store, name)

    racing = RacingStore()
    assert label_node_objects(racing, "n1") == 3  # type: ignore[arg-type]
    assert racing.raced
    assert all(owned(store, "n1").values())
