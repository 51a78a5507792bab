"""End-to-end fabric tests: a topology realised by `l3fabric lab up` (the shipped mesh3 file
unless a test says otherwise), pods attached through the real CNI path, ExaBGP sessions
between the node agents and the routes they put into the nodes' kernels.

The lab is named uniquely per run (`tests.lab.harness.Lab`), so its namespaces are
`<lab>-n1` .. `<lab>-n3` and `<lab>-sw`. Every lab is taken down by its fixture, also when a
test fails; processes a test starts itself (a restarted agent, a rogue BGP speaker) are
stopped by PID, never by name.

`Fabric` is what the tests look at: per node the agent's `node status`, the kernel's routes
of protocol 77 (`bgp_speaker.bgp.routes.PROTO_BGP`), and what they should be according to the
store (every node's confirmed blocks: a route via that node's address, a blackhole for the
node's own). Conditions are polled with deadlines; a timeout reports what was still wrong.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from bgp_speaker.bgp.routes import PROTO_BGP
from cni.protocol import call
from ipam_blocks import block as blockmath
from ipam_blocks.allocator import IPAM
from ipam_blocks.model import AffinityState
from ipam_blocks.store import open_store
from ipam_blocks.store.base import Resource, Store
from l3fabric.lab import host
from l3fabric.lab.layout import LabPaths
from l3fabric.lab.state import StateFile
from tests.lab.harness import REPO, Lab, in_netns, l3fabric

MESH3 = REPO / "tests" / "topologies" / "mesh3.clab.yml"
NODES = ("n1", "n2", "n3")
ADDRESS = {"n1": "10.0.0.11", "n2": "10.0.0.12", "n3": "10.0.0.13"}
CONVERGE = 60.0
HOLD = 3  # the shortest hold time BGP allows; keepalive 1 s
"""Seconds the fabric gets to converge after a change (sessions take ~5 s here; the machine
is shared, so the deadline is generous)."""

needs_fabric = pytest.mark.skipif(
    os.geteuid() != 0 or any(shutil.which(tool) is None for tool in ("ip", "ping", "exabgp")),
    reason="needs root, iproute2, ping and exabgp",
)


def eventually(check: Callable[[], list[str]], timeout: float, what: str) -> None:
    """Poll `check` (the problems still seen; empty: done) until it passes or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        problems = check()
        if not problems:
            return
        if time.monotonic() > deadline:
            shown = "\n  ".join(problems[:20])
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}:\n  {shown}")
        time.sleep(0.1)


def describe(route: dict[str, Any]) -> str:
    """One kernel route (`ip -j route` entry) as text: `blackhole` or `via A[,B...]`."""
    if route.get("type") == "blackhole":
        return "blackhole"
    if "nexthops" in route:
        return "via " + ",".join(sorted(h["gateway"] for h in route["nexthops"]))
    if "gateway" in route:
        return f"via {route['gateway']}"
    return json.dumps(route, sort_keys=True)


