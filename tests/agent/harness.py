"""One test node: an embedded store with pools and a Node, a network namespace playing the
host, the real agent as a subprocess and the real plugin installed by `cni install`.

Everything lives in namespaces and files this harness creates, and `close` removes them
(processes by PID, namespaces by name), also after a failed test.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from netaddr import IPNetwork

from bgp_speaker.pods import dataplane
from cni.install import install
from cni.protocol import AgentUnreachable, call
from ipam_blocks import block as blockmath
from ipam_blocks.allocator import IPAM
from ipam_blocks.check import CheckReport, check
from ipam_blocks.model import IPPool, Node, parse_workload
from ipam_blocks.pools import add_node, add_pool
from ipam_blocks.store.sqlite import SqliteStore
from ipam_blocks.store.workloads import WorkloadRecordLiveness
from tests.cni.runtime import Container, PluginRun, exec_plugin, plugin_env

NETNS_DIR = Path("/var/run/netns")
REPO = Path(__file__).resolve().parents[2]
NODE = "node-a"
HOST_ADDRESS = "10.255.0.1"  # on the host namespace's lo: "the host" pods ping
UPLINK_HOST, UPLINK_PEER = "192.0.2.1", "192.0.2.2"  # TEST-NET-1, between host and "world"
DEFAULT_POOLS = (("main", "10.60.0.0/22", 26), ("tiny", "10.61.0.0/30", 30))
_counter = iter(range(1_000_000))


def run_ip(*args: str, netns: str | None = None, check: bool = True) -> str:
    cmd = ["ip", *(["-n", netns] if netns else []), *args]
    return subprocess.run(cmd, capture_output=True, text=True, check=check).stdout


def in_netns(netns: str, *cmd: str, timeout: float = 10) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", netns, *cmd],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@dataclass
class AgentProcess:
    proc: subprocess.Popen[bytes]
    socket: Path
    log: Path

    def call(self, op: str, args: dict[str, Any] | None = None) -> Any:
        return call(str(self.socket), op, args or {}, timeout=30)

    def stop(self, timeout: float = 20) -> int:
        """SIGTERM and wait: the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass
