"""Borrowing: a node that gets an address from another node's block advertises it as a /32,
and the whole fabric, the block's owner included, routes that address to the borrower.

The lab's store gets a pool that is exactly one block (`lab up --pool-cidr 10.96.0.0/26
--block-size 26`): the first pod's node takes the block, every other node must borrow.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from netaddr import IPAddress, IPNetwork

from ipam_blocks.allocator import IPAM
from tests.fabric.harness import ADDRESS, NODES, mesh3_document, needs_fabric, running_lab

pytestmark = [pytest.mark.root, pytest.mark.slow, needs_fabric]

POOL = "10.96.0.0/26"


def test_borrowed_address_is_routed_to_the_borrower(tmp_path: Path) -> None:
    with running_lab(
        tmp_path, mesh3_document(), "--pool-cidr", POOL, "--block-size", "26"
    ) as fabric:
        fabric.wait_converged(what="the empty fabric")  # sessions up, no blocks, no routes
        a = fabric.add_pod("n1", "a")  # n1 (A) takes the pool's only block
        assert fabric.blocks() == {"n1": {POOL}, "n2": set(), "n3": set()}
        b = fabric.add_pod("n2", "b")  # n2 (B) can only borrow from A's block
        c = fabric.add_pod("n3", "c")  # and so can n3 (C)
        with fabric.store() as store:
            ipam = IPAM(store)
            for address, node in ((a, "n1"), (b, "n2"), (c, "n3")):
                assert IPAddress(address) in IPNetwork(POOL)
                held = ipam.holder_of(IPAddress(address))
                assert held is not None
                block, attribute, _ = held
                assert (str(block.cidr), block.affinity, attribute.node) == (POOL, "n1", node)
            assert [str(x.cidr) for x in ipam.affinities()] == [POOL]  # nobody else claimed

        fabric.wait_converged(what="the borrowed addresses to be routed")
        # B and C advertise their /32s; A its block (and nothing borrowed).
        assert fabric.status("n1")["exported"] == [POOL]
        assert fabric.status("n2")["exported"] == [f"{b}/32"]
        assert fabric.status("n3")["exported"] == [f"{c}/32"]
        # Every other node, A included, routes B's address to B: the /32 beats A's block
        # route (on C) and A's own blackhole (on A).
        want = {
            "n1": {POOL: "blackhole", b: f"via {ADDRESS['n2']}", c: f"via {ADDRESS['n3']}"},
            "n2": {POOL: f"via {ADDRESS['n1']}", c: f"via {ADDRESS['n3']}"},
            "n3": {POOL: f"via {ADDRESS['n1']}", b: f"via {ADDRESS['n2']}"},
        }
        for node in NODES:
            assert fabric.route_table(node) == want[node], node
            assert fabric.duplicates(node) == []
        for node in ("n1", "n3"):
            route = fabric.route_get(node, b)
            assert route.get("gateway") == ADDRESS["n2"], (node, route)
            assert route.get("type", "unicast") == "unicast", (node, route)
        on_b = fabric.route_get("n2", b)  # and B delivers it to its pod
        assert "gateway" not in on_b and on_b["dev"].startswith("l3f"), on_b
        assert fabric.route_get("n1", c).get("gateway") == ADDRESS["n3"]
        assert fabric.route_get("n2", a).get("gateway") == ADDRESS["n1"]

        # B's pod is reachable from A's and C's pods (and all the other ways round).
        assert fabric.ping_failures() == []
