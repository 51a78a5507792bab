"""Control-plane cost of one agent at cluster scale (issue 14), today's code against the old.

The Kubernetes API double (tests/kube_api_double.py) holds N Nodes, 2 blocks per node with
10 allocations each, their confirmed affinities, a pool and two BGPPeers. One agent's routing
(the real `RoutingController`, with the fake speaker, FIB and reflector of
tests/reflection/doubles.py) runs in a process of its own with a token of its own, so the
double counts its requests and bytes and the process's CPU is the agent's alone. The old code
(the StoreWatcher + read_desired path, before the caches) is unpacked from a git commit with
`git archive` and run the same way, in the same run.

Measured per agent:
- startup: requests, bytes and seconds to the first reconcile;
- a pod allocated on another node: requests, bytes and CPU ms (mean of several);
- idle: bytes per second over IDLE seconds;
- a node joining (its Node, then its block and affinity): requests, CPU ms, and the time until
  its session is in the speaker;
- an API server restart (`drop_watches(expire=True)`): lists per kind afterwards;
- RSS after the first reconcile, less the same agent's RSS on an empty cluster.

    flock /tmp/l3fabric-timing.lock python3 bench/controlplane.py [--nodes 1000] [--old ede3c87]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

START = "<!-- bench/controlplane.py: start -->"
END = "<!-- bench/controlplane.py: end -->"
ME = "n0000"  # the measured agent's node
PODS_PER_BLOCK = 10
ALLOCATIONS = 5  # pod allocations on other nodes measured, per agent
IDLE = 60.0
SETTLE = 1.5  # after a change: longer than any agent's reconcile at 1000 nodes
KINDS = ("nodes", "bgpconfigurations", "bgppeers", "ippools", "ipamblocks", "blockaffinities",
         "ipamhandles")  # fmt: skip


# --- the agent process -----------------------------------------------------------------------


def agent_main(kubeconfig: str) -> None:
    """Runs in the agent's process (old or new code on sys.path): routing of node ME, driven
    by commands on stdin, answering one JSON line each on stdout."""
    from bgp_speaker.routing.controller import RoutingController
    from ipam_blocks.store.kube import KubeStore
    from tests.reflection.doubles import FakeFib, FakeReflector, FakeSpeaker

    async def run() -> None:
        store = KubeStore(kubeconfig)
        speaker = FakeSpeaker()
        controller = RoutingController(ME, store, speaker, FakeFib(), FakeReflector())
        stop = asyncio.Event()
        started = time.monotonic()
        task = asyncio.create_task(controller.run(stop))
        while not any(c[0] == "sessions" for c in speaker.calls):
            await asyncio.sleep(0.005)
        reply({"ready": time.monotonic() - started, **usage(controller)})
        loop = asyncio.get_running_loop()
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            command, *args = line.split() or ["quit"]
            if command == "usage":
                reply(usage(controller))
            elif command == "wait_peer":
                since = time.monotonic()
                while args[0] not in {str(s.peer_ip) for s in speaker.sessions}:
                    await asyncio.sleep(0.002)
                reply({"seconds": time.monotonic() - since, **usage(controller)})
            else:
                break
        stop.set()
        await task

    asyncio.run(run())


def usage(controller: Any) -> dict[str, Any]:
    """The process's CPU and RSS; with the caches (new code), the changes they handled."""
    rss_kib = next(
        int(line.split()[1])
        for line in Path("/proc/self/status").read_text().splitlines()
        if line.startswith("VmRSS:")
    )
    caches = getattr(controller, "caches", None)
    events = None if caches is None else sum(i.events for i in caches.informers.values())
    return {
        "cpu": time.process_time(),
        "wall": time.monotonic(),
        "rss_mib": rss_kib / 1024,
        "events": events,
    }


def reply(obj: dict[str, Any]) -> None:
    print(json.dumps(obj), flush=True)


# --- the cluster -----------------------------------------------------------------------------


