"""The pure parts of routing's caches: what counts as a change routing reads, the passwords
kept per BGPPeer revision, and the borrowed blocks read by name."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from netaddr import IPNetwork

from bgp_speaker.bgp.config import PasswordRef
from bgp_speaker.routing.caches import BorrowedBlocks, PasswordCache, routing_view
from ipam_blocks import block as blockmath
from ipam_blocks.allocator import IPAM, AssignRequest
from ipam_blocks.model import (
    NODE_LABEL,
    Handle,
    IPPool,
    Node,
    block_name,
    parse_handle,
    render_handle,
)
from ipam_blocks.pools import add_node, add_pool
from ipam_blocks.store.base import Resource
from ipam_blocks.store.sqlite import SqliteStore


def test_a_nodes_new_address_in_the_same_subnet_is_a_change() -> None:
    # netaddr compares IPNetworks by their range: 10.0.0.1/24 == 10.0.0.2/24.
    before = Node("n1", {}, IPNetwork("192.0.2.13/24"), revision="1")
    after = replace(before, ipv4_address=IPNetwork("192.0.2.23/24"), revision="2")
    assert routing_view("Node", before) != routing_view("Node", after)


def test_a_new_revision_alone_is_no_change() -> None:
    node = Node("n1", {"rack": "a"}, IPNetwork("192.0.2.13/24"), 65001, None, revision="1")
    assert routing_view("Node", node) == routing_view("Node", replace(node, revision="9"))
    relabelled = replace(node, labels={"rack": "b"})
    assert routing_view("Node", node) != routing_view("Node", relabelled)
    peer = Resource("BGPPeer", "tor", {"peerIP": "192.0.2.254", "asNumber": 65001}, revision="1")
    noted = replace(peer, annotations={"note": "x"}, revision="2")
    assert routing_view("BGPPeer", peer) == routing_view("BGPPeer", noted)


def test_a_handle_counts_only_addresses_in_other_nodes_blocks() -> None:
    mine, theirs = "10.96.0.0/26", "10.96.0.64/26"
    handle = Handle("h", {mine: 1}, revision="1")
    own = {block_name(IPNetwork(mine))}
    assert routing_view("IPAMHandle", handle, own) == ()
    borrowed = replace(handle, blocks={mine: 1, theirs: 1})
    assert routing_view("IPAMHandle", borrowed, own) == ((theirs, 1),)


def test_passwords_are_read_once_per_peer_revision(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("one\n")
    passwords = PasswordCache(None)  # type: ignore[arg-type]  # file passwords only
    ref = PasswordRef(file=str(secret))
    peer = Resource("BGPPeer", "tor", {}, revision="1")
    assert passwords.resolve(peer, ref) == "one"
    secret.write_text("two\n")
    assert passwords.resolve(peer, ref) == "one" and passwords.reads == 1
    assert passwords.resolve(replace(peer, revision="2"), ref) == "two"
    passwords.forget()  # the periodic resync: a rotated secret is read again
    secret.write_text("three\n")
    assert passwords.resolve(replace(peer, revision="2"), ref) == "three"
    assert passwords.reads == 3


def test_borrowed_blocks_are_read_by_name_and_checked_against_the_handles(tmp_path) -> None:
    store = SqliteStore(tmp_path / "store.db")
    ipam = IPAM(store)
    add_pool(ipam, IPPool("one-block", IPNetwork("10.97.0.0/26"), 26))
    for name, address in (("n1", "192.0.2.11/24"), ("n2", "192.0.2.12/24")):
        add_node(ipam, Node(name, {}, IPNetwork(address)))
    ipam.auto_assign(AssignRequest("n1", "net.a", pod="a", namespace="d"))
    [ip] = ipam.auto_assign(AssignRequest("n2", "net.b", pod="b", namespace="d"))
    handles = [
        parse_handle(r) for r in store.list("IPAMHandle").items if r.labels.get(NODE_LABEL) == "n2"
    ]
    borrowed = BorrowedBlocks(store, "n2")
    borrowed.refresh(handles, own=())
    assert borrowed.complete and list(borrowed.blocks) == [block_name(IPNetwork("10.97.0.0/26"))]
    assert borrowed.reads == 1
    # IPAM counts a handle up before it writes the block: until then the read is incomplete.
    [handle] = handles
    counted = replace(handle, blocks={"10.97.0.0/26": 2})
    store.update(render_handle(counted))
    borrowed.refresh([parse_handle(store.get("IPAMHandle", handle.name))], own=())
    assert not borrowed.complete
    lender = borrowed.blocks[block_name(IPNetwork("10.97.0.0/26"))]
    assert ip in {address for address, _attr, _seq in blockmath.allocated(lender)}
    store.close()
