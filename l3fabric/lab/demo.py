"""`l3fabric demo`: a three-node BGP fabric in network namespaces, proven end to end.

As root, in a throwaway directory with its own embedded (sqlite) store, the demo

1. brings up the `mesh3` topology (three l3fabric nodes on one bridge, full iBGP mesh) with
   `l3fabric.lab.realise.bring_up` — the same code as `l3fabric lab up`;
2. starts two pods per node through the real CNI path (`lab.pods.attach_pod` runs the
   installed `l3fabric-cni` inside the node's namespace against the node's agent);
3. shows progress while the fabric converges: every node's agent reports both of its
   sessions established (6 session ends) and every node's kernel holds a route to every
   block affine to another node;
4. pings every pod from every pod (6 x 6, concurrently) and prints the matrix;
5. prints `node status` of one node, `ipam show --show-blocks` and `ipam check` with the
   CLI's renderers;
6. tears everything down — always: in `finally`, also on Ctrl-C or SIGTERM.

It exits 0 only when every pod reached every pod (and the fabric converged and `ipam check`
came out clean). `--keep` leaves the lab up at the end (for a look around) and prints the
`lab down` command that removes it; an interrupt still tears down.

The topology is embedded here (`MESH3_CLAB_YML`) rather than read from
tests/topologies/mesh3.clab.yml: `tests/` is not part of the installed package, so an installed
`l3fabric demo` run from any directory could not find the file, and a string in a module needs
no package-data configuration. tests/lab/test_demo.py asserts the two are identical. The demo
gives the lab a name of its own (`l3demo<pid>`), so it never collides with a `mesh3` lab that
is up, nor with another demo.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

from ipam_blocks.errors import L3FabricError
from l3fabric.console import EXIT_FAILED, EXIT_INVALID, EXIT_OK, make_console

EXIT_INTERRUPTED = 130  # what `l3fabric.cli.main` returns on Ctrl-C

# Byte for byte tests/topologies/mesh3.clab.yml (tests/lab/test_demo.py checks it).
MESH3_CLAB_YML = """\
# Three l3fabric nodes on one L2 segment, for `l3fabric lab up` and for real containerlab.
#
# `sw` is a `kind: bridge` node: containerlab expects a host bridge of that name to exist
# (`ip link add sw type bridge`); `l3fabric lab up` creates it in a namespace of its own.
# Nodes carry no management network (network-mode: none), exactly as `lab up` realises them,
# so the fabric link eth1 is every node's only link, and no node has a default route (pods
# reach their gateway 169.254.1.1 through a permanent neighbour entry, not proxy ARP).
# The `l3fabric.io/*` labels are the node's l3fabric settings; other labels (rack) become
# labels of its Node record.
name: mesh3

topology:
  kinds:
    linux:
      image: ghcr.io/l3fabric/l3fabric:latest
      network-mode: none
  nodes:
    sw:
      kind: bridge
    n1:
      kind: linux
      labels:
        l3fabric.io/ipv4: 10.0.0.11/24
        l3fabric.io/asn: 64512
        rack: r1
      exec:
        - ip addr add 10.0.0.11/24 dev eth1
    n2:
      kind: linux
      labels:
        l3fabric.io/ipv4: 10.0.0.12/24
        l3fabric.io/asn: 64512
        rack: r1
      exec:
        - ip addr add 10.0.0.12/24 dev eth1
    n3:
      kind: linux
      labels:
        l3fabric.io/ipv4: 10.0.0.13/24
        l3fabric.io/asn: 64512
        rack: r2
      exec:
        - ip addr add 10.0.0.13/24 dev eth1
  links:
    - endpoints: ["n1:eth1", "sw:eth1"]
    - endpoints: ["n2:eth1", "sw:eth2"]
    - endpoints: ["n3:eth1", "sw:eth3"]
