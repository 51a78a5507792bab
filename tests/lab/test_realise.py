"""`l3fabric lab up|status|down` on real namespaces, veths, bridges and daemons."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from netaddr import IPAddress, IPNetwork

from ipam_blocks import block as blockmath
from ipam_blocks.allocator import IPAM
from ipam_blocks.model import parse_node
from ipam_blocks.store.sqlite import SqliteStore
from l3fabric.lab import host
from l3fabric.lab.state import LabState, PodRecord, ProcessRecord, StateFile
from tests.lab.harness import Lab, in_netns, pings, wait_for
from tests.lab.schema import TOPOLOGIES

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and iproute2"
    ),
]

ALPINE = {"kind": "linux", "image": "alpine:3.20"}


class Labs:
    """Makes labs in one test's temporary directory; closes them all afterwards."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.made: list[Lab] = []

    def __call__(self, document: dict[str, Any], files: dict[str, str] | None = None) -> Lab:
        lab = Lab(self.tmp / f"lab{len(self.made)}", document, files or {})
        self.made.append(lab)
        return lab


@pytest.fixture
def labs(tmp_path: Path) -> Iterator[Labs]:
    made = Labs(tmp_path)
    yield made
    for lab in made.made:
        lab.close()


def two_hosts_on_a_bridge(
    extra_b: dict[str, Any] | None = None, extra_a: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {
        "topology": {
            "nodes": {
                "a": {**ALPINE, "exec": ["ip addr add 192.0.2.1/24 dev eth1"],
                      **(extra_a or {})},
                "b": {**ALPINE, "exec": ["ip addr add 192.0.2.2/24 dev eth1"], **(extra_b or {})},
                "sw": {"kind": "bridge"},
            },
            "links": [
                {"endpoints": ["a:eth1", "sw:port-a"]},
                {"endpoints": ["b:eth1", "sw:port-b"], "mtu": 9000},
            ],
        }
    }  # fmt: skip


def link_flags(netns: str, ifname: str) -> str:
    return host.ip("-n", netns, "-o", "link", "show", ifname)


def test_plain_nodes_over_a_bridge(labs: Labs) -> None:
    greeting = labs.tmp / "greeting"
    lab = labs(two_hosts_on_a_bridge(extra_a={
        "env": {"GREETING": "hello"},
        "exec": ["ip addr add 192.0.2.1/24 dev eth1",
                 # env reaches exec lines; a background process does not hold `lab up` up
                 f"sh -c 'echo $GREETING > {greeting}; exec sleep 60 &'"],
    }))  # fmt: skip
    lab.up_ok()
    assert greeting.read_text() == "hello\n"
    [sleeper] = host.netns_pids(lab.netns("a"))
    assert lab.namespaces() == {lab.netns("a"), lab.netns("b"), lab.netns("sw")}
    assert "state UP" in link_flags(lab.netns("a"), "eth1")
    assert "mtu 9000" in link_flags(lab.netns("b"), "eth1")
    assert "master sw" in link_flags(lab.netns("sw"), "port-a")
    assert "UP" in link_flags(lab.netns("sw"), "lo")
    assert pings(lab.netns("a"), "192.0.2.2")  # the exec lines ran, the bridge forwards
    assert pings(lab.netns("b"), "192.0.2.1")

    code, status = lab.status()
    assert code == 0 and status["healthy"] and status["phase"] == "up"
    assert {n["name"]: n["netns_present"] for n in status["nodes"]} == {
        "a": True, "b": True, "sw": True,
    }  # fmt: skip
    table = lab.run("lab", "status", str(lab.file), "--state-dir", str(lab.state_dir))
    assert table.code == 0 and lab.netns("sw") in table.out

    again = lab.up()  # refused, and the running lab is untouched
    assert again.code == 1 and "already up" in again.err and "lab down" in again.err
    assert pings(lab.netns("a"), "192.0.2.2")

    down = lab.down()
    assert down.code == 0, down
    assert lab.namespaces() == set()
    assert not lab.state_dir.exists()
    assert not host.is_running(sleeper)
    assert lab.status()[0] == 1  # not up


def test_exec_line_failure_names_the_line(labs: Labs) -> None:
    lab = labs(two_hosts_on_a_bridge({"exec": ["ip link set nosuchdev up"]}))
    done = lab.up()
    assert done.code == 1
    assert "topology.nodes.b.exec[0]" in done.err and "nosuchdev" in done.err
    assert lab.state()["phase"] == "starting"
    assert lab.down().code == 0
    assert lab.namespaces() == set() and not lab.state_dir.exists()


def test_down_after_lab_up_was_killed_half_way(labs: Labs) -> None:
    marker = labs.tmp / "exec-started"
    lab = labs(two_hosts_on_a_bridge({"exec": [f"touch {marker}", "sleep 60"]}))

    def sleepers() -> list[int]:
        if not marker.exists():  # b's namespace may not exist before its first exec line
            return []
        return [p for p in host.netns_pids(lab.netns("b")) if host.cmdline(p) == ["sleep", "60"]]

    proc = lab.up_process()
    try:
        # Kill `lab up` while b's second exec line runs (not merely once the first has run).
        wait_for(lambda: bool(sleepers()), what="b's second exec line running")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    sleeper = sleepers()
    assert sleeper, "the exec line that was running keeps running after the crash"
    assert lab.state()["phase"] == "starting"
    assert lab.namespaces() == {lab.netns("a"), lab.netns("b"), lab.netns("sw")}

    again = lab.up()
    assert again.code == 1 and "crashed" in again.err

    down = lab.down()
    assert down.code == 0, down
    assert lab.namespaces() == set() and not lab.state_dir.exists()
    assert not host.is_running(sleeper[0])


def test_down_from_a_partial_state_file(labs: Labs) -> None:
    """What a crash at any point can leave: a namespace recorded but never created, a daemon
    started but its PID never recorded, a recorded PID that now belongs to someone else."""
    lab = labs(two_hosts_on_a_bridge())
    created, never = lab.netns("a"), lab.netns("b")
    host.add_netns(created)
    orphan = host.spawn(host.in_netns(created, ["sleep", "60"]), env=os.environ, log=lab.tmp / "o")
    bystander = subprocess.Popen(["sleep", "61"])  # a recycled PID, as far as the lab knows
    leftover = lab.tmp / "leftover-dir"
    leftover.mkdir()
    try:
        wait_for(lambda: host.cmdline(orphan) == ["sleep", "60"], what="the orphan")
        state = LabState(lab.name, str(lab.file), str(lab.state_dir), "sqlite:/nonexistent",
                         owned_store=False)  # fmt: skip
        state.netns += [created, never]
        state.paths.append(str(leftover))
        state.processes += [
            ProcessRecord("a", "bird", created, ["bird", "-f"], "/dev/null", None),
            ProcessRecord("b", "bird", never, ["bird", "-f"], "/dev/null", bystander.pid),
        ]
        state.pods["p"] = PodRecord("p", "a", "default", lab.netns("p"), lab.netns("p"))
        StateFile(lab.state_dir).save(state)

        down = lab.down()
        assert down.code == 0, down
        assert lab.namespaces() == set() and not leftover.exists()
        assert not lab.state_dir.exists()
        wait_for(lambda: not host.is_running(orphan), what="the orphan to go")
        assert bystander.poll() is None  # its command line did not match: left alone
    finally:
        bystander.kill()
        bystander.wait()


FRR_CONF = """frr defaults traditional
hostname r1
router bgp 65001
 bgp router-id 192.0.2.1
 no bgp ebgp-requires-policy
 neighbor 192.0.2.2 remote-as 65002
!
"""
BIRD_CONF = """router id 192.0.2.2;
protocol device {}
protocol bgp r1 {
  local 192.0.2.2 as 65002;
  neighbor 192.0.2.1 as 65001;
  strict bind yes;
  ipv4 { import all; export none; };
}
"""


@pytest.mark.skipif(
    shutil.which("bird") is None or not Path("/usr/lib/frr/zebra").exists(),
    reason="needs bird2 and frr (Debian packages)",
)
def test_frr_and_bird_nodes_start_peer_and_stop(labs: Labs) -> None:
    lab = labs(
        {
            "topology": {
                "nodes": {
                    "r1": {"kind": "linux", "image": "quay.io/frrouting/frr:8.4.4",
                           "binds": ["r1/frr.conf:/etc/frr/frr.conf"],
                           "exec": ["ip addr add 192.0.2.1/24 dev eth1"]},
                    "r2": {"kind": "linux", "image": "ghcr.io/example/bird:2.0",
                           "binds": ["r2/bird.conf:/etc/bird/bird.conf:ro"],
                           "exec": ["ip addr add 192.0.2.2/24 dev eth1"]},
                },
                "links": [{"endpoints": ["r1:eth1", "r2:eth1"]}],
            }
        },
        files={"r1/frr.conf": FRR_CONF, "r2/bird.conf": BIRD_CONF},
    )  # fmt: skip
    lab.up_ok()
    code, status = lab.status()
    assert code == 0, status
    daemons = {(n["name"], p["daemon"]): p["pid"] for n in status["nodes"] for p in n["processes"]}
    assert {("r1", "zebra"), ("r1", "bgpd"), ("r2", "bird")} <= set(daemons)
    instance = lab.netns("r1")
    config = in_netns(instance, "vtysh", "-N", instance, "-c", "show running-config").stdout
    assert "neighbor 192.0.2.2 remote-as 65002" in config  # the bound frr.conf was loaded
    bird_socket = str(lab.state_dir / "nodes" / "r2" / "bird.ctl")

    def established() -> bool:
        out = in_netns(lab.netns("r2"), "birdc", "-s", bird_socket, "show", "protocols").stdout
        return "Established" in out

    wait_for(established, timeout=20, what="the BIRD-FRR session")

    assert lab.down().code == 0
    assert not any(host.is_running(pid) for pid in daemons.values())
    assert not Path(f"/var/run/frr/{instance}").exists()
    assert lab.namespaces() == set() and not lab.state_dir.exists()


PODS = {"web": "n1", "db": "n1", "api": "n2"}  # pod -> node


def test_mesh3_agents_and_pods_through_the_cni_path(labs: Labs) -> None:
    document = yaml.safe_load((TOPOLOGIES / "mesh3.clab.yml").read_text())
    lab = labs(document)
    store_path = lab.tmp / "shared.db"  # a store of our own: what `lab down` leaves in it
    lab.up_ok("--store", f"sqlite:{store_path}")
    code, status = lab.status()
    assert code == 0, status
    assert {n["name"]: n["agent_answers"] for n in status["nodes"]} == {
        "n1": True, "n2": True, "n3": True, "sw": None,
    }  # fmt: skip
    store = SqliteStore(store_path)
    try:
        ipam = IPAM(store)
        nodes = {n: ipam.node(n) for n in ("n1", "n2", "n3")}
        assert nodes["n1"].labels == {"rack": "r1"} and nodes["n3"].labels == {"rack": "r2"}
        assert nodes["n2"].ipv4_address == IPNetwork("10.0.0.12/24")
        assert nodes["n2"].as_number == 64512
        assert [(p.name, str(p.cidr), p.block_size) for p in ipam.pools()] == [
            ("default", "10.244.0.0/16", 26)
        ]
        assert pings(lab.netns("n1"), "10.0.0.13")  # the fabric segment

        runs = {pod: lab.pod("add", node, pod) for pod, node in PODS.items()}
        assert all(run.code == 0 for run in runs.values()), runs
        addresses = {pod: run.out.strip() for pod, run in runs.items()}
        assert all(IPAddress(a) in IPNetwork("10.244.0.0/16") for a in addresses.values())
        assert len(set(addresses.values())) == 3

        shown = lab.pod("exec", "web", "--", "ip", "-o", "-4", "addr", "show", "eth0")
        assert shown.code == 0 and f"{addresses['web']}/32" in shown.out
        ping = lab.pod("exec", "web", "--", "ping", "-c", "1", "-W", "2", addresses["db"])
        assert ping.code == 0, ping  # pod to pod on one node, through the node's routes
        assert lab.pod("exec", "web", "--", "sh", "-c", "exit 7").code == 7

        duplicate = lab.pod("add", "n2", "web")
        assert duplicate.code == 2 and "exists already" in duplicate.err
        no_agent = lab.pod("add", "sw", "x")
        assert no_agent.code == 2 and "runs no l3fabric agent" in no_agent.err
        _, status = lab.status()
        assert {p["name"]: p["address"] for p in status["pods"]} == addresses

        assert lab.pod("del", "db").code == 0
        assert lab.netns("db") not in lab.namespaces()
        assert lab.pod("exec", "db", "--", "true").code == 2
        allocated = {str(ip) for blk in ipam.blocks() for ip, _, _ in blockmath.allocated(blk)}
        assert allocated == {addresses["web"], addresses["api"]}

        agents = [p["pid"] for n in status["nodes"] for p in n["processes"]]
        assert lab.down().code == 0
        assert lab.namespaces() == set()  # nodes, the bridge and the pods' namespaces
        assert not any(host.is_running(pid) for pid in agents)
        # down detached the pods through their agents: a shared store gets the addresses back
        assert [ip for blk in ipam.blocks() for ip, _, _ in blockmath.allocated(blk)] == []
        assert sorted(n.name for n in map(parse_node, store.list("Node").items)) == [
            "n1", "n2", "n3",
        ]  # fmt: skip
    finally:
        store.close()
