"""Failover and graceful restart on a real fabric: how fast a dead node's routes go, and how
many packets an agent restart costs. One run.

    sudo python bench/failover.py [--runs 5] [--restarts 3] [--no-write]

The shipped two-subnets topology (tests/topologies/two-subnets.clab.yml) with the VXLAN
fallback (CrossSubnet): n1, n2 on one subnet, n3 behind a plain router; one pod per node.

- Graceful restart (default settings, restart time 120 s): three pings at 10/s (n1's pod to
  n3's pod across the router, to n2's pod beside it, and n3's pod to n2's) while n1's agent
  is restarted `--restarts` times; reported: packets lost.
- Failover (BGPConfiguration holdTime 3, keepaliveTime 1, gracefulRestartTime 0): n3 dies
  — its uplink goes down first (a power cut: not even a FIN leaves), then every process in
  its namespace is killed — and the time until n3's block is gone from the kernels of both
  n1 and n2 is measured (polled every 20 ms). n3 is then brought back (link up, agent
  started again with the command line `lab up` recorded) before the next run. Reported:
  each run and the median, against DESIGN §9's target of hold time + 1 s.

Results replace the `failover` section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from results import replace_section  # noqa: E402

from bgp_speaker.overlay.encap import VXLAN_DEVICE  # noqa: E402
from ipam_blocks.store.base import Resource  # noqa: E402
from l3fabric.lab import host  # noqa: E402
from tests.encap.overlay_lab import (  # noqa: E402
    CONVERGE,
    NODES,
    OverlayFabric,
    two_subnets_document,
)
from tests.fabric.harness import eventually, running_lab  # noqa: E402
from tests.failover.test_failover import Pinger  # noqa: E402

RESULTS = REPO / "bench" / "RESULTS.md"
START, END = "<!-- failover:start -->", "<!-- failover:end -->"
HOLD = 3


def restart_losses(net: OverlayFabric, restarts: int) -> tuple[dict[str, tuple[int, int]], float]:
    """(per ping: sent, answered), seconds the restarts took."""
    pods = {name: address for name, (_node, address) in net.pods.items()}
    pingers = [Pinger(net, "a1", pods["b1"]), Pinger(net, "a1", pods["a2"]),
               Pinger(net, "b1", pods["a2"])]  # fmt: skip
    started = time.monotonic()
    try:
        time.sleep(1)
        for _ in range(restarts):
            net.stop_agent("n1")
            moment = time.time()
            net.restart_agent("n1")
            net.wait_sessions_after(moment, nodes=("n1",))
            eventually(lambda: [] if net.status("n1")["synced"] else ["not synced"], CONVERGE,
                       "n1's initial sync")  # fmt: skip
        time.sleep(1)
    finally:
        counts = {p.what: p.stop() for p in pingers}
    return counts, time.monotonic() - started


def failover_once(net: OverlayFabric, delay: float) -> float:
    """Kill n3 after `delay` s, return seconds until its block left n1 and n2; then bring n3
    back. The delay spreads the death over the keepalive interval (peers' keepalives come
    on whole seconds, and so would the deaths of runs that start right after a recovery)."""
    block = net.block_of("n3")
    ns = net.netns("n3")
    time.sleep(delay)
    died = time.monotonic()
    host.ip("-n", ns, "link", "set", "eth1", "down")
    for pid in host.netns_pids(ns):
        os.kill(pid, signal.SIGKILL)
    pending = {"n1", "n2"}
    while pending and time.monotonic() - died < HOLD + 30:
        pending = {n for n in pending if block in net.routes(n)}
        time.sleep(0.02)
    took = time.monotonic() - died
    if pending:
        raise RuntimeError(f"n3's block still on {sorted(pending)} after {took:.1f} s")
    host.ip("-n", ns, "link", "set", "eth1", "up")
    # The kernel dropped the routes through the link when it went down.
    host.ip("-n", ns, "route", "replace", "default", "via", "10.0.2.1")
    moment = time.time()
    net.restart_agent("n3")
    net.wait_sessions_after(moment, nodes=("n3",))
    net.wait_routes({n: net.expected(n, "CrossSubnet", VXLAN_DEVICE) for n in NODES},
                    "n3 back")  # fmt: skip
    return took


def report(
    losses: dict[str, tuple[int, int]], restart_s: float, restarts: int, runs: list[float]
) -> tuple[str, bool]:
    median = statistics.median(runs)
    target = HOLD + 1
    sent = sum(s for s, _ in losses.values())
    lost = sum(s - r for s, r in losses.values())
    load = os.getloadavg()
    lines = [
        START,
        "## Failover and graceful restart (`bench/failover.py`)",
        "",
        f"`sudo python bench/failover.py --runs {len(runs)} --restarts {restarts}` — "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())},",
        f"{os.cpu_count()} CPUs, Linux {platform.release()}, Python {platform.python_version()}"
        f"; load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}.",
        "The two-subnets topology with the VXLAN fallback (CrossSubnet), agents with ExaBGP.",
        "",
        "| what | result | target |",
        "| --- | ---: | --- |",
        f"| failover: n3 dies → its block gone from n1 and n2, median of {len(runs)} "
        f"(hold {HOLD} s, keepalive 1 s, no GR) | {median:.2f} s | <= hold + 1 s = "
        f"{target} s {'met' if median <= target else 'MISSED'} |",
        f"| graceful restart: packets lost while n1's agent restarts {restarts} times "
        f"(3 pings at 10/s, {restart_s:.1f} s) | {lost} of {sent} | 0 "
        f"{'met' if lost == 0 else 'MISSED'} |",
        "",
        "Failover runs (s): " + ", ".join(f"{r:.2f}" for r in runs) + " (each death at a "
        "random moment of the 1 s keepalive interval). A node dies by its "
        "uplink going down and then every process in its namespace being killed, so the "
        "peers learn it only from silence: the agent's own hold timer (to the tenth of a "
        "second; ExaBGP's counts whole seconds) drops the node's routes when the hold time "
        "has passed since its last message.",
        "",
        "Pings during the restarts (sent, answered): "
        + "; ".join(f"{what}: {s}, {r}" for what, (s, r) in losses.items())
        + ". The restarting agent adopts its kernel routes and VXLAN entries as they are; "
        "its peers keep its routes (stale) until it has re-announced them and sent "
        "End-of-RIB.",
        END,
    ]
    return "\n".join(lines) + "\n", median <= target and lost == 0


def write_section(text: str, path: Path = RESULTS) -> None:
    replace_section(START, END, text, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--restarts", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1, help="of the pauses before each death")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("needs root (network namespaces)")
    with (
        tempfile.TemporaryDirectory(prefix="l3fabric-failover-") as tmp,
        running_lab(Path(tmp), two_subnets_document(), nodes=NODES) as fabric,
    ):
        net = OverlayFabric(fabric)
        net.set_pool(vxlanMode="CrossSubnet")
        eventually(net.sessions_up, CONVERGE, "sessions")
        for node, pod in (("n1", "a1"), ("n2", "a2"), ("n3", "b1")):
            fabric.add_pod(node, pod)
        net.wait_routes({n: net.expected(n, "CrossSubnet", VXLAN_DEVICE) for n in NODES},
                        "the fabric")  # fmt: skip
        losses, restart_s = restart_losses(net, args.restarts)
        print(f"restarts: {losses}", file=sys.stderr)
        changed = time.time()
        with fabric.store() as store:
            store.create(Resource("BGPConfiguration", "default",
                                  {"holdTime": HOLD, "keepaliveTime": 1,
                                   "gracefulRestartTime": 0}))  # fmt: skip
        net.wait_sessions_after(changed)
        runs = []
        rng = random.Random(args.seed)
        for i in range(args.runs):
            runs.append(failover_once(net, rng.random()))
            print(f"failover run {i + 1}: {runs[-1]:.2f} s", file=sys.stderr)
    text, ok = report(losses, restart_s, args.restarts, runs)
    print(text)
    if not args.no_write:
        write_section(text)
        print(f"written to {RESULTS}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
