"""Learned routes into the kernel: l3fabric's Fib vs `ip -batch` of the same routes, one run.

    sudo python bench/fib.py [--routes 20000] [--repeats 5] [--no-write]

A "node" namespace reaches a "peer" namespace over two veth pairs (10.0.0.0/24 and
10.0.1.0/24), so every gateway is reachable and ECMP over both links is possible; the real
host is untouched. Two route sets of ``--routes`` /28s each: one next hop, and ECMP over
two. For each set and repetition both programmers install all routes in one go and then
remove them all; which one goes first alternates, so drift on the machine hits both alike.
Every install and removal is verified (untimed) by counting the table. Timings:

- Fib: ``Fib.apply`` (hand-packed RTM_NEWROUTE/DELROUTE in chunks, every ack checked).
  The Fib is opened once per repetition; its first apply starts with empty caches, so it
  runs the same NLM_F_EXCL path an agent runs after a restart.
- ip: ``ip -n NODE -batch FILE`` with FILE written beforehand (process start included, a
  few ms: it is what a shell-out would cost).

Reported: medians, routes/s and the rate ratio Fib / ip (DESIGN §9 target: >= 0.5x), plus
the Fib's dump and no-op reconcile of a full table. Results replace the `fib` section of
bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from results import load_average, replace_section  # noqa: E402

from bgp_speaker.bgp.routes import PROTO_BGP, KernelRoute, NextHop  # noqa: E402
from bgp_speaker.kernel.fib import Fib  # noqa: E402

RESULTS = REPO / "bench" / "RESULTS.md"
START, END = "<!-- fib:start -->", "<!-- fib:end -->"
TAG = f"l3fb{os.getpid() % 10000}"
NODE, PEER = f"{TAG}-node", f"{TAG}-peer"
GATEWAYS = (IPv4Address("10.0.0.2"), IPv4Address("10.0.1.2"))
TARGET = 0.5


@dataclass(frozen=True)
class RouteSet:
    label: str
    hops: tuple[NextHop, ...]

    def ip_add_line(self, prefix: IPv4Network) -> str:
        if len(self.hops) == 1:
            return f"route add {prefix} via {self.hops[0].gateway} proto {PROTO_BGP}\n"
        nexthops = " ".join(f"nexthop via {hop.gateway}" for hop in self.hops)
        return f"route add {prefix} proto {PROTO_BGP} {nexthops}\n"


SETS = (
    RouteSet("one next hop", (NextHop(GATEWAYS[0]),)),
    RouteSet("ECMP, 2 next hops", tuple(NextHop(g) for g in GATEWAYS)),
)


@dataclass
class Samples:
    add: list[float] = field(default_factory=list)
    remove: list[float] = field(default_factory=list)


def sh(*cmd: str) -> None:
    subprocess.run(cmd, text=True, check=True, capture_output=True)


@contextlib.contextmanager
def namespaces() -> Iterator[None]:
    made = []
    try:
        for name in (NODE, PEER):
            sh("ip", "netns", "add", name)
            made.append(name)
        for side, subnet in (("a", "10.0.0"), ("b", "10.0.1")):
            sh("ip", "link", "add", f"n{side}", "netns", NODE, "type", "veth",
               "peer", "name", f"p{side}", "netns", PEER)  # fmt: skip
            for ns, dev, host in ((NODE, f"n{side}", 1), (PEER, f"p{side}", 2)):
                sh("ip", "-n", ns, "addr", "add", f"{subnet}.{host}/24", "dev", dev)
                sh("ip", "-n", ns, "link", "set", dev, "up")
        yield
    finally:
        for name in made:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


def prefixes(count: int) -> list[IPv4Network]:
    base = int(IPv4Address("10.128.0.0"))
    return [IPv4Network((base + 16 * i, 28)) for i in range(count)]


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def count_ours() -> int:
    with Fib(NODE) as fib:
        return len(fib.dump())


def expect(count: int, what: str) -> None:
    found = count_ours()
    if found != count:
        raise SystemExit(f"{what}: {found} routes of ours in the table, expected {count}")


def run_fib(routes: list[KernelRoute], nets: list[IPv4Network], into: Samples) -> None:
    with Fib(NODE) as fib:
        into.add.append(timed(lambda: fib.apply(routes, [])))
        expect(len(routes), "after Fib install")
        into.remove.append(timed(lambda: fib.apply([], nets)))
    expect(0, "after Fib removal")


def run_ip(add_file: str, del_file: str, count: int, into: Samples) -> None:
    into.add.append(timed(lambda: sh("ip", "-n", NODE, "-batch", add_file)))
    expect(count, "after ip -batch install")
    into.remove.append(timed(lambda: sh("ip", "-n", NODE, "-batch", del_file)))
    expect(0, "after ip -batch removal")


def write_batch(directory: str, name: str, lines: Iterator[str]) -> str:
    path = os.path.join(directory, name)
    with open(path, "w") as out:
        out.writelines(lines)
    return path


def bench_set(route_set: RouteSet, nets: list[IPv4Network], repeats: int, tmp: str) -> dict:
    routes = [KernelRoute(p, route_set.hops) for p in nets]
    add_file = write_batch(tmp, "add", (route_set.ip_add_line(p) for p in nets))
    del_file = write_batch(tmp, "del", (f"route del {p} proto {PROTO_BGP}\n" for p in nets))
    fib, ip = Samples(), Samples()
    for repeat in range(repeats):
        runs = [
            ("fib", lambda: run_fib(routes, nets, fib)),
            ("ip", lambda: run_ip(add_file, del_file, len(nets), ip)),
        ]
        for _name, run in runs if repeat % 2 == 0 else reversed(runs):
            run()
        print(
            f"{route_set.label} run {repeat + 1}/{repeats}: "
            f"fib add {fib.add[-1]:.3f}s del {fib.remove[-1]:.3f}s | "
            f"ip add {ip.add[-1]:.3f}s del {ip.remove[-1]:.3f}s",
            file=sys.stderr,
        )
    return {"fib": fib, "ip": ip, "dump": full_table_costs(routes)}


def full_table_costs(routes: list[KernelRoute]) -> tuple[float, float]:
    """Median dump and no-op reconcile of a table holding all the routes (untimed install)."""
    desired = {route.prefix: route for route in routes}
    dumps, reconciles = [], []
    with Fib(NODE) as fib:
        fib.apply(routes, [])
        for _ in range(3):
            dumps.append(timed(fib.dump))
            reconciles.append(timed(lambda: fib.reconcile(desired)))
        fib.apply([], list(desired))
    return statistics.median(dumps), statistics.median(reconciles)


def render(results: dict[str, dict], count: int, repeats: int, loads: tuple[str, str]) -> str:
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    iproute = subprocess.run(["ip", "-V"], capture_output=True, text=True).stdout.strip()
    lines = [
        START,
        "## Learned routes into the kernel (`bench/fib.py`)",
        "",
        f"`sudo python bench/fib.py --routes {count} --repeats {repeats}` — {when},",
        f"{os.cpu_count()} CPUs, Linux {platform.release()}, Python {platform.python_version()},",
        f"{iproute}.",
        f"{count} /28 routes installed in one batch, then removed, in a namespace; Fib and",
        "`ip -batch` alternate (which goes first alternates too). Medians of "
        f"{repeats} runs; rate =",
        f"routes/s; ratio = Fib rate / ip rate (target >= {TARGET}x). Load average (1/5/15 min)",
        f"before: {loads[0]}, after: {loads[1]} — the machine is shared.",
        "",
        "| routes | op | Fib s | ip -batch s | Fib rate | ip rate | ratio | target |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for label, result in results.items():
        for op in ("add", "remove"):
            ours = statistics.median(getattr(result["fib"], op))
            ref = statistics.median(getattr(result["ip"], op))
            ratio = ref / ours
            verdict = "met" if ratio >= TARGET else "MISSED"
            lines.append(
                f"| {label} | {op} | {ours:.3f} | {ref:.3f} | {count / ours:,.0f} | "
                f"{count / ref:,.0f} | {ratio:.2f}x | >= {TARGET}x {verdict} |"
            )
    lines += ["", "Full table, Fib only (medians of 3): "]
    costs = [
        f"{label}: dump {dump:.3f} s, no-op reconcile {rec:.3f} s"
        for label, result in results.items()
        for dump, rec in [result["dump"]]
    ]
    lines[-1] += "; ".join(costs) + "."
    lines.append(END)
    return "\n".join(lines)


def write_section(text: str, path: Path = RESULTS) -> None:
    replace_section(START, END, text, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--routes", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("needs root (network namespaces)")
    nets = prefixes(args.routes)
    before = load_average()
    with namespaces(), tempfile.TemporaryDirectory(prefix="l3fabric-fib-") as tmp:
        results = {s.label: bench_set(s, nets, args.repeats, tmp) for s in SETS}
    text = render(results, args.routes, args.repeats, (before, load_average()))
    print(text)
    if not args.no_write:
        write_section(text)
        print(f"written to {RESULTS}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
