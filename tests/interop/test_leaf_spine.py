"""FRR top-of-rack routers per rack and two FRR spines, eBGP everywhere
(tests/topologies/leaf-spine.clab.yml).

Each node peers with its own rack's ToR only (BGPPeers chosen by nodeSelector), rack 2 with a
TCP MD5 password. Blocks cross the racks through both spines; the nodes install them via
their ToR with the AS path the route travelled, take the default route their ToR offers
(accepted because their BGPPeer lists it), and advertise nothing but their own blocks,
tagged with the configured communities.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.interop.harness import CONVERGE, InteropLab, kernel, needs_interop, topology_lab, wait

pytestmark = [pytest.mark.root, pytest.mark.slow, needs_interop]

NODES = ("r1n1", "r1n2", "r2n1", "r2n2")
ADDRESS = {"r1n1": "10.0.1.11", "r1n2": "10.0.1.12", "r2n1": "10.0.2.11", "r2n2": "10.0.2.12"}
ASN = {"r1n1": 65111, "r1n2": 65112, "r2n1": 65121, "r2n2": 65122}
TOR = {"r1": ("tor1", "10.0.1.1", 65001), "r2": ("tor2", "10.0.2.1", 65002)}
SPINE_AS = 65000


def rack(node: str) -> str:
    return node[:2]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InteropLab]:
    with topology_lab(tmp_path_factory.mktemp("leaf-spine"), "leaf-spine", NODES) as running:
        for node in NODES:
            running.add_pod(node, f"{node}a")
        yield running


def converged(lab: InteropLab) -> list[str]:
    problems = []
    blocks = {n: b for n, bs in lab.blocks().items() for b in bs}
    if len(blocks) != len(NODES):
        return [f"blocks {blocks}"]
    for node in NODES:
        _, tor_ip, _ = TOR[rack(node)]
        try:
            if lab.established(node) != {tor_ip}:
                problems.append(f"{node}: established {lab.established(node)}")
        except Exception as err:
            return [f"{node}: no status ({err})"]
        table = lab.route_table(node)
        for other, block in blocks.items():
            if other == node:
                want = {"blackhole"}
            elif rack(other) == rack(node):  # the ToR keeps a next hop on the shared segment
                want = {f"via {ADDRESS[other]}", f"via {tor_ip}"}
            else:
                want = {f"via {tor_ip}"}
            if table.get(block) not in want:
                problems.append(f"{node}: {block} {table.get(block)}, want {want}")
        if table.get("default") != f"via {tor_ip}":
            problems.append(f"{node}: default {table.get('default')}")
    return problems


def test_pods_reach_across_racks_through_tors_and_spines(lab: InteropLab) -> None:
    wait(lambda: converged(lab), "the leaf-spine fabric to converge", CONVERGE)
    blocks = {node: lab.block_of(node) for node in NODES}

    for node in NODES:
        tor_name, tor_ip, tor_as = TOR[rack(node)]
        [peer] = lab.status(node)["peers"]
        assert (peer["address"], peer["type"], peer["state"]) == (tor_ip, "node", "established")
        rib = lab.rib(node)
        for other in NODES:
            if other == node:
                assert blocks[node] not in rib  # the ToR may send it back: dropped
                continue
            [path] = rib[blocks[other]]
            assert path["peer"] == tor_ip and path["ebgp"], path
            assert path["originator_id"] is None and path["cluster_list"] == []
            if rack(other) == rack(node):
                assert path["as_path"] == [tor_as, ASN[other]], path
            else:
                other_tor_as = TOR[rack(other)][2]
                assert path["as_path"] == [tor_as, SPINE_AS, other_tor_as, ASN[other]], path
                assert path["next_hop"] == tor_ip, path
        assert set(lab.status(node)["dropped_by_policy"]) <= {"own-block", "as-path-loop"}
        [default] = rib["0.0.0.0/0"]
        assert default["as_path"] == [tor_as] and default["next_hop"] == tor_ip
        # Export policy: the ToR hears this node's own block and nothing else, tagged with
        # the communities of BGPConfiguration.prefixAdvertisements.
        heard = lab.vtysh_json(tor_name, f"show bgp ipv4 unicast neighbors {ADDRESS[node]} routes")
        assert set(heard.get("routes", {})) == {blocks[node]}, heard
        [from_node] = [p for p in lab.frr_paths(tor_name, blocks[node])
                       if p["peer"]["peerId"] == ADDRESS[node]]  # fmt: skip
        assert from_node["community"]["string"] == "65100:1 65100:244", from_node

    # The ToRs spread cross-rack traffic over both spines (ECMP).
    # zebra installs after bgpd has advertised, so the kernel may lag the session checks above.
    def tor1_ecmp() -> list[str]:
        got = kernel(lab, "tor1").get(blocks["r2n1"])
        return [] if got == "via 10.1.11.1,10.1.12.1" else [f"tor1 {blocks['r2n1']}: {got}"]

    wait(tor1_ecmp, "tor1 to install both spine paths", CONVERGE)

    # Rack 2 runs TCP MD5: the agents' ExaBGP carries the password, tor2 requires it.
    for node in ("r2n1", "r2n2"):
        conf = (lab.paths.node(node).agent_state / "exabgp" / "exabgp.conf").read_text()
        assert "md5-password" in conf, conf
        assert lab.frr_state("tor2", ADDRESS[node]) == "Established"
    assert "password" in lab.vtysh("tor2", "show running-config")

    assert lab.ping_failures() == []
