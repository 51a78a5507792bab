"""BIRD 2 as the route reflector of three l3fabric nodes (tests/topologies/bird-rr.clab.yml).

The nodes leave the mesh and peer only with BIRD (one BGPPeer from the topology's objects
file). Each learns the others' blocks through the reflector — with ORIGINATOR_ID the owner's
router id, CLUSTER_LIST BIRD's cluster ID, the owner as next hop, an empty AS path — installs
them towards the owner directly, and every pod reaches every other.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.interop.harness import CONVERGE, InteropLab, needs_interop, topology_lab, wait

pytestmark = [pytest.mark.root, pytest.mark.slow, needs_interop]

NODES = ("n1", "n2", "n3")
ADDRESS = {"n1": "10.0.0.11", "n2": "10.0.0.12", "n3": "10.0.0.13"}
BIRD = "10.0.0.1"
CLUSTER = "244.0.0.1"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InteropLab]:
    with topology_lab(tmp_path_factory.mktemp("bird-rr"), "bird-rr", NODES) as running:
        for node in NODES:
            running.add_pod(node, f"{node}a")
        yield running


def converged(lab: InteropLab) -> list[str]:
    problems = []
    blocks = {n: b for n, bs in lab.blocks().items() for b in bs}
    for node in NODES:
        try:
            peers = lab.peers(node)
        except Exception as err:
            return [f"{node}: no status ({err})"]
        if set(peers) != {BIRD} or peers[BIRD]["state"] != "established":
            problems.append(f"{node}: peers {peers}")
        want = {b: f"via {ADDRESS[n]}" for n, b in blocks.items() if n != node}
        want[blocks.get(node, "?")] = "blackhole"
        if lab.route_table(node) != want:
            problems.append(f"{node}: kernel {lab.route_table(node)}, want {want}")
    return problems


def test_nodes_learn_each_other_through_bird_with_reflection_attributes(lab: InteropLab) -> None:
    wait(lambda: converged(lab), "the BIRD-reflected fabric to converge", CONVERGE)
    blocks = {node: lab.block_of(node) for node in NODES}
    for node in NODES:
        status = lab.status(node)
        [peer] = status["peers"]
        assert (peer["address"], peer["type"], peer["state"]) == (BIRD, "global", "established")
        assert peer["accepted"] == 2  # the other two blocks
        rib = lab.rib(node)
        for other in NODES:
            if other == node:
                continue
            [path] = rib[blocks[other]]
            assert path["peer"] == BIRD and path["best"], path
            assert path["next_hop"] == ADDRESS[other]  # reflection keeps the next hop
            assert path["originator_id"] == ADDRESS[other]  # the owner's router id
            assert path["cluster_list"] == [CLUSTER]
            assert path["as_path"] == [] and not path["ebgp"]
        assert blocks[node] not in rib  # its own block never comes back into its RIB

    # BIRD's own view: every block from its owner, next hop the owner.
    for node in NODES:
        route = lab.bird_route("rr", blocks[node])
        assert route["BGP.next_hop"] == ADDRESS[node], route
        assert route["BGP.as_path"] == "", route

    assert lab.ping_failures() == []