class Fabric:
    """A running lab of l3fabric nodes, and what the tests read from it."""

    def __init__(self, lab: Lab, nodes: tuple[str, ...] = NODES) -> None:
        self.lab = lab
        self.nodes = nodes
        self.paths = LabPaths(lab.state_dir)
        self.pods: dict[str, tuple[str, str]] = {}
        """Pod name -> (node, address), for the pods this fixture created and not deleted."""
        self.spawned: list[int] = []
        """PIDs this test process started (restarted agents): reaped at the end."""

    # --- where things are --------------------------------------------------------------------

    def netns(self, node: str) -> str:
        return self.lab.netns(node)

    @property
    def store_url(self) -> str:
        return self.paths.store_url

    @contextlib.contextmanager
    def store(self) -> Iterator[Store]:
        store = open_store(self.store_url)
        try:
            yield store
        finally:
            store.close()

    def socket(self, node: str) -> Path:
        return self.paths.node(node).agent_socket

    # --- the agents --------------------------------------------------------------------------

    def status(self, node: str) -> dict[str, Any]:
        """`node.status` straight from the agent's socket (cheap enough to poll)."""
        return call(str(self.socket(node)), "node.status", {}, timeout=10)

    def status_cli(self, node: str) -> dict[str, Any]:
        """`l3fabric node status --socket ... -o json`, the operator's view."""
        done = l3fabric("node", "status", "--socket", str(self.socket(node)), "-o", "json")
        assert done.code == 0, done
        return json.loads(done.out)

    def peers(self, node: str) -> dict[str, dict[str, Any]]:
        return {p["address"]: p for p in self.status(node)["peers"]}

    def process(self, node: str, daemon: str = "agent") -> Any:
        state = StateFile(self.lab.state_dir).load()
        return next(p for p in state.processes if p.node == node and p.daemon == daemon)

    def agent_pid(self, node: str) -> int:
        pid = self.process(node).pid
        assert pid is not None and host.is_running(pid), f"agent of {node} is not running"
        return pid

    def stop_agent(self, node: str) -> None:
        """SIGTERM the node's agent and wait until it has exited."""
        pid = self.agent_pid(node)
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while host.is_running(pid):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)  # ours if this test restarted it before
            assert time.monotonic() < deadline, f"agent of {node} ignored SIGTERM for 30 s"
            time.sleep(0.05)

    def restart_agent(self, node: str) -> int:
        """Start the node's agent again exactly as `lab up` did (recorded command line, same
        namespace and log), and record the new PID so `lab down` stops it."""
        journal = StateFile(self.lab.state_dir)
        with journal.locked():
            state = journal.load()
            record = next(p for p in state.processes if p.node == node and p.daemon == "agent")
            assert record.pid is None or not host.is_running(record.pid)
            record.pid = host.spawn(
                host.in_netns(record.netns, record.argv), env=dict(os.environ),
                log=Path(record.log),
            )  # fmt: skip
            self.spawned.append(record.pid)
            journal.save(state)
        return record.pid

    def exabgp_pid(self, node: str) -> int:
        """The ExaBGP child of the node's agent (its pid file, checked against /proc)."""
        agent = self.agent_pid(node)
        pid = int((self.paths.node(node).agent_state / "exabgp" / "exabgp.pid").read_text())
        stat = Path(f"/proc/{pid}/stat").read_text()
        parent = int(stat.rpartition(")")[2].split()[1])
        assert parent == agent, f"pid {pid} is not a child of {node}'s agent ({agent})"
        assert "exabgp" in " ".join(host.cmdline(pid) or []), host.cmdline(pid)
        return pid

    # --- the kernels -------------------------------------------------------------------------

    def kernel_routes(self, node: str, proto: int = PROTO_BGP) -> list[dict[str, Any]]:
        """`ip -n <node> -j route show proto <proto>` (main table)."""
        out = host.ip("-n", self.netns(node), "-j", "route", "show", "proto", str(proto))
        return json.loads(out) if out.strip() else []

    def route_table(self, node: str) -> dict[str, str]:
        """The node's protocol-77 routes, destination -> `describe` (see `duplicates`)."""
        return {route["dst"]: describe(route) for route in self.kernel_routes(node)}

    def duplicates(self, node: str) -> list[str]:
        """Destinations with more than one protocol-77 route (other metrics, say)."""
        counts = Counter(r["dst"] for r in self.kernel_routes(node))
        return sorted(dst for dst, n in counts.items() if n > 1)

    def route_get(self, node: str, address: str) -> dict[str, Any]:
        out = host.ip("-n", self.netns(node), "-j", "route", "get", address)
        return json.loads(out)[0]

    # --- the store: what the routes should be ------------------------------------------------

    def blocks(self) -> dict[str, set[str]]:
        """Per node, its blocks as the fabric should advertise them: affinity confirmed and
        the block naming the node."""
        with self.store() as store:
            ipam = IPAM(store)
            confirmed = {
                (a.node, str(a.cidr))
                for a in ipam.affinities()
                if a.state is AffinityState.CONFIRMED
            }
            out: dict[str, set[str]] = {n: set() for n in self.nodes}
            for blk in ipam.blocks():
                if blk.affinity in out and (blk.affinity, str(blk.cidr)) in confirmed:
                    out[blk.affinity].add(str(blk.cidr))
            return out

    def borrowed(self) -> dict[str, set[str]]:
        """Per node, /32s of addresses it holds in other nodes' blocks."""
        out: dict[str, set[str]] = {n: set() for n in self.nodes}
        with self.store() as store:
            for blk in IPAM(store).blocks():
                for ip, attr, _seq in blockmath.allocated(blk):
                    if attr.node in out and attr.node != blk.affinity:
                        out[attr.node].add(f"{ip}/32")
        return out

    def expected_table(self, node: str) -> dict[str, str]:
        """One route per remote block via its node, one per borrowed address via its
        holder, a blackhole per own block (`route_table`'s format)."""
        want: dict[str, str] = {}
        for owner, blocks in self.blocks().items():
            for cidr in blocks:
                want[cidr] = "blackhole" if owner == node else f"via {ADDRESS[owner]}"
        for holder, hosts in self.borrowed().items():
            for prefix in hosts:
                if holder != node:
                    want[prefix.removesuffix("/32")] = f"via {ADDRESS[holder]}"
        return want

    # --- convergence -------------------------------------------------------------------------

    def problems(self, extra_peers: dict[str, set[str]] | None = None) -> list[str]:
        """What keeps the fabric from being converged (empty: converged): every node has an
        established session to every other node (and to `extra_peers`), and exactly the
        expected routes in its kernel."""
        out: list[str] = []
        for node in self.nodes:
            try:
                peers = self.peers(node)
            except Exception as err:  # the agent may be (re)starting
                out.append(f"{node}: no status ({err})")
                continue
            wanted = {ADDRESS[n] for n in self.nodes if n != node}
            wanted |= (extra_peers or {}).get(node, set())
            if set(peers) != wanted:
                out.append(f"{node}: peers {sorted(peers)}, want {sorted(wanted)}")
            out += [
                f"{node}: session to {a} is {p['state']}"
                for a, p in sorted(peers.items())
                if p["state"] != "established"
            ]
            have, want = self.route_table(node), self.expected_table(node)
            if have != want:
                out.append(f"{node}: kernel routes {have}, want {want}")
            if self.duplicates(node):
                out.append(f"{node}: duplicate kernel routes for {self.duplicates(node)}")
        return out

    def wait_converged(self, timeout: float = CONVERGE, what: str = "the fabric") -> None:
        eventually(self.problems, timeout, f"{what} to converge")

    def sessions_since(self, node: str) -> dict[str, float]:
        return {a: p["since"] for a, p in self.peers(node).items() if p["state"] == "established"}

    def wait_sessions_after(self, moment: float, nodes: tuple[str, ...] | None = None) -> None:
        """Every session of `nodes` (default: all) established again after `moment`."""

        def check() -> list[str]:
            out = []
            for node in nodes or self.nodes:
                try:
                    peers = self.peers(node)
                except Exception as err:
                    out.append(f"{node}: no status ({err})")
                    continue
                out += [
                    f"{node}: session to {a} {p['state']} since {p['since']:.1f} (<= {moment:.1f})"
                    for a, p in sorted(peers.items())
                    if p["state"] != "established" or p["since"] <= moment
                ]
            return out

        eventually(check, CONVERGE, "sessions to be established again")

    # --- pods --------------------------------------------------------------------------------

    def add_pod(self, node: str, name: str) -> str:
        done = self.pod_verb("add", node, name)
        assert done.code == 0, done
        address = done.out.strip()
        self.pods[name] = (node, address)
        return address

    def del_pod(self, name: str) -> None:
        done = self.pod_verb("del", name)
        assert done.code == 0, done
        self.pods.pop(name, None)

    def pod_verb(self, verb: str, *argv: str) -> Any:
        # Above the CNI shim's own wait for a busy agent: this machine is shared.
        return self.lab.run("lab", "pod", verb, "--state-dir", str(self.lab.state_dir), *argv,
                            timeout=180)  # fmt: skip

    def pod_netns(self, name: str) -> str:
        return f"{self.lab.name}-{name}"

    def ping(self, pod: str, address: str, tries: int = 3) -> bool:
        for _ in range(tries):
            done = in_netns(self.pod_netns(pod), "ping", "-c", "1", "-W", "2", address, timeout=10)
            if done.returncode == 0:
                return True
        return False

    def ping_failures(self, pods: list[str] | None = None) -> list[str]:
        """Every pod pings every other pod: the pairs that failed."""
        names = sorted(pods if pods is not None else self.pods)
        return [
            f"{src} ({self.pods[src][0]}) -> {dst} {self.pods[dst][1]} ({self.pods[dst][0]})"
            for src in names
            for dst in names
            if src != dst and not self.ping(src, self.pods[dst][1])
        ]

    def reap(self) -> None:
        for pid in self.spawned:
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, os.WNOHANG)