def populate(store: Any, nodes: int) -> None:
    from netaddr import IPNetwork

    from ipam_blocks import block as blockmath
    from ipam_blocks.model import (
        AffinityState,
        Attribute,
        BlockAffinity,
        IPPool,
        Node,
        render_affinity,
        render_block,
        render_node,
        render_pool,
    )
    from ipam_blocks.store.base import Resource

    pool = IPPool("default", IPNetwork("10.128.0.0/12"), 26)
    store.create(render_pool(pool))
    for i, peer_ip in enumerate(("192.0.2.254", "192.0.2.253")):
        store.create(Resource("BGPPeer", f"tor{i}", {"peerIP": peer_ip, "asNumber": 65001}))
    blocks = list(pool.cidr.subnet(26))

    def node_objects(i: int) -> None:
        name = f"n{i:04d}"
        address = f"10.{i // 250}.{i % 250}.1/16"
        store.create(render_node(Node(name, {}, IPNetwork(address))))
        for b in range(2):
            cidr = blocks[2 * i + b]
            blk = blockmath.new_block(cidr, name)
            for p in range(PODS_PER_BLOCK):
                attr = Attribute(f"net.{name}-{b}-{p}", f"pod{p}", "default", name)
                blk, _ = blockmath.assign(blk, 1, attr)
            store.create(render_block(blk))
            store.create(render_affinity(BlockAffinity(name, cidr, AffinityState.CONFIRMED)))

    with ThreadPoolExecutor(8) as pool_:
        list(pool_.map(node_objects, range(nodes)))


def allocate_on(store: Any, node: str, pod: str) -> None:
    from ipam_blocks.allocator import IPAM, AssignRequest

    IPAM(store).auto_assign(AssignRequest(node, f"bench.{pod}", pod=pod, namespace="default"))


def join_node(store: Any, index: int) -> str:
    """A new node: its Node, then a pod on it (its block claimed, the affinity confirmed)."""
    from netaddr import IPNetwork

    from ipam_blocks.model import Node, render_node

    name = f"n{index:04d}"
    store.create(render_node(Node(name, {}, IPNetwork(f"10.{index // 250}.{index % 250}.1/16"))))
    allocate_on(store, name, f"{name}-first")
    return f"10.{index // 250}.{index % 250}.1"


# --- one agent, measured ---------------------------------------------------------------------