"""

NAMESPACE = "demo"
PODS: dict[str, tuple[str, ...]] = {
    "n1": ("web-0", "web-1"),
    "n2": ("api-0", "api-1"),
    "n3": ("db-0", "db-1"),
}
STATUS_NODE = "n1"
CONVERGE_TIMEOUT = 60.0
POLL_INTERVAL = 0.1
PING_TIMEOUT = 2  # seconds per echo; a pair gets two tries
REACHABLE, UNREACHABLE = "✓", "✗"


class _Interrupted(BaseException):
    """SIGTERM, turned into an exception so that `finally` tears the lab down."""


@dataclass
class _Demo:
    console: Console
    workdir: Path
    lab: str = field(init=False)
    state_dir: Path = field(init=False)
    topology_file: Path = field(init=False)
    pods: dict[str, tuple[str, str]] = field(default_factory=dict)  # pod -> (node, address)

    def __post_init__(self) -> None:
        self.lab = f"l3demo{os.getpid()}"
        self.state_dir = self.workdir / "lab"
        self.topology_file = self.workdir / f"{self.lab}.clab.yml"


# --- entry point -------------------------------------------------------------------------------


def run_demo(keep: bool = False) -> int:
    """Run the fabric demo; 0 when every pod reached every pod (see the module docstring)."""
    if os.geteuid() != 0:
        print("error: l3fabric demo needs root (it creates network namespaces): "
              "run it as root or with sudo", file=sys.stderr)  # fmt: skip
        return EXIT_INVALID
    missing = [t for t in ("ip", "ping") if shutil.which(t) is None]
    if missing:
        print(f"error: l3fabric demo needs {' and '.join(missing)} "
              "(Debian: iproute2, iputils-ping; ./scripts/setup.sh installs them)",
              file=sys.stderr)  # fmt: skip
        return EXIT_FAILED
    started = time.monotonic()
    demo = _Demo(make_console(), Path(tempfile.mkdtemp(prefix="l3fabric-demo-")))
    code = EXIT_FAILED
    interrupted = False
    with _sigterm_raises():
        try:
            code = _script(demo)
        except (KeyboardInterrupt, _Interrupted):
            interrupted = True
            code = EXIT_INTERRUPTED
            demo.console.print("\ninterrupted: tearing the lab down")
        except L3FabricError as err:
            demo.console.print(f"demo failed: {err}")
            code = EXIT_FAILED
        finally:
            if keep and not interrupted:
                _print_kept(demo)
            else:
                code = _teardown(demo, code)
    verdicts = {EXIT_OK: "passed: every pod reached every pod", EXIT_INTERRUPTED: "interrupted"}
    verdict = verdicts.get(code, "FAILED")
    demo.console.print(f"\ndemo {verdict}; it took {time.monotonic() - started:.1f} s")
    return code


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_interrupted(signum: int, frame: Any) -> None:
        raise _Interrupted()

    previous = signal.signal(signal.SIGTERM, raise_interrupted)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _uninterruptible() -> Iterator[None]:
    """Teardown must finish: a second Ctrl-C (or SIGTERM) would leave namespaces behind."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _teardown(demo: _Demo, code: int) -> int:
    from l3fabric.lab.realise import tear_down
    from l3fabric.lab.state import StateFile

    with _uninterruptible():
        try:
            if StateFile(demo.state_dir).exists():
                with demo.console.status("tearing the lab down"):
                    tear_down(demo.state_dir)
                demo.console.print(f"lab {demo.lab} is down: namespaces, agents, pods and "
                                   "store removed")  # fmt: skip
        except L3FabricError as err:
            demo.console.print(f"teardown failed: {err}\n"
                               f"state kept in {demo.state_dir}: `l3fabric lab down "
                               f"{demo.topology_file} --state-dir {demo.state_dir}`")  # fmt: skip
            return EXIT_FAILED
        shutil.rmtree(demo.workdir, ignore_errors=True)
    return code


def _print_kept(demo: _Demo) -> None:
    demo.console.print(
        f"\nkept (--keep): lab {demo.lab} is still up. Look around with\n"
        f"  l3fabric lab status {demo.topology_file} --state-dir {demo.state_dir}\n"
        f"  l3fabric lab pod exec web-0 --state-dir {demo.state_dir} -- ip route\n"
        f"and remove it with\n"
        f"  l3fabric lab down {demo.topology_file} --state-dir {demo.state_dir}"
    )


# --- the script --------------------------------------------------------------------------------


