"""l3fabric as the route reflector of a BIRD 2 client, an FRR client and an l3fabric node
(tests/topologies/rr-clients.clab.yml).

The reflector `rr` (BIRD, run by its agent) learns each client's routes and reflects them to
the others per RFC 4456:
ORIGINATOR_ID is the originating client's BGP identifier (the routers' router ids are not
their addresses, so it comes from their OPEN), CLUSTER_LIST is the reflector's cluster ID,
next hop and AS path are unchanged; a client never gets its own route back. Pods on the
l3fabric nodes reach the routers' networks and back.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.interop.harness import (
    CONVERGE,
    InteropLab,
    kernel,
    needs_interop,
    topology_lab,
    wait,
)

pytestmark = [pytest.mark.root, pytest.mark.slow, needs_interop]

NODES = ("rr", "n1")
RR, N1, BIRD, FRR = "10.0.0.1", "10.0.0.11", "10.0.0.21", "10.0.0.22"
BIRD_ID, FRR_ID = "192.0.2.21", "192.0.2.22"
BIRD_NET, FRR_NET = "10.250.1.0/26", "10.250.2.0/26"
BIRD_HOST, FRR_HOST = "10.250.1.1", "10.250.2.1"
CLUSTER = "244.0.0.1"
LOOPBACK = "127.0.0.1"  # the reflector's ExaBGP to its own BIRD


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InteropLab]:
    with topology_lab(tmp_path_factory.mktemp("rr-clients"), "rr-clients", NODES) as running:
        running.add_pod("n1", "n1a")
        running.add_pod("rr", "rra")
        yield running


def converged(lab: InteropLab) -> list[str]:
    problems = []
    try:
        if lab.established("rr") != {N1, BIRD, FRR, LOOPBACK}:
            problems.append(f"rr: established {lab.established('rr')}")
        if lab.established("n1") != {RR}:
            problems.append(f"n1: established {lab.established('n1')}")
    except Exception as err:
        return [f"no status ({err})"]
    blocks = {n: lab.block_of(n) for n in NODES if lab.blocks()[n]}
    if len(blocks) < 2:
        return [f"blocks {blocks}"]
    n1_table = lab.route_table("n1")
    for prefix, via in ((BIRD_NET, BIRD), (FRR_NET, FRR), (blocks["rr"], RR)):
        if n1_table.get(prefix) != f"via {via}":
            problems.append(f"n1: {prefix} {n1_table.get(prefix)}, want via {via}")
    bird = lab.bird_route("bird", blocks["n1"])
    if bird.get("BGP.next_hop") != N1:
        problems.append(f"bird: n1's block {bird}")
    if not lab.frr_paths("frr", blocks["n1"]) or not lab.frr_paths("frr", BIRD_NET):
        problems.append("frr: n1's block or BIRD's network missing")
    for router in ("bird", "frr"):  # in the routers' kernels too: replies must find the pods
        table = kernel(lab, router)
        for node, address in (("n1", N1), ("rr", RR)):
            if table.get(blocks[node]) != f"via {address}":
                problems.append(f"{router} kernel: {blocks[node]} {table.get(blocks[node])}")
    return problems


def test_clients_get_each_others_routes_with_rfc4456_attributes(lab: InteropLab) -> None:
    wait(lambda: converged(lab), "the l3fabric-reflected fabric to converge", CONVERGE)
    n1_block, rr_block = lab.block_of("n1"), lab.block_of("rr")

    # The reflector: three clients in its BIRD, all established, and its own ExaBGP.
    peers = lab.peers("rr")
    assert {a: (p["type"], p["speaker"]) for a, p in peers.items()} == {
        N1: ("rr-client", "bird"), BIRD: ("rr-client", "bird"), FRR: ("rr-client", "bird"),
        LOOPBACK: ("rr", "exabgp"),
    }  # fmt: skip
    # Each client gets the two other clients' routes and the reflector's own block.
    assert {a: p["advertised"] for a, p in peers.items() if a != LOOPBACK} == dict.fromkeys(
        (N1, BIRD, FRR), 3
    )

    # The l3fabric client sees the routers' routes reflected.
    rib = lab.rib("n1")
    for prefix, router, router_id in ((BIRD_NET, BIRD, BIRD_ID), (FRR_NET, FRR, FRR_ID)):
        [path] = rib[prefix]
        assert path["peer"] == RR and path["next_hop"] == router
        assert path["originator_id"] == router_id  # the BGP identifier, not the address
        assert path["cluster_list"] == [CLUSTER]
        assert path["as_path"] == [] and not path["ebgp"]
    # The reflector's own block, from its ExaBGP through its BIRD: reflected like a client's,
    # with the node's address as the loopback session's own cluster ID (see bgp/reflection.py).
    [own] = rib[rr_block]
    assert own["next_hop"] == RR and own["originator_id"] == RR
    assert own["cluster_list"] == [CLUSTER, RR]

    # BIRD's view of n1's block and of FRR's network.
    for prefix, next_hop, originator in ((n1_block, N1, N1), (FRR_NET, FRR, FRR_ID)):
        route = lab.bird_route("bird", prefix)
        assert route["BGP.next_hop"] == next_hop, route
        assert route["BGP.originator_id"] == originator, route
        assert route["BGP.cluster_list"] == CLUSTER, route
        assert route["BGP.as_path"] == "", route

    # FRR's view of n1's block and of BIRD's network; its own network only from itself.
    for prefix, next_hop, originator in ((n1_block, N1, N1), (BIRD_NET, BIRD, BIRD_ID)):
        [path] = lab.frr_paths("frr", prefix)
        assert path["originatorId"] == originator, path
        assert path["clusterList"]["list"] == [CLUSTER], path
        assert path["nexthops"][0]["ip"] == next_hop, path
        assert path["aspath"]["length"] == 0, path
        assert path["peer"]["peerId"] == RR, path
    own_paths = lab.frr_paths("frr", FRR_NET)
    assert len(own_paths) == 1 and own_paths[0]["peer"]["peerId"] == "0.0.0.0", own_paths

    # Pods reach the routers' networks (and the routers' networks reach the pods).
    for pod in ("n1a", "rra"):
        for address in (BIRD_HOST, FRR_HOST):
            assert lab.ping_from(pod, address), (pod, address)
    pod_n1 = lab.pods["n1a"][1]
    assert lab.ping_in("bird", pod_n1, source=BIRD_HOST)
    assert lab.ping_in("frr", pod_n1, source=FRR_HOST)
    assert lab.ping_failures() == []
    assert lab.status("rr")["dropped_by_policy"] == {}
