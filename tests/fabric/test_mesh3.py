"""The shipped mesh3 topology end to end: three l3fabric nodes on one bridge, two pods each.

One lab serves the whole module; the tests run in file order and each starts by waiting
until the fabric is converged again (every session up, exactly the expected routes), so a
test that disturbs it (a rogue peer, an agent restart, a killed ExaBGP, a released block)
leaves the next one a known state. The block release runs last: it removes n2's pods.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from ipaddress import ip_network
from pathlib import Path

import pytest
from netaddr import IPAddress, IPNetwork

from ipam_blocks import block as blockmath
from ipam_blocks.allocator import IPAM
from ipam_blocks.errors import NotFound
from ipam_blocks.store.base import Resource
from l3fabric.lab import host
from l3fabric.lab.status import agent_answers
from tests.fabric.harness import (
    ADDRESS,
    CONVERGE,
    NODES,
    Fabric,
    RouteMonitor,
    eventually,
    mesh3_document,
    needs_fabric,
    only,
    running_lab,
)

pytestmark = [pytest.mark.root, pytest.mark.slow, needs_fabric]

NODE_AT = {address: node for node, address in ADDRESS.items()}
POOL = ip_network("10.244.0.0/16")  # `lab up`'s default pool, blocks of /26


@pytest.fixture(scope="module")
def mesh3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fabric]:
    with running_lab(tmp_path_factory.mktemp("mesh3"), mesh3_document()) as fabric:
        for node in NODES:
            for suffix in ("a", "b"):
                fabric.add_pod(node, f"{node}{suffix}")
        yield fabric


@pytest.fixture
def fabric(mesh3: Fabric) -> Fabric:
    mesh3.wait_converged(what="the fabric (as the previous test left it)")
    return mesh3


# --- 1. steady state -------------------------------------------------------------------------


def test_sessions_routes_pings_and_counters(fabric: Fabric) -> None:
    blocks = fabric.blocks()
    # Two pods fit one /26: one block per node, each a different one, in the pool.
    assert all(len(blocks[node]) == 1 for node in NODES), blocks
    assert len(set().union(*blocks.values())) == 3
    for name, (node, address) in fabric.pods.items():
        assert IPAddress(address) in IPNetwork(only(blocks[node])), (name, address, blocks)

    # Six session ends, all established, all mesh; counters match what each side holds.
    for node in NODES:
        status = fabric.status_cli(node)
        peers = {p["address"]: p for p in status["peers"]}
        assert set(peers) == {ADDRESS[n] for n in NODES if n != node}
        for address, peer in peers.items():
            other = NODE_AT[address]
            assert peer["state"] == "established", (node, peer)
            assert peer["type"] == "mesh", (node, peer)
            assert peer["received"] == peer["accepted"] == len(blocks[other]), (node, peer)
            assert peer["advertised"] == len(blocks[node]), (node, peer)
        assert sorted(status["exported"]) == sorted(blocks[node])
        assert status["routes_installed"] == 3  # two remote blocks and one blackhole
        assert status["dropped_by_policy"] == {}
        assert status["speaker_restarts"] == 0
        assert status["synced"] is True

    # Kernels: exactly one protocol-77 route per remote block, via the owner's address, and
    # a blackhole for the node's own block; nothing twice, nothing else.
    for node in NODES:
        routes = fabric.kernel_routes(node)
        assert len(routes) == 3, routes
        assert fabric.duplicates(node) == []
        want = {only(blocks[n]): f"via {ADDRESS[n]}" for n in NODES if n != node}
        want[only(blocks[node])] = "blackhole"
        assert fabric.route_table(node) == want
        # The pods' own host routes are the CNI's (protocol 76), not the FIB's.
        pod_routes = {r["dst"] for r in fabric.kernel_routes(node, proto=76)}
        assert pod_routes == {a for n, a in fabric.pods.values() if n == node}

    assert fabric.ping_failures() == []


# --- 3. import policy against a rogue peer ---------------------------------------------------

ROGUE = "10.0.0.50"
OUTSIDE_POOLS = "192.168.77.0/24"
SHORTER_THAN_BLOCK = str(POOL)


def bird_config(routes: list[str], lower_preference: str) -> str:
    """A BIRD 2 iBGP speaker announcing `routes` (as blackholes, next hop itself) to every
    node; `lower_preference` goes out with LOCAL_PREF 50 so the rightful owner stays best
    where the route is accepted."""
    statics = "\n".join(f"  route {r} blackhole;" for r in routes)
    neighbours = "\n".join(
        f"protocol bgp fab_{node} from fabric {{ neighbor {address} as 64512; }}"
        for node, address in ADDRESS.items()
    )
    return f"""