def _script(demo: _Demo) -> int:
    from l3fabric.lab.realise import bring_up
    from l3fabric.lab.topology import parse_topology_yaml

    text, replaced = re.subn(r"(?m)^name: mesh3$", f"name: {demo.lab}", MESH3_CLAB_YML)
    assert replaced == 1
    demo.topology_file.write_text(text)
    topology = parse_topology_yaml(text, demo.workdir)
    console = demo.console
    console.print(
        f"l3fabric demo: lab {demo.lab}, the mesh3 topology — 3 nodes in network namespaces, "
        "each running an l3fabric agent (ExaBGP + RIB + FIB), full iBGP mesh, 2 pods per node\n"
        f"lab state and embedded store: {demo.workdir}"
    )
    with _progress(console) as progress:
        task = progress.add_task("lab up: namespaces, bridge, links, agents", total=None)
        bring_up(topology, demo.topology_file, demo.state_dir)
        progress.update(task, total=1, completed=1)

        _attach_pods(demo, progress)
        converged = _converge(demo, progress)

        matrix_task = progress.add_task("pod-to-pod pings", total=len(demo.pods) ** 2)
        matrix = _ping_matrix(demo, lambda: progress.advance(matrix_task))
    if not converged:
        console.print(f"the fabric did not converge in {CONVERGE_TIMEOUT:g} s (see above)")
    console.print(_render_matrix(demo, matrix))
    clean = _show_status(demo)
    reachable = sum(matrix.values())
    console.print(f"\n{reachable}/{len(matrix)} pod pairs reachable")
    return EXIT_OK if reachable == len(matrix) and converged and clean else EXIT_FAILED


def _progress(console: Console) -> Progress:
    return Progress(
        SpinnerColumn(finished_text=Text("✓")),
        TextColumn("{task.description}"),
        BarColumn(bar_width=20),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )


def _attach_pods(demo: _Demo, progress: Progress) -> None:
    from l3fabric.lab.pods import attach_pod
    from l3fabric.lab.state import StateFile

    total = sum(map(len, PODS.values()))
    task = progress.add_task("pods attached through l3fabric-cni", total=total)
    journal = StateFile(demo.state_dir)
    for node, names in PODS.items():
        for name in names:
            pod = attach_pod(journal, node, name, NAMESPACE)
            assert pod.address is not None
            demo.pods[name] = (node, pod.address)
            progress.advance(task)


# --- convergence -------------------------------------------------------------------------------


@dataclass
class _Convergence:
    sessions_up: int = 0
    sessions_wanted: int = 0
    routes_in: int = 0
    routes_wanted: int = 0
    missing: list[str] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.sessions_up == self.sessions_wanted and self.routes_in == self.routes_wanted


def _converge(demo: _Demo, progress: Progress) -> bool:
    """Poll until every session is established and every remote block is routed everywhere;
    False (after printing what is missing) if that takes longer than CONVERGE_TIMEOUT."""
    remote = _remote_blocks(demo)
    sessions = progress.add_task("BGP sessions established", total=None)
    routes = progress.add_task("remote block routes in the kernels", total=None)
    deadline = time.monotonic() + CONVERGE_TIMEOUT
    while True:
        seen = _look(demo, remote)
        progress.update(sessions, total=seen.sessions_wanted, completed=seen.sessions_up)
        progress.update(routes, total=seen.routes_wanted, completed=seen.routes_in)
        if seen.done:
            return True
        if time.monotonic() > deadline:
            progress.console.print("not converged:\n  " + "\n  ".join(seen.missing))
            return False
        time.sleep(POLL_INTERVAL)


def _remote_blocks(demo: _Demo) -> dict[str, set[IPv4Network]]:
    """Per node, the blocks (affine to other nodes) its kernel must route: from the store,
    where the CNI ADDs claimed them."""
    from ipam_blocks.allocator import IPAM
    from ipam_blocks.store import open_store
    from l3fabric.lab.layout import LabPaths

    store = open_store(LabPaths(demo.state_dir).store_url)
    try:
        blocks = IPAM(store).blocks()
    finally:
        store.close()
    nodes = list(PODS)
    return {
        node: {
            IPv4Network(str(b.cidr))
            for b in blocks
            if b.affinity and b.affinity != node and b.cidr.version == 4
        }
        for node in nodes
    }


