"""Route reflectors made of l3fabric nodes (tests/topologies/rr.clab.yml: two reflectors, four
clients), reached by switching a running full mesh over to them — without losing a packet.

The lab starts as a mesh (the topology without its cluster IDs and objects). Then, in one
go as one `kubectl apply` would, rr1 and rr2 get their cluster ID and the topology's objects
arrive (one BGPPeer with an empty nodeSelector towards `route-reflector=true`, the mesh off).
The agents bring the reflector sessions up before the mesh sessions go (make-before-break):
pings between pods run throughout and none is lost, and no node's kernel ever loses a route
to a block. Afterwards every client peers with the two reflectors only and learns the other
clients' blocks from both, with ORIGINATOR_ID the owner and CLUSTER_LIST the cluster ID.
On the reflectors BIRD holds those sessions; their ExaBGP is a client of the local BIRD.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from ipam_blocks.store.base import Resource
from l3fabric.lab.objects import parse_objects
from tests.fabric.harness import RouteMonitor
from tests.interop.harness import (
    CONVERGE,
    ContinuousPing,
    InteropLab,
    needs_interop,
    topology_lab,
    wait,
)

pytestmark = [pytest.mark.root, pytest.mark.slow, needs_interop]

REFLECTORS = ("rr1", "rr2")
CLIENTS = ("c1", "c2", "c3", "c4")
NODES = (*REFLECTORS, *CLIENTS)
ADDRESS = {"rr1": "10.0.0.1", "rr2": "10.0.0.2"} | {f"c{i}": f"10.0.0.1{i}" for i in range(1, 5)}
CLUSTER = "244.0.0.1"


def as_mesh(document: dict[str, Any], files: dict[str, str]) -> None:
    """The same lab without the reflector settings: a full mesh."""
    del document["topology"]["kinds"]["linux"]["binds"]
    for name in REFLECTORS:
        del document["topology"]["nodes"][name]["labels"]["l3fabric.io/rr-cluster-id"]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InteropLab]:
    with topology_lab(tmp_path_factory.mktemp("rr"), "rr", NODES, as_mesh) as running:
        for node in NODES:
            running.add_pod(node, f"{node}a")
        yield running


def converged(lab: InteropLab, sessions: dict[str, set[str]]) -> list[str]:
    problems = []
    blocks = {n: b for n, bs in lab.blocks().items() for b in bs}
    for node in NODES:
        try:
            peers = lab.peers(node)
        except Exception as err:
            return [f"{node}: no status ({err})"]
        state = {a: p["state"] for a, p in peers.items()}
        want = dict.fromkeys(sessions[node], "established")
        if state != want:
            problems.append(f"{node}: sessions {state}, want {sorted(want)}")
        table = lab.route_table(node)
        expected = {b: f"via {ADDRESS[n]}" for n, b in blocks.items() if n != node}
        expected[blocks[node]] = "blackhole"
        if table != expected:
            problems.append(f"{node}: kernel {table}, want {expected}")
    return problems


MESH = {n: {ADDRESS[o] for o in NODES if o != n} for n in NODES}
LOOPBACK = "127.0.0.1"  # a reflector's ExaBGP to its own BIRD
REFLECTED = {n: {ADDRESS[o] for o in REFLECTORS} for n in CLIENTS} | {
    r: {ADDRESS[o] for o in NODES if o != r} | {LOOPBACK} for r in REFLECTORS
}


def switch_to_reflectors(lab: InteropLab) -> None:
    objects = parse_objects((lab.lab.tmp / "rr.objects.yaml").read_text(), "rr.objects.yaml")
    with lab.store() as store:
        for name in REFLECTORS:
            node = store.get("Node", name)
            spec = {**node.spec, "routeReflectorClusterID": CLUSTER}
            store.update(Resource("Node", name, spec, node.labels, node.annotations,
                                  node.revision))  # fmt: skip
        for res in objects:
            store.create(res)


def test_mesh_switched_to_reflectors_without_losing_a_packet(lab: InteropLab) -> None:
    wait(lambda: converged(lab, MESH), "the mesh to converge", CONVERGE)
    blocks = {node: lab.block_of(node) for node in NODES}
    pods = {node: lab.pods[f"{node}a"][1] for node in NODES}
    monitors = {node: RouteMonitor(lab.netns(node)) for node in CLIENTS}
    pairs = [("c1", "c2"), ("c2", "c3"), ("c3", "c4"), ("c4", "c1"), ("c1", "rr1"), ("rr2", "c3")]
    pings = [ContinuousPing(lab.pod_netns(f"{a}a"), pods[b]) for a, b in pairs]
    try:
        switch_to_reflectors(lab)
        wait(lambda: converged(lab, REFLECTED), "the reflector fabric to converge", CONVERGE)
    finally:
        counts = [p.stop() for p in pings]
        for monitor in monitors.values():
            monitor.close()
    for (a, b), (sent, received) in zip(pairs, counts, strict=True):
        assert sent > 20 and received == sent, f"{a} -> {b}: {received} of {sent} answered"
    for node, monitor in monitors.items():
        gone = [line for line in monitor.lines if "Deleted" in line and "10.244." in line]
        assert gone == [], (node, gone)

    # The reflector fabric as it now stands.
    for node in CLIENTS:
        assert {p["type"] for p in lab.status(node)["peers"]} == {"rr"}
        rib = lab.rib(node)
        for other in CLIENTS:
            if other == node:
                continue
            paths = rib[blocks[other]]
            assert sorted(p["peer"] for p in paths) == ["10.0.0.1", "10.0.0.2"], paths
            for path in paths:
                assert path["next_hop"] == ADDRESS[other]
                assert path["originator_id"] == ADDRESS[other]
                assert path["cluster_list"] == [CLUSTER]
                assert path["as_path"] == []
    for name in REFLECTORS:
        peers = {p["address"]: p for p in lab.status(name)["peers"]}
        other = ADDRESS["rr2" if name == "rr1" else "rr1"]
        types = {a: (p["type"], p["speaker"]) for a, p in peers.items()}
        assert types == {other: ("node", "bird"), LOOPBACK: ("rr", "exabgp")} | {
            ADDRESS[c]: ("rr-client", "bird") for c in CLIENTS
        }, types
        for client in CLIENTS:  # every other node's block: not its own back
            assert peers[ADDRESS[client]]["advertised"] == len(NODES) - 1, peers
        # Its ExaBGP learns everything from its BIRD, with the node's own block left out.
        rib = lab.rib(name)
        assert {b for n, b in blocks.items() if n != name} <= set(rib)
        assert lab.status(name)["dropped_by_policy"] == {}
    assert lab.ping_failures() == []