router id {ROGUE};
protocol device {{}}
protocol static rogue_routes {{
  ipv4;
{statics}
}}
filter to_fabric {{
  if source != RTS_STATIC then reject;
  if net = {lower_preference} then bgp_local_pref = 50;
  accept;
}}
template bgp fabric {{
  local {ROGUE} as 64512;
  strict bind yes;
  passive on;
  ipv4 {{ import none; export filter to_fabric; next hop self; }};
}}
{neighbours}
"""


@contextlib.contextmanager
def rogue_speaker(fabric: Fabric, workdir: Path, config: str) -> Iterator[None]:
    """A fourth namespace on the lab's bridge, 10.0.0.50/24, running BIRD with `config`."""
    netns = f"{fabric.lab.name}-rogue"
    sw = fabric.netns("sw")
    bird: subprocess.Popen[bytes] | None = None
    socket = workdir / "bird.ctl"
    conf = workdir / "bird.conf"
    conf.write_text(config)
    try:
        host.add_netns(netns)
        host.ip("link", "add", "eth1", "netns", netns, "type", "veth",
                "peer", "name", "rogue", "netns", sw)  # fmt: skip
        host.ip("-n", sw, "link", "set", "rogue", "master", "sw")
        host.ip("-n", sw, "link", "set", "rogue", "up")
        host.ip("-n", netns, "addr", "add", f"{ROGUE}/24", "dev", "eth1")
        host.ip("-n", netns, "link", "set", "eth1", "up")
        with open(workdir / "bird.log", "wb") as log:
            bird = subprocess.Popen(
                host.in_netns(netns, ["bird", "-f", "-c", str(conf), "-s", str(socket),
                                      "-P", str(workdir / "bird.pid")]),
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip

        def serving() -> list[str]:
            assert bird is not None and bird.poll() is None, (workdir / "bird.log").read_text()
            return [] if socket.exists() else ["no control socket yet"]

        eventually(serving, 30, "BIRD to start")
        yield
    finally:
        if bird is not None:
            bird.terminate()
            try:
                bird.wait(10)
            except subprocess.TimeoutExpired:
                bird.kill()
                bird.wait(10)
        host.delete_netns(netns)


def free_block(fabric: Fabric) -> str:
    """A /26 of the pool that no node holds."""
    taken = {ip_network(b) for blocks in fabric.blocks().values() for b in blocks}
    return str(next(b for b in reversed(list(POOL.subnets(new_prefix=26))) if b not in taken))


@pytest.mark.skipif(shutil.which("bird") is None, reason="needs BIRD 2 (Debian bird2)")
def test_peer_announcing_foreign_prefixes_is_filtered_and_counted(
    fabric: Fabric, tmp_path: Path
) -> None:
    n1_block = only(fabric.blocks()["n1"])
    legit = free_block(fabric)
    announced = [OUTSIDE_POOLS, SHORTER_THAN_BLOCK, n1_block, legit]
    dropped = {
        "n1": {"outside-pools": 1, "shorter-than-block": 1, "own-block": 1},
        "n2": {"outside-pools": 1, "shorter-than-block": 1},
        "n3": {"outside-pools": 1, "shorter-than-block": 1},
    }
    with rogue_speaker(fabric, tmp_path, bird_config(announced, lower_preference=n1_block)):
        with fabric.store() as store:  # agents pick it up from the store, no restart
            store.create(Resource("BGPPeer", "rogue", {"peerIP": ROGUE, "asNumber": 64512}))
        try:

            def learned() -> list[str]:
                out = []
                for node in NODES:
                    peer = fabric.peers(node).get(ROGUE)
                    if peer is None or peer["state"] != "established" or peer["received"] < 4:
                        out.append(f"{node}: rogue session {peer}")
                    if fabric.route_table(node).get(legit) != f"via {ROGUE}":
                        out.append(f"{node}: no route {legit} via {ROGUE}")
                return out

            eventually(learned, CONVERGE, "the rogue's routes to arrive")
            # The legitimate /26 proves the session works; the rest is kept out of every
            # kernel: nothing else points at the rogue, n1 keeps its blackhole, and n2/n3
            # keep routing n1's block to n1 (the rogue's copy is accepted there, as any pool
            # block is, but loses on LOCAL_PREF).
            for node in NODES:
                want = {**fabric.expected_table(node), legit: f"via {ROGUE}"}
                assert fabric.route_table(node) == want, node
                assert fabric.duplicates(node) == []
                assert OUTSIDE_POOLS not in fabric.route_table(node)
                assert SHORTER_THAN_BLOCK not in fabric.route_table(node)
            assert fabric.route_table("n1")[n1_block] == "blackhole"
            for node in ("n2", "n3"):
                assert fabric.route_table(node)[n1_block] == f"via {ADDRESS['n1']}"
            # ... and counted, per reason, on each node.
            for node in NODES:
                status = fabric.status_cli(node)
                assert status["dropped_by_policy"] == dropped[node], node
                rogue = next(p for p in status["peers"] if p["address"] == ROGUE)
                assert rogue["type"] == "global"
                assert rogue["received"] == 4
                assert rogue["accepted"] == (1 if node == "n1" else 2)
                assert rogue["advertised"] == 1  # the node's own block
            assert fabric.ping_failures(["n1a", "n2a", "n3a"]) == []

            # Deleting the BGPPeer takes the session and everything it taught away.
            with fabric.store() as store:
                store.delete("BGPPeer", "rogue")
            fabric.wait_converged(what="the fabric without the rogue peer")
            assert all(fabric.status(n)["dropped_by_policy"] == {} for n in NODES)
        finally:
            with fabric.store() as store, contextlib.suppress(NotFound):
                store.delete("BGPPeer", "rogue")


# --- 4. agent restart ------------------------------------------------------------------------

FOREIGN = "10.244.250.0/24"  # an operator's static route inside the pool
LEFTOVER = "10.244.251.0/26"  # a protocol-77 route no peer announces any more


def test_agent_restart_keeps_forwarding_and_adopts_its_routes(fabric: Fabric) -> None:
    foreign = {
        "n1": ["route", "add", FOREIGN, "via", ADDRESS["n3"], "proto", "static"],
        "n2": ["route", "add", FOREIGN, "via", ADDRESS["n3"], "proto", "static"],
    }
    n1_block = only(fabric.blocks()["n1"])
    try:
        for node, argv in foreign.items():
            host.ip("-n", fabric.netns(node), *argv)
        before = fabric.route_table("n1")

        fabric.stop_agent("n1")
        assert not agent_answers(fabric.socket("n1"))
        # While n1's agent is away its kernel keeps every route, the peers keep n1's block
        # (graceful restart: n1's ExaBGP went without a NOTIFICATION), and pods keep talking.
        assert fabric.route_table("n1") == before
        eventually(
            lambda: [
                n for n in ("n2", "n3")
                if fabric.peers(n)[ADDRESS["n1"]]["state"] == "established"
            ],
            CONVERGE,
            "n2 and n3 to see their session to n1 go down",
        )  # fmt: skip
        for node in ("n2", "n3"):
            assert fabric.route_table(node)[n1_block] == f"via {ADDRESS['n1']}"
        assert fabric.ping_failures() == []
        assert fabric.route_table("n1") == before
        # A route of ours that nothing announces any more, as if withdrawn meanwhile.
        host.ip("-n", fabric.netns("n1"), "route", "add", LEFTOVER, "via", ADDRESS["n2"],
                "proto", "77")  # fmt: skip

        restarted = time.time()
        fabric.restart_agent("n1")
        fabric.wait_sessions_after(restarted, nodes=("n1",))
        eventually(
            lambda: [] if fabric.status("n1")["synced"] else ["n1 not synced"],
            CONVERGE,
            "n1's initial sync",
        )
        fabric.wait_converged(what="the fabric after n1's agent restart")

        # n1's kernel equals its RIB: one route per remote block, its blackhole, the leftover
        # swept, nothing twice; the operator's routes on n1 and n2 untouched.
        assert fabric.duplicates("n1") == []
        assert fabric.route_table("n1") == fabric.expected_table("n1") == before
        assert LEFTOVER not in fabric.route_table("n1")
        status = fabric.status("n1")
        assert status["routes_installed"] == len(before)
        assert status["speaker_restarts"] == 0
        for node in foreign:
            [route] = fabric.kernel_routes(node, proto=4)  # rt_protos: static = 4
            assert (route["dst"], route.get("gateway")) == (FOREIGN, ADDRESS["n3"]), node
        assert fabric.ping_failures() == []
    finally:
        for node in foreign:
            with contextlib.suppress(Exception):
                host.ip("-n", fabric.netns(node), "route", "del", FOREIGN, "proto", "static")
        with contextlib.suppress(Exception):
            host.ip("-n", fabric.netns("n1"), "route", "del", LEFTOVER, "proto", "77")


# --- 5. ExaBGP killed ------------------------------------------------------------------------


def test_killed_exabgp_is_restarted_and_routes_come_back(fabric: Fabric) -> None:
    """Without graceful restart (gracefulRestartTime 0) and with short timers, a node whose
    ExaBGP dies disappears from the fabric at once, and comes back when its agent has
    started ExaBGP again."""
    n3_block = only(fabric.blocks()["n3"])
    changed = time.time()
    with fabric.store() as store:
        store.create(
            Resource("BGPConfiguration", "default",
                     {"holdTime": 9, "keepaliveTime": 3, "gracefulRestartTime": 0})
        )  # fmt: skip
    monitors: dict[str, RouteMonitor] = {}
    try:
        fabric.wait_sessions_after(changed)  # every session renegotiated with the new timers
        fabric.wait_converged(what="the fabric with the new BGP configuration")
        for node in NODES:
            config = (fabric.paths.node(node).agent_state / "exabgp" / "exabgp.conf").read_text()
            assert "hold-time 9;" in config and "graceful-restart" not in config, node
        blocks = {node: only(fabric.blocks()[node]) for node in NODES}
        restarts = fabric.status("n3")["speaker_restarts"]
        exabgp = fabric.exabgp_pid("n3")
        monitors = {node: RouteMonitor(fabric.netns(node)) for node in NODES}

        killed = time.time()
        os.kill(exabgp, signal.SIGKILL)
        # The peers drop n3's block, and n3 (its speaker restarted) what its peers taught it.
        # Seen in the kernels' route events: the gap may close before a poll could see it.
        gone = {"n1": [n3_block], "n2": [n3_block], "n3": [blocks["n1"], blocks["n2"]]}
        eventually(
            lambda: [
                f"{node}: {prefix}"
                for node, prefixes in gone.items()
                for prefix in prefixes
                if not monitors[node].saw("Deleted", prefix)
            ],
            9 + 20,  # hold time and slack; a killed ExaBGP's sockets close, so it is sooner
            "the routes learned over n3's sessions to be removed",
        )
        eventually(
            lambda: (
                []
                if fabric.status("n3")["speaker_restarts"] == restarts + 1
                else ["not restarted yet"]
            ),
            CONVERGE,
            "n3's agent to restart ExaBGP",
        )
        assert fabric.exabgp_pid("n3") != exabgp
        fabric.wait_sessions_after(killed, nodes=("n3",))
        fabric.wait_converged(what="the fabric after n3's ExaBGP came back")
        for node in ("n1", "n2"):
            assert fabric.route_table(node)[n3_block] == f"via {ADDRESS['n3']}"
        assert fabric.ping_failures() == []
    finally:
        for monitor in monitors.values():
            monitor.close()
        restored = time.time()
        with fabric.store() as store, contextlib.suppress(NotFound):
            store.delete("BGPConfiguration", "default")
    fabric.wait_sessions_after(restored)  # back to the defaults for the next test


# --- 2. releasing a block --------------------------------------------------------------------


def test_released_block_is_withdrawn_everywhere(fabric: Fabric) -> None:
    n2_block = only(fabric.blocks()["n2"])
    for name in [p for p, (node, _) in fabric.pods.items() if node == "n2"]:
        fabric.del_pod(name)
    with fabric.store() as store:
        block = IPAM(store).read_block(IPNetwork(n2_block))
    # Every address released, the block still n2's: still advertised and routed.
    assert blockmath.in_use_count(block) == 0 and block.affinity == "n2"
    assert fabric.route_table("n2")[n2_block] == "blackhole"
    for node in ("n1", "n3"):
        assert fabric.route_table(node)[n2_block] == f"via {ADDRESS['n2']}"

    with fabric.store() as store:
        IPAM(store).release_affinity("n2", IPNetwork(n2_block))
    eventually(
        lambda: [n for n in NODES if n2_block in fabric.route_table(n)],
        CONVERGE,
        f"{n2_block} to leave every kernel",
    )
    fabric.wait_converged(what="the fabric without n2's block")
    assert fabric.blocks()["n2"] == set()
    assert fabric.status("n2")["exported"] == []
    for node in ("n1", "n3"):
        peer = fabric.peers(node)[ADDRESS["n2"]]
        assert peer["state"] == "established"
        assert peer["received"] == peer["accepted"] == 0
    assert fabric.ping_failures() == []  # the pods left on n1 and n3
