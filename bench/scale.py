"""Scale: route reflection for many clients and an idle full-mesh node, l3fabric against BIRD 2
configured as Calico configures it, side by side in one run; and ExaBGP's reactor speed.

    sudo python bench/scale.py [--clients 100 400] [--mesh 10 100] [--repeats 1]
                               [--timeout 300] [--idle 30] [--no-write]
    sudo python bench/scale.py --clients 1000 --mesh        # only the 1000-client reflector
    sudo python bench/scale.py --speed-sweep [--sessions 2 10 100 400]
                               [--speeds 0.5 1 2 5 10] [--latency-samples 20]

Simulated nodes: one BIRD 2 process each, all in one namespace (scale_sim.py); the node under
test alone in another, on a veth: BIRD (scale_dut.py: Calico's bird.cfg in BIRD 2 syntax) or
a real `l3fabric agent` with an embedded store holding the pool, a Node per simulated node
and the BGPPeer/BGPConfiguration of tests/topologies/rr.objects.yaml (or a full mesh).

- Reflector, N clients (2 /26 blocks each): seconds from the reflector's start until every
  sampled client (all at N <= 50, else 50 spread out, always the last-started ones) holds
  all 2N blocks and the reflector's kernel routes all 2N; CPU seconds to then and peak RSS
  (sum of VmHWM) of the reflector's whole process tree (agent, ExaBGP, relay, any BIRD it
  runs); idle CPU over --idle s once settled; withdraw latency (the last client disables one
  block -> every sampled client lost it). A side that does not converge in --timeout s is
  recorded as such, with its CPU and RSS until then; one that breaks off (an exception) is
  recorded with the reason, and the run goes on. The rows "sampled clients complete" and
  "node's kernel complete" split the convergence time.
- Full mesh, N nodes: the node under test with N-1 simulated peers; converged when its kernel
  routes all 2(N-1) blocks; idle CPU and RSS as above.

Every timing runs under `flock /tmp/l3fabric-timing.lock` (common.md): run the whole command
under it. Results replace the `scale` (or `scale-speed`) section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import atexit
import os
import platform
import shlex
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

import scale_dut as dut
from converge import settle
from results import load_average, replace_section
from scale_sim import (
    DUT_IP,
    PROTO,
    TAG,
    Accounting,
    Fleet,
    Namespaces,
    blocks,
    kernel_counter,
    kill_tree,
    sample,
)

START, END = "<!-- scale:start -->", "<!-- scale:end -->"
SAMPLE = 50  # clients checked for convergence
WITHDRAW_SAMPLE = 20


@dataclass
class Result:
    converge: float | None  # None: not within the timeout
    clients: float | None  # of which: every sampled client complete
    kernel: float | None  # of which: the node's own kernel complete
    cpu: float  # CPU seconds from start to converged (or to the timeout)
    rss: int  # sum of the tree's peak RSS, bytes
    idle: float | None  # CPUs' worth, once settled
    withdraw: float | None
    processes: int
    rss_roles: dict[str, int]  # current RSS by process role at the end
    failed: str | None = None  # the measurement broke off: why


def measure(kind: str, reflector: bool, n: int, fleet: Fleet, tmp: Path,
            args: argparse.Namespace) -> Result:  # fmt: skip
    """One node under test with n clients (reflector) or n-1 mesh peers."""
    peers = n if reflector else n - 1
    fleet.start(peers, [DUT_IP])
    counter = kernel_counter()
    want_kernel = 2 * peers
    waiting = sample(peers, SAMPLE) if reflector else []
    run_dir = tmp / f"{'rr' if reflector else 'mesh'}-{n}-{kind}-{time.monotonic_ns()}"
    started = time.monotonic()
    proc = dut.start(kind, reflector, peers, run_dir)
    acct = Accounting(proc.pid)
    try:
        converged: float | None = None
        clients_done: float | None = None
        kernel_done: float | None = None
        deadline = started + args.timeout
        while time.monotonic() < deadline:
            acct.poll()
            if proc.poll() is not None:
                raise SystemExit(f"{kind} exited with {proc.returncode}: see {run_dir}")
            while waiting and fleet.route_count(waiting[0]) >= 2 * n:
                waiting.pop(0)  # routes do not go away: check each client until it is done
            if not waiting and clients_done is None:
                clients_done = time.monotonic() - started
            if kernel_done is None and counter.count(PROTO[kind]) >= want_kernel:
                kernel_done = time.monotonic() - started
            if clients_done is not None and kernel_done is not None:
                converged = max(clients_done, kernel_done)
                break
            time.sleep(0.1)
        cpu = acct.cpu_total()
        idle = withdraw = None
        if converged is not None:
            settle(acct.poll())
            idle = acct.idle(args.idle)
            if reflector:
                withdraw = withdraw_latency(fleet, peers, args.timeout)
        roles = acct.rss_by_role()
        return Result(
            converged, clients_done, kernel_done, cpu, acct.peak, idle, withdraw,
            len(acct.pids), roles,
        )  # fmt: skip
    finally:
        kill_tree(proc)
        dut.flush_kernel()


def withdraw_latency(fleet: Fleet, n: int, timeout: float) -> float | None:
    """The last client disables its second block: seconds until no sampled client has it."""
    last = n - 1
    net = blocks(last)[1]
    waiting = [i for i in sample(n, WITHDRAW_SAMPLE) if i != last]
    since = time.monotonic()
    fleet.birdc(last, "disable", "own2")
    while waiting:
        if fleet.route_count(waiting[0]) <= 2 * n - 1:
            waiting.pop(0)
        elif time.monotonic() - since > timeout:
            return None
    took = time.monotonic() - since
    assert not fleet.has(last, net), "the client still announces the withdrawn block"
    return took


def run(args: argparse.Namespace, tmp: Path) -> dict[str, dict[int, dict[str, list[Result]]]]:
    out: dict[str, dict[int, dict[str, list[Result]]]] = {"reflector": {}, "mesh": {}}
    spaces = Namespaces()
    fleet = Fleet(tmp)
    atexit.register(spaces.close)
    atexit.register(fleet.stop)
    try:
        spaces.open()
        spaces.add_sim_addresses(max([*args.clients, *args.mesh, 1]))
        for scenario, sizes in (("reflector", args.clients), ("mesh", args.mesh)):
            for n in sizes:
                runs: dict[str, list[Result]] = {k: [] for k in args.kinds}
                for repeat in range(args.repeats):
                    order = args.kinds if repeat % 2 == 0 else args.kinds[::-1]
                    for kind in order:
                        try:
                            r = measure(kind, scenario == "reflector", n, fleet, tmp, args)
                        except (Exception, SystemExit) as err:  # record it, go on with the rest
                            r = Result(None, None, None, 0.0, 0, None, None, 0, {}, str(err))
                        runs[kind].append(r)
                        print(f"{scenario} {n} {kind}: {r}", file=sys.stderr, flush=True)
                out[scenario][n] = runs
    finally:
        fleet.stop()
        spaces.close()
    return out


# --- report ------------------------------------------------------------------------------------


def _med(values: list[float | None]) -> float | None:
    got = [v for v in values if v is not None]
    return statistics.median(got) if len(got) == len(values) and got else None


def _cell(value: float | None, fmt: str, missing: str) -> str:
    return missing if value is None else format(value, fmt)


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.1f}x" if a is not None and b else "—"


def render(results: dict[str, dict[int, dict[str, list[Result]]]], args: argparse.Namespace,
           loads: tuple[str, str]) -> str:  # fmt: skip
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        START,
        "## Scale: route reflector and full-mesh idle (`bench/scale.py`)",
        "",
        f"`{args.command}` — {when}, {os.cpu_count()} CPUs, Linux {platform.release()}, "
        f"{dut.versions()}. Simulated nodes: one BIRD 2 each, all in one namespace; node under "
        "test: an l3fabric agent (whole process tree) or BIRD 2 configured as Calico's "
        f"bird.cfg. Medians of {args.repeats}; ratio = l3fabric / BIRD. Timeout "
        f"{args.timeout:g} s, idle window {args.idle:g} s. Load average before: {loads[0]}, "
        f"after: {loads[1]}.",
        "",
    ]
    rows = (
        ("converged s", "converge", ".2f"),
        ("… sampled clients complete s", "clients", ".2f"),
        ("… node's kernel complete s", "kernel", ".2f"),
        ("CPU s to converged", "cpu", ".2f"),
        ("peak RSS MiB (sum over the tree)", "rss", ".0f"),
        ("idle CPU % of a core", "idle", ".2f"),
        ("withdraw → all sampled clients s", "withdraw", ".3f"),
    )
    for scenario, title in (("reflector", "Route reflector, N clients (2 blocks each)"),
                            ("mesh", "Full mesh, node under test with N-1 peers")):  # fmt: skip
        if not results[scenario]:
            continue
        lines += [f"### {title}", "", "| N | | l3fabric | BIRD | ratio |", "| ---: | --- | ---: |"
                  " ---: | ---: |"]  # fmt: skip
        for n, runs in results[scenario].items():
            for label, attr, fmt in rows:
                if attr in ("withdraw", "clients") and scenario == "mesh":
                    continue
                med = {}
                for kind in dut.KINDS:
                    values = [getattr(r, attr) for r in runs.get(kind, [])]
                    if attr == "rss":
                        values = [v / 2**20 for v in values]
                    if attr == "idle":
                        values = [None if v is None else 100 * v for v in values]
                    med[kind] = _med(values) if values else None
                cells = [
                    _cell(med[kind], fmt, f"did not converge in {args.timeout:g} s"
                          if attr == "converge" and runs.get(kind) else "—")
                    for kind in ("l3fabric", "bird")
                ]  # fmt: skip
                ratio = _ratio(med["l3fabric"], med["bird"])
                lines.append(f"| {n} | {label} | {cells[0]} | {cells[1]} | {ratio} |")
        lines.append("")
    failures = [
        f"{scenario} {n} {kind}: {r.failed}"
        for scenario in ("reflector", "mesh")
        for n, runs in results[scenario].items()
        for kind, rs in runs.items()
        for r in rs
        if r.failed
    ]
    if failures:
        lines += ["Failed measurements (shown as not converged): " + "; ".join(failures), ""]
    parts = [
        f"{scenario} {n}: "
        + ", ".join(f"{k} {v / 2**20:.0f}" for k, v in sorted(r.rss_roles.items()))
        for scenario in ("reflector", "mesh")
        for n, runs in results[scenario].items()
        for r in runs.get("l3fabric", [])[-1:]
    ]
    if parts:
        lines += ["l3fabric RSS by process at the end, MiB: " + "; ".join(parts) + ".", ""]
    lines.append(END)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="*", default=[100, 400],
                        help="reflector sizes (none: skip)")  # fmt: skip
    parser.add_argument("--mesh", type=int, nargs="*", default=[10, 100],
                        help="full-mesh sizes (none: skip)")  # fmt: skip
    parser.add_argument("--kinds", nargs="+", choices=dut.KINDS, default=list(dut.KINDS))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds a node under test gets to converge")  # fmt: skip
    parser.add_argument("--idle", type=float, default=30.0, help="idle window, seconds")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--speed-sweep", action="store_true",
                        help="ExaBGP reactor speeds instead (scale_speed.py)")  # fmt: skip
    parser.add_argument("--sessions", type=int, nargs="+", default=[2, 10, 100, 400])
    parser.add_argument("--speeds", type=float, nargs="+", default=[0.5, 1.0, 2.0, 5.0, 10.0])
    parser.add_argument("--latency-samples", type=int, default=20)
    args = parser.parse_args(argv)
    args.command = "sudo python bench/scale.py " + shlex.join(
        sys.argv[1:] if argv is None else argv
    )
    if os.geteuid() != 0:
        parser.error("needs root (network namespaces)")
    if any(not 2 <= n <= 1000 for n in [*args.clients, *args.mesh, *args.sessions]):
        parser.error("sizes: 2..1000 (one address per simulated node on one /16)")
    # SIGTERM as Ctrl-C, so that the namespaces and processes go (try/finally) then too
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    before = load_average()
    with tempfile.TemporaryDirectory(prefix=f"{TAG}-") as tmpdir:
        if args.speed_sweep:
            import scale_speed

            text = scale_speed.main(args, Path(tmpdir), before)
            start, end = scale_speed.START, scale_speed.END
        else:
            results = run(args, Path(tmpdir))
            text = render(results, args, (before, load_average()))
            start, end = START, END
    print(text)
    if not args.no_write:
        replace_section(start, end, text)
        print("written to bench/RESULTS.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