def _look(demo: _Demo, remote: dict[str, set[IPv4Network]]) -> _Convergence:
    from bgp_speaker.kernel.fib import Fib, FibError

    seen = _Convergence()
    peers_each = len(PODS) - 1  # full mesh
    for node, wanted in remote.items():
        seen.sessions_wanted += peers_each
        seen.routes_wanted += len(wanted)
        status = _node_status(demo, node)
        up = [p["address"] for p in (status or {}).get("peers", [])
              if p["state"] == "established"]  # fmt: skip
        seen.sessions_up += min(len(up), peers_each)
        if len(up) < peers_each:
            seen.missing.append(f"{node}: {len(up)}/{peers_each} sessions established")
        try:
            with Fib(f"{demo.lab}-{node}") as fib:
                installed = fib.dump()
        except FibError as err:
            seen.missing.append(f"{node}: cannot read its routes: {err}")
            continue
        routed = {p for p in wanted if p in installed and not installed[p].blackhole}
        seen.routes_in += len(routed)
        if routed != wanted:
            absent = ", ".join(sorted(map(str, wanted - routed)))
            seen.missing.append(f"{node}: no route to {absent}")
    return seen


def _node_status(demo: _Demo, node: str) -> dict[str, Any] | None:
    from cni.errors import CniError
    from cni.protocol import AgentUnreachable, call
    from l3fabric.lab.layout import LabPaths

    socket = LabPaths(demo.state_dir).node(node).agent_socket
    try:
        status: dict[str, Any] = call(str(socket), "node.status", {}, timeout=5)
        return status
    except (AgentUnreachable, CniError):
        return None


# --- pings -------------------------------------------------------------------------------------


def _ping_matrix(demo: _Demo, tick: Callable[[], None]) -> dict[tuple[str, str], bool]:
    """Every pod pings every pod (itself too), all at once; a pair gets a second try."""
    from l3fabric.lab import host

    def ping(pair: tuple[str, str]) -> bool:
        source, target = pair
        argv = host.in_netns(
            f"{demo.lab}-{source}",
            ["ping", "-n", "-q", "-c", "1", "-W", str(PING_TIMEOUT), demo.pods[target][1]],
        )
        try:
            for _ in range(2):
                done = subprocess.run(argv, capture_output=True, timeout=PING_TIMEOUT + 5,
                                      check=False)  # fmt: skip
                if done.returncode == 0:
                    return True
            return False
        except subprocess.TimeoutExpired:
            return False
        finally:
            tick()

    pairs = [(a, b) for a in demo.pods for b in demo.pods]
    with ThreadPoolExecutor(max_workers=len(pairs)) as pool:
        return dict(zip(pairs, pool.map(ping, pairs), strict=True))


def _render_matrix(demo: _Demo, matrix: dict[tuple[str, str], bool]) -> Table:
    table = Table(title="ping matrix: row pings column (ICMP echo, pod to pod)",
                  title_justify="left")  # fmt: skip
    table.add_column("FROM \\ TO", no_wrap=True)
    for pod, (node, address) in demo.pods.items():
        table.add_column(f"{pod}\n{node}\n{address}", justify="center", no_wrap=True)
    for source, (node, _) in demo.pods.items():
        cells = [REACHABLE if matrix[(source, target)] else UNREACHABLE for target in demo.pods]
        table.add_row(f"{source} ({node})", *cells)
    return table


# --- what the CLI shows --------------------------------------------------------------------------


def _show_status(demo: _Demo) -> bool:
    """`node status` of one node, `ipam show --show-blocks` and `ipam check`; whether the
    check came out clean."""
    from ipam_blocks.allocator import IPAM
    from ipam_blocks.check import check
    from ipam_blocks.store import open_store
    from l3fabric.lab.layout import LabPaths
    from l3fabric.views.ipam import render_block_usage, render_check_report, render_pool_usage
    from l3fabric.views.node_status import render_node_status

    paths = LabPaths(demo.state_dir)
    console = demo.console
    socket = paths.node(STATUS_NODE).agent_socket
    console.print(f"\n$ l3fabric node status --socket {socket}")
    status = _node_status(demo, STATUS_NODE)
    console.print(render_node_status(status) if status else "(the agent does not answer)")
    console.print(f"\n$ l3fabric ipam show --show-blocks --store {paths.store_url}")
    store = open_store(paths.store_url)
    try:
        ipam = IPAM(store)
        pools, blocks = ipam.pools(), ipam.blocks()
        report = check(ipam, store.owner_liveness())
    finally:
        store.close()
    console.print(render_pool_usage(pools, blocks))
    console.print(render_block_usage(pools, blocks))
    console.print(f"\n$ l3fabric ipam check --store {paths.store_url}")
    for line in render_check_report(report):
        console.print(line)
    return report.clean