@contextlib.contextmanager
def running_lab(
    tmp: Path, document: dict[str, Any], *up_args: str, nodes: tuple[str, ...] = NODES
) -> Iterator[Fabric]:
    """`lab up` a topology; `lab down` afterwards, whatever happened."""
    lab = Lab(tmp, document)
    fabric = Fabric(lab, nodes)
    try:
        done = lab.up(*up_args)
        assert done.code == 0, done
        yield fabric
    finally:
        lab.close()
        fabric.reap()
        leftover = lab.namespaces()
        assert not leftover, f"lab down left namespaces behind: {leftover}"


def mesh3_document() -> dict[str, Any]:
    return yaml.safe_load(MESH3.read_text())


class RouteMonitor:
    """`ip -n NETNS monitor route` in the background, every line kept: proof that a route
    went away even when it came back before a poll could see the gap."""

    PROBE = "198.51.100.77/32"  # TEST-NET-2: a throw-away route that shows the monitor is on

    def __init__(self, netns: str, device: str = "eth1") -> None:
        self.netns = netns
        self.lines: list[str] = []
        self._proc = subprocess.Popen(
            ["ip", "-n", netns, "monitor", "route"], stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        probe = self.PROBE.removesuffix("/32")
        route = (self.PROBE, "dev", device, "proto", "static")

        def poke() -> list[str]:
            # The monitor may subscribe after a first change: change the probe until it
            # demonstrably receives events.
            if self.saw(probe):
                return []
            with contextlib.suppress(Exception):
                host.ip("-n", netns, "route", "del", *route)
            host.ip("-n", netns, "route", "add", *route)
            return ["no event yet"]

        try:
            eventually(poke, 10, "ip monitor")
        finally:
            with contextlib.suppress(Exception):
                host.ip("-n", netns, "route", "del", *route)

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def saw(self, *words: str) -> bool:
        return any(all(w in line for w in words) for line in list(self.lines))

    def close(self) -> None:
        self._proc.terminate()
        try:
            self._proc.wait(10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(10)


def only(values: set[str]) -> str:
    assert len(values) == 1, values
    return next(iter(values))


def fast_failure_config() -> Resource:
    """The BGPConfiguration of the failure tests: the shortest hold time, no graceful
    restart, so a dead peer's routes go within HOLD seconds."""
    return Resource(
        "BGPConfiguration",
        "default",
        {"holdTime": HOLD, "keepaliveTime": 1, "gracefulRestartTime": 0},
    )