class AgentProcess:
    def __init__(self, code_root: Path, kubeconfig: Path) -> None:
        env = {**os.environ, "PYTHONPATH": str(code_root)}
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "agent", str(kubeconfig)],
            cwd=code_root, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip

    def read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the agent process died")
        return json.loads(line)

    def ask(self, command: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def agent_kubeconfig(api: Any, token: str, directory: Path) -> Path:
    import yaml

    api.add_token(token)
    config = yaml.safe_load(api.kubeconfig.read_text())
    config["users"][0]["user"]["token"] = token
    path = directory / f"{token}.kubeconfig"
    path.write_text(yaml.safe_dump(config))
    return path


def traffic(api: Any, token: str) -> tuple[int, int]:
    return len(api.requests_of(token)), api.bytes_sent(token)


def measure(variant: str, code_root: Path, api: Any, admin: Any, tmp: Path, join_index: int,
            idle: float) -> dict[str, Any]:  # fmt: skip
    token = f"l3e-bench-{variant}"
    agent = AgentProcess(code_root, agent_kubeconfig(api, token, tmp))
    out: dict[str, Any] = {}
    try:
        ready = agent.read()
        requests, sent = traffic(api, token)
        out["startup"] = {"seconds": ready["ready"], "requests": requests, "bytes": sent,
                          "cpu_ms": ready["cpu"] * 1000}  # fmt: skip
        out["rss_mib"] = ready["rss_mib"]
        # Idle first: its CPU rate is the background the changes below are measured over.
        before_idle, at = traffic(api, token), agent.ask("usage")
        time.sleep(idle)
        after_idle, at2 = traffic(api, token), agent.ask("usage")
        idle_cpu_rate = (at2["cpu"] - at["cpu"]) / (at2["wall"] - at["wall"])
        out["idle"] = {
            "bytes_per_s": (after_idle[1] - before_idle[1]) / idle,
            "requests": after_idle[0] - before_idle[0],
            "cpu_ms_per_s": idle_cpu_rate * 1000,
        }

        def cpu_ms(a: dict[str, float], b: dict[str, float]) -> float:
            """CPU over the window, less the idle rate over it."""
            return ((b["cpu"] - a["cpu"]) - idle_cpu_rate * (b["wall"] - a["wall"])) * 1000

        # Pods on other nodes.
        cpu, samples, events = [], [], []
        for k in range(ALLOCATIONS):
            before, at = traffic(api, token), agent.ask("usage")
            allocate_on(admin, f"n{1 + k % (join_index - 1):04d}", f"{variant}-{k}")  # not ME
            time.sleep(SETTLE)
            after, at2 = traffic(api, token), agent.ask("usage")
            cpu.append(cpu_ms(at, at2))
            if at["events"] is not None:
                events.append(at2["events"] - at["events"])
            samples.append((after[0] - before[0], after[1] - before[1]))
        out["allocation"] = {
            "requests": sum(s[0] for s in samples) / len(samples),
            "bytes": sum(s[1] for s in samples) / len(samples),
            "cpu_ms": sum(cpu) / len(cpu),
            "events": sum(events) / len(events) if events else None,
        }
        # A node joins.
        before, at = traffic(api, token), agent.ask("usage")
        waiting: dict[str, Any] = {}
        address = f"10.{join_index // 250}.{join_index % 250}.1"
        waiter = threading.Thread(target=lambda: waiting.update(agent.ask(f"wait_peer {address}")))
        waiter.start()
        join_node(admin, join_index)
        waiter.join(60)
        time.sleep(SETTLE)
        after, at2 = traffic(api, token), agent.ask("usage")
        out["join"] = {
            "requests": after[0] - before[0],
            "bytes": after[1] - before[1],
            "cpu_ms": cpu_ms(at, at2),
            "events": None if at["events"] is None else at2["events"] - at["events"],
            "session_after_s": waiting.get("seconds"),
        }
        # The API server restarts with an empty watch cache.
        mark = len(api.requests_of(token))
        api.drop_watches(expire=True)
        time.sleep(3.0)
        lists: Counter[str] = Counter()
        for r in api.requests_of(token)[mark:]:
            plural = next((k for k in KINDS if f"/{k}" in r.path), None)
            first_page = "continue" not in r.query
            listed = r.query.get("watch") != "true" and not _named(r) and first_page
            if r.method == "GET" and plural and listed:
                lists[plural] += 1
        out["restart_lists"] = dict(lists)
    finally:
        agent.close()
    return out


def _named(request: Any) -> bool:
    """A GET of one object by name (not a list)."""
    parts = [p for p in request.path.split("/") if p]
    return parts[-1] not in KINDS


def empty_rss(code_root: Path, tmp: Path) -> float:
    """The agent's RSS on a cluster of its own node only."""
    from ipam_blocks.store.kube import KubeStore
    from tests.kube_api_double import KubeApiDouble

    with KubeApiDouble() as api:
        admin = KubeStore(str(api.kubeconfig))
        try:
            populate(admin, 1)
            agent = AgentProcess(code_root, agent_kubeconfig(api, "l3e-empty", tmp))
            try:
                return float(agent.read()["rss_mib"])
            finally:
                agent.close()
        finally:
            admin.close()


# --- the run ---------------------------------------------------------------------------------


def unpack(commit: str, into: Path) -> Path:
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit], check=True,
                             capture_output=True).stdout  # fmt: skip
    tar_path = into / "old.tar"
    tar_path.write_bytes(archive)
    with tarfile.open(tar_path) as tar:
        tar.extractall(into / "old", filter="data")
    return into / "old"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--old", default="ede3c87", help="commit of the old code (or 'none')")
    parser.add_argument("--idle", type=float, default=IDLE, help="seconds of idle measured")
    parser.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")
    args = parser.parse_args(argv)

    from bench.results import load_average, replace_section
    from ipam_blocks.store.kube import KubeStore
    from tests.kube_api_double import KubeApiDouble

    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="l3e-controlplane-") as tmp_text:
        tmp = Path(tmp_text)
        variants = {"new": ROOT}
        if args.old != "none":
            variants = {"old": unpack(args.old, tmp), **variants}
        with KubeApiDouble() as api:
            admin = KubeStore(str(api.kubeconfig))
            try:
                began = time.monotonic()
                populate(admin, args.nodes)
                print(f"populated {args.nodes} nodes in {time.monotonic() - began:.1f}s",
                      file=sys.stderr)  # fmt: skip
                for i, (variant, root) in enumerate(variants.items()):
                    print(f"measuring {variant}", file=sys.stderr)
                    results[variant] = measure(variant, root, api, admin, tmp, args.nodes + i,
                                               args.idle)  # fmt: skip
            finally:
                admin.close()
        for variant, root in variants.items():
            results[variant]["rss_over_empty_mib"] = results[variant]["rss_mib"] - empty_rss(
                root, tmp
            )
    text = render(results, args)
    print(text)
    if not args.no_write:
        replace_section(START, END, text.replace("{load}", load_average()))
    return 0


