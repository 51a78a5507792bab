"""bench/scale.py's machinery: two namespaces, a fleet of simulated nodes, the node under test.

Topology (names carry the prefix ``l3b-<pid>``): the namespace ``sim`` holds every simulated
node, one BIRD 2 process each with its own address on one veth (``local <addr>`` + ``strict
bind``: no namespace, bridge port or device scan per node); the namespace ``dut`` holds the
node under test (10.1.0.1/16) at the other end of that veth. Simulated node i is 10.1.0.0 +
16 + i and announces two /26 blocks of the pool, each from its own static protocol so that
one of them can be withdrawn with ``birdc disable``.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

from converge import RouteCounter, process_tree, role

REPO = Path(__file__).resolve().parents[1]
TAG = f"l3b-{os.getpid()}"
SIM, DUT = f"{TAG}-sim", f"{TAG}-dut"
DUT_IP = "10.1.0.1"
SUBNET = 16
ASN = 64512
POOL = IPv4Network("10.64.0.0/10")
BLOCK = 26
CLUSTER_ID = "244.0.0.1"
PROTO = {"l3fabric": 77, "bird": 12}
NOFILE = 65536
POLL = 0.2


def sh(*cmd: str) -> str:
    done = subprocess.run(cmd, text=True, capture_output=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"`{' '.join(cmd)}` failed: {done.stderr.strip()}")
    return done.stdout


def sim_ip(i: int) -> str:
    return str(IPv4Address(DUT_IP) + 15 + i)


def blocks(i: int) -> tuple[IPv4Network, IPv4Network]:
    base = int(POOL.network_address) + 2 * i * 64
    return IPv4Network((base, BLOCK)), IPv4Network((base + 64, BLOCK))


def _raise_nofile() -> None:
    # The node under test holds one socket per session (1000+); children inherit this. Up
    # to the hard limit: raising that needs CAP_SYS_RESOURCE, which a container may lack.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = NOFILE if hard == resource.RLIM_INFINITY else min(NOFILE, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))


def spawn(
    netns: str, argv: list[str], log: Path | None, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115
    try:
        return subprocess.Popen(
            ["ip", "netns", "exec", netns, *argv], stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
            preexec_fn=_raise_nofile, env=env,
        )  # fmt: skip
    finally:
        if log:
            out.close()  # type: ignore[union-attr]


def kill_tree(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process and, after 10 s, SIGKILL whatever of its tree is left."""
    tree = process_tree(proc.pid)
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
    for pid in [*tree, *process_tree(proc.pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def netns_pids(name: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


class Namespaces:
    """``sim`` and ``dut`` joined by a veth; `close` kills what runs there and deletes them."""

    def __init__(self) -> None:
        self.made: list[str] = []

    def open(self) -> None:
        for name in (SIM, DUT):
            sh("ip", "netns", "add", name)
            self.made.append(name)
            sh("ip", "-n", name, "link", "set", "lo", "up")
            for key, value in (
                ("net.core.somaxconn", "8192"),
                ("net.ipv4.tcp_max_syn_backlog", "8192"),
                # one neighbour entry per simulated node: the default gc_thresh3 is 1024
                ("net.ipv4.neigh.default.gc_thresh1", "4096"),
                ("net.ipv4.neigh.default.gc_thresh2", "8192"),
                ("net.ipv4.neigh.default.gc_thresh3", "16384"),
            ):
                subprocess.run(["ip", "netns", "exec", name, "sysctl", "-qw", f"{key}={value}"],
                               capture_output=True, check=False)  # fmt: skip
        sh("ip", "link", "add", "sim0", "netns", SIM, "type", "veth",
           "peer", "name", "dut0", "netns", DUT)  # fmt: skip
        sh("ip", "-n", DUT, "addr", "add", f"{DUT_IP}/{SUBNET}", "dev", "dut0")
        for ns, dev in ((SIM, "sim0"), (DUT, "dut0")):
            sh("ip", "-n", ns, "link", "set", dev, "up")

    def add_sim_addresses(self, count: int) -> None:
        have = set(sh("ip", "-n", SIM, "-4", "-o", "addr", "show", "dev", "sim0").split())
        batch = "".join(
            f"addr add {sim_ip(i)}/{SUBNET} dev sim0\n"
            for i in range(count)
            if f"{sim_ip(i)}/{SUBNET}" not in have
        )
        if batch:
            done = subprocess.run(["ip", "-n", SIM, "-batch", "-"], input=batch, text=True,
                                  capture_output=True)  # fmt: skip
            if done.returncode:
                raise SystemExit(f"ip addr add: {done.stderr.strip()}")

    def close(self) -> None:
        for name in self.made:
            for pid in netns_pids(name):  # only ever this bench's own daemons
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
        self.made = []


def sim_config(i: int, peers: Iterable[str], extra: str = "") -> str:
    """A simulated node: its two blocks (next hop self) to each of `peers`, no kernel."""
    a, b = blocks(i)
    sessions = "".join(
        f"protocol bgp p{n} from peer {{ neighbor {ip} as {ASN}; }}\n" for n, ip in enumerate(peers)
    )
    return f"""\
router id {sim_ip(i)};
protocol static own1 {{ ipv4; route {a} blackhole; }}
protocol static own2 {{ ipv4; route {b} blackhole; }}
template bgp peer {{
  local {sim_ip(i)} as {ASN};
  strict bind yes;
  connect delay time 1;
  connect retry time 1;
  error wait time 1, 5;
  ipv4 {{ import all; export where proto ~ "own*"; next hop self; }};
}}
{sessions}{extra}"""


@dataclass
class Fleet:
    """The simulated nodes' BIRDs, started by PID and stopped by PID."""

    tmp: Path
    procs: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)

    def ctl(self, i: int) -> Path:
        return self.tmp / f"s{i}.ctl"

    def start(self, count: int, peers: list[str], first_extra: str = "") -> None:
        """(Re)start nodes 0..count-1: fresh, so none keeps routes (graceful restart) of the
        node under test before. `first_extra`: more configuration for node 0."""
        self.stop()
        for i in range(count):
            conf = self.tmp / f"s{i}.conf"
            conf.write_text(sim_config(i, peers, first_extra if i == 0 else ""))
            self.ctl(i).unlink(missing_ok=True)
            argv = ["bird", "-f", "-c", str(conf), "-s", str(self.ctl(i)),
                    "-P", str(self.tmp / f"s{i}.pid")]  # fmt: skip
            self.procs[i] = spawn(SIM, argv, None)
        started = [self.ctl(i) for i in range(count)]
        wait_until("the simulated nodes' BIRDs", lambda: all(c.exists() for c in started), 120)

    def stop(self) -> None:
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        for proc in self.procs.values():
            proc.wait()
        self.procs = {}

    def birdc(self, i: int, *command: str) -> str:
        done = subprocess.run(["birdc", "-s", str(self.ctl(i)), *command], capture_output=True,
                              text=True, check=False)  # fmt: skip
        return done.stdout

    def route_count(self, i: int) -> int:
        """Routes in node i's table (`show route count`: "N of M routes for K networks")."""
        words = self.birdc(i, "show", "route", "count").split()
        with contextlib.suppress(ValueError, IndexError):
            return int(words[words.index("of") - 1])
        return -1

    def has(self, i: int, net: IPv4Network) -> bool:
        return str(net) in self.birdc(i, "show", "route", "for", str(net), "table", "master4")


def sample(count: int, size: int) -> list[int]:
    """Up to `size` nodes spread over 0..count-1, always with the last-started tenth."""
    if count <= size:
        return list(range(count))
    tail = list(range(count - size // 4, count))
    step = (count - len(tail)) / (size - len(tail))
    return sorted({int(k * step) for k in range(size - len(tail))} | set(tail))


def wait_until(what: str, check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(POLL)


class Accounting:
    """CPU seconds and peak RSS of a process tree (the node under test: agent, ExaBGP, relay,
    any BIRD the agent runs), walked afresh on every `poll`. CPU: every live process's own
    time plus that of the children it reaped (`exabgp validate`, an ExaBGP restarted), which
    the kernel adds to the reaper's cutime/cstime. RSS: the largest sum of the tree's
    current RSS seen by `poll`."""

    def __init__(self, root: int) -> None:
        self.root = root
        self.pids: set[int] = set()
        self.peak = 0

    def poll(self) -> list[int]:
        tree = process_tree(self.root)
        self.pids.update(tree)
        self.peak = max(self.peak, sum(_status_kib(pid, "VmRSS:") * 1024 for pid in tree))
        return tree

    def rss_by_role(self) -> dict[str, int]:
        """Current RSS per process role (agent, ExaBGP, relay, bird, ...)."""
        out: dict[str, int] = {}
        for pid in self.poll():
            who = role(pid)
            out[who] = out.get(who, 0) + _status_kib(pid, "VmRSS:") * 1024
        return out

    def cpu_total(self) -> float:
        return sum(_cpu_with_reaped(pid) for pid in self.poll())

    def idle(self, window: float) -> float:
        """CPUs' worth of time the tree used over the next `window` seconds."""
        before = self.cpu_total()
        time.sleep(window)
        return (self.cpu_total() - before) / window


def _cpu_with_reaped(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def _status_kib(pid: int, key: str) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
    return 0


def kernel_counter() -> RouteCounter:
    return RouteCounter(DUT)


def python() -> str:
    return sys.executable