class NodeHarness:
    tmp: Path
    pools: tuple[tuple[str, str, int], ...] = DEFAULT_POOLS
    prefix: str = field(default_factory=lambda: f"l3t{os.getpid() % 100000}x{next(_counter)}")
    agents: list[AgentProcess] = field(default_factory=list)
    namespaces: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.store_path = self.tmp / "store.db"
        self.store = SqliteStore(self.store_path)
        self.ipam = IPAM(self.store)
        for name, cidr, size in self.pools:
            add_pool(self.ipam, IPPool(name, IPNetwork(cidr), size))
        add_node(self.ipam, Node(NODE))
        self.socket = self.tmp / "run" / "agent.sock"
        self.host_ns = self.new_netns("host")
        run_ip("link", "set", "lo", "up", netns=self.host_ns)
        run_ip("addr", "add", f"{HOST_ADDRESS}/32", "dev", "lo", netns=self.host_ns)
        self._add_uplink()
        installed = install(self.tmp / "bin", self.tmp / "conf", socket=str(self.socket))
        self.plugin = installed.plugin
        self.conflist = installed.conflist

    def _add_uplink(self) -> None:
        """A default route out of an uplink, as every real node has: proxy ARP answers for
        169.254.1.1 only if the host routes it out of another interface than the pod's."""
        world = self.new_netns("world")
        run_ip("link", "add", "up0", "type", "veth", "peer", "name", "up1", "netns", world,
               netns=self.host_ns)  # fmt: skip
        run_ip("addr", "add", f"{UPLINK_HOST}/24", "dev", "up0", netns=self.host_ns)
        run_ip("addr", "add", f"{UPLINK_PEER}/24", "dev", "up1", netns=world)
        run_ip("link", "set", "up0", "up", netns=self.host_ns)
        run_ip("link", "set", "up1", "up", netns=world)
        run_ip("route", "add", "default", "via", UPLINK_PEER, netns=self.host_ns)

    # --- namespaces -----------------------------------------------------------------------

    def new_netns(self, name: str) -> str:
        full = f"{self.prefix}-{name}"
        run_ip("netns", "add", full)
        self.namespaces.append(full)
        return full

    def new_netns_batch(self, names: list[str]) -> list[str]:
        """Many namespaces with one `ip` process (one per namespace takes seconds for 200)."""
        full = [f"{self.prefix}-{name}" for name in names]
        _ip_batch("".join(f"netns add {ns}\n" for ns in full))
        self.namespaces += full
        return full

    def netns_path(self, name: str) -> str:
        return str(NETNS_DIR / name)

    @property
    def host_netns_path(self) -> str:
        return self.netns_path(self.host_ns)

    def new_pod(self, pod: str, ifname: str = "eth0") -> Container:
        ns = self.new_netns(pod)
        run_ip("link", "set", "lo", "up", netns=ns)
        return Container(f"ctr-{self.prefix}-{pod}", self.netns_path(ns), ifname, pod=pod)

    def delete_netns(self, name: str) -> None:
        run_ip("netns", "del", name, check=False)
        if name in self.namespaces:
            self.namespaces.remove(name)

    # --- the agent ------------------------------------------------------------------------

    def agent_command(self) -> list[str]:
        return [
            sys.executable, "-m", "l3fabric.cli", "--log-level", "info", "--store",
            f"sqlite:{self.store_path}", "agent", "--node", NODE, "--socket", str(self.socket),
            "--state-dir", str(self.tmp / "state"), "--host-netns", self.host_netns_path,
        ]  # fmt: skip

    def start_agent(self, timeout: float = 20, extra_args: Sequence[str] = ()) -> AgentProcess:
        log = self.tmp / f"agent-{len(self.agents)}.log"
        with open(log, "wb") as err:
            proc = subprocess.Popen(
                [*self.agent_command(), *extra_args], cwd=REPO, stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=err,
            )  # fmt: skip
        agent = AgentProcess(proc, self.socket, log)
        self.agents.append(agent)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"agent exited {proc.returncode}:\n{agent.log_text()}")
            with contextlib.suppress(AgentUnreachable):
                agent.call("agent.status")
                return agent
            time.sleep(0.05)
        agent.kill()
        raise AssertionError(f"agent did not answer in {timeout} s:\n{agent.log_text()}")

    # --- the plugin, as a runtime runs it -------------------------------------------------

    def conf(self, **overrides: Any) -> dict[str, Any]:
        base = {"cniVersion": "1.0.0", "name": "l3fabric", "type": "l3fabric"}
        return {**base, "socket": str(self.socket), **overrides}

    def cni(
        self,
        command: str,
        c: Container | None,
        conf: dict[str, Any] | bytes | None = None,
        env: dict[str, str | None] | None = None,
    ) -> PluginRun:
        """Execute the installed plugin once; `env` overrides (None removes a variable)."""
        stdin = conf if isinstance(conf, bytes) else json.dumps(conf or self.conf()).encode()
        full = plugin_env(command, c, ["/usr/lib/cni", self.plugin.parent])
        for key, value in (env or {}).items():
            if value is None:
                full.pop(key, None)
            else:
                full[key] = value
        return exec_plugin(self.plugin, full, stdin)

    def add(self, c: Container, **conf: Any) -> dict[str, Any]:
        run = self.cni("ADD", c, self.conf(**conf))
        assert run.ok, run
        return run.json()

    def delete(self, c: Container, **conf: Any) -> None:
        run = self.cni("DEL", c, self.conf(**conf))
        assert run.ok and not run.stdout.strip(), run

    # --- observations ---------------------------------------------------------------------

    def host_veths(self) -> list[str]:
        out = run_ip("-o", "link", "show", netns=self.host_ns)
        names = [line.split(":")[1].strip().split("@")[0] for line in out.splitlines()]
        return [n for n in names if n.startswith(dataplane.HOST_VETH_PREFIX)]

    def host_routes(self) -> dict[IPNetwork, str]:
        return dataplane.list_host_routes(host_netns=self.host_netns_path)

    def records(self) -> list[Any]:
        return [parse_workload(r) for r in self.store.list("Workload").items]

    def ipam_check(self) -> CheckReport:
        return check(self.ipam, WorkloadRecordLiveness(self.store))

    def allocated(self) -> list[str]:
        return [str(ip) for blk in self.ipam.blocks() for ip, _, _ in blockmath.allocated(blk)]

    def assert_nothing_left(self) -> None:
        assert self.host_veths() == []
        assert self.host_routes() == {}
        assert self.allocated() == []
        assert self.records() == []
        report = self.ipam_check()
        assert report.clean, report.to_dict()

    # --- teardown -------------------------------------------------------------------------

    def close(self) -> None:
        for agent in self.agents:
            agent.kill()
        if self.namespaces:
            _ip_batch("".join(f"netns del {ns}\n" for ns in self.namespaces), check=False)
            self.namespaces.clear()
        self.store.close()


def _ip_batch(commands: str, check: bool = True) -> None:
    subprocess.run(
        ["ip", "-force", "-batch", "-"], input=commands, text=True, check=check, capture_output=True
    )


@contextlib.contextmanager
def node_harness(tmp: Path, **kwargs: Any) -> Iterator[NodeHarness]:
    node = NodeHarness(tmp, **kwargs)
    try:
        yield node
    finally:
        node.close()


# --- pytest fixtures (imported by the conftest of each test directory that needs them) ------


@pytest.fixture
def node(tmp_path: Path) -> Iterator[NodeHarness]:
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces")
    with node_harness(tmp_path) as harness:
        yield harness


@pytest.fixture
def agent(node: NodeHarness) -> Iterator[AgentProcess]:
    """A running agent; the test fails if it does not exit 0 on SIGTERM afterwards."""
    proc = node.start_agent()
    yield proc
    if proc.proc.poll() is None:
        status = proc.stop()
        assert status == 0, f"agent exited {status} on SIGTERM:\n{proc.log_text()}"