def render(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> str:
    def fmt_bytes(n: float) -> str:
        return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} KB"

    rows = [
        ("startup: requests", lambda r: f"{r['startup']['requests']}"),
        ("startup: bytes", lambda r: fmt_bytes(r["startup"]["bytes"])),
        ("startup: seconds to first reconcile", lambda r: f"{r['startup']['seconds']:.2f}"),
        ("pod on another node: requests", lambda r: f"{r['allocation']['requests']:.1f}"),
        ("pod on another node: bytes", lambda r: fmt_bytes(r["allocation"]["bytes"])),
        ("pod on another node: CPU ms", lambda r: f"{r['allocation']['cpu_ms']:.1f}"),
        ("pod on another node: changes in the caches", lambda r: _count(r["allocation"]["events"])),
        (f"idle {args.idle:.0f} s: bytes/s", lambda r: f"{r['idle']['bytes_per_s']:.0f}"),
        (f"idle {args.idle:.0f} s: requests", lambda r: f"{r['idle']['requests']}"),
        ("idle: CPU ms per s", lambda r: f"{r['idle']['cpu_ms_per_s']:.2f}"),
        ("node joining: requests", lambda r: f"{r['join']['requests']}"),
        ("node joining: CPU ms", lambda r: f"{r['join']['cpu_ms']:.1f}"),
        ("node joining: changes in the caches", lambda r: _count(r["join"]["events"])),
        ("node joining: s until its session", lambda r: _seconds(r["join"]["session_after_s"])),
        ("API restart: lists per kind (first pages)", lambda r: _lists(r["restart_lists"])),
        ("RSS over an empty cluster, MiB", lambda r: f"{r['rss_over_empty_mib']:.1f}"),
    ]
    variants = list(results)
    lines = [
        START,
        f"## Control plane at {args.nodes} nodes, one agent (`bench/controlplane.py`)",
        "",
        "    flock /tmp/l3fabric-timing.lock python3 bench/controlplane.py "
        f"--nodes {args.nodes} --old {args.old} --idle {args.idle:.0f}",
        "",
        f"The Kubernetes API double with {args.nodes} Nodes, 2 blocks each with "
        f"{PODS_PER_BLOCK} allocations, their affinities, a pool and 2 BGPPeers; one agent's "
        "routing (real RoutingController, fake speaker/FIB/reflector) in its own process with "
        "its own token. `old`: the code at "
        f"{args.old} (StoreWatcher + read_desired); `new`: the informer caches. CPU: the agent "
        "process's over the change and the SETTLE after it, less its idle CPU rate over the "
        "same time (the idle rate is mostly the kernel sync polling for End-of-RIBs that the fake "
        f"speaker never brings); pod allocation: mean of {ALLOCATIONS}. Lists of 1000+ objects "
        "come in pages of 500: a relist is its first page. A CPU figure where no change reached "
        "the caches is the noise of that background rate: the agent did nothing. Load average "
        "at the end: {load}.",
        "",
        "| | " + " | ".join(variants) + (" | old/new |" if len(variants) == 2 else " |"),
        "|---|" + "---:|" * (len(variants) + (1 if len(variants) == 2 else 0)),
    ]
    for label, cell in rows:
        cells = [cell(results[v]) for v in variants]
        ratio = ""
        if len(variants) == 2:
            ratio = " | " + _ratio(cells[0], cells[1])
        lines.append(f"| {label} | " + " | ".join(cells) + ratio + " |")
    lines += ["", END]
    return "\n".join(lines)


def _count(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def _seconds(value: float | None) -> str:
    return "never" if value is None else f"{value:.3f}"


def _lists(lists: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(lists.items())) or "none"


def _ratio(old: str, new: str) -> str:
    def number(text: str) -> float | None:
        parts = text.split()
        try:
            value = float(parts[0])
        except (ValueError, IndexError):
            return None
        scale = {"MB": 1e6, "KB": 1e3}.get(parts[1], 1) if len(parts) > 1 else 1
        return value * scale

    a, b = number(old), number(new)
    if a is None or b is None or a < 0 or b < 0:
        return "-"
    if b == 0:
        return "∞" if a else "="
    return f"{a / b:.0f}x" if a / b >= 10 else f"{a / b:.1f}x"


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "agent":
        agent_main(sys.argv[2])  # the code under test comes from PYTHONPATH
    else:
        sys.path.insert(0, str(ROOT))
        sys.exit(main())
