"""CNI ADD/DEL latency: l3fabric (shim -> agent) vs Debian's bridge + host-local, one run.

    sudo python bench/cni.py [--pods 200] [--no-write]

Both plugins are executed as a runtime executes them (a fresh process, CNI_* environment,
configuration on stdin) from inside one network namespace that plays the node, so the real
host is untouched; each pod gets its own namespace per plugin. The two alternate pod by pod
(and which goes first alternates too), so load spikes hit both alike. Reported: p50/p99 of
ADD and DEL per plugin, the ratios against the targets of DESIGN §9 (ADD p50 <= 1.5x,
p99 <= 2x), and where l3fabric's time goes: plugin start-up (VERSION, answered without the
agent) and the agent's own time per call (from its log). Results replace the `cni` section
of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from netaddr import IPNetwork  # noqa: E402
from results import replace_section  # noqa: E402

from bgp_speaker.kernel.netns import open_netns, run_in_netns  # noqa: E402
from cni.install import install  # noqa: E402
from ipam_blocks.allocator import IPAM  # noqa: E402
from ipam_blocks.model import IPPool, Node  # noqa: E402
from ipam_blocks.pools import add_node, add_pool  # noqa: E402
from ipam_blocks.store.sqlite import SqliteStore  # noqa: E402

REFERENCE = Path("/usr/lib/cni")
RESULTS = REPO / "bench" / "RESULTS.md"
START, END = "<!-- cni:start -->", "<!-- cni:end -->"
PREFIX = f"l3b{os.getpid() % 10000}"
NODE = "bench-node"
WARMUP = 5
TARGETS = {"ADD p50": 1.5, "ADD p99": 2.0}


@dataclass
class Plugin:
    name: str
    executable: Path
    conf: bytes
    ifname: str
    netns_tag: str


def sh(*cmd: str, stdin: str | None = None) -> None:
    subprocess.run(cmd, input=stdin, text=True, check=True, capture_output=True)


@contextlib.contextmanager
def namespaces(names: list[str]) -> Iterator[None]:
    sh("ip", "-batch", "-", stdin="".join(f"netns add {n}\n" for n in names))
    try:
        yield
    finally:
        subprocess.run(["ip", "-force", "-batch", "-"], text=True, capture_output=True,
                       input="".join(f"netns del {n}\n" for n in names))  # fmt: skip


def prepare_host(host: str) -> None:
    """Loopback up and a default route out of an uplink, like a real node."""
    world = f"{host}w"
    sh("ip", "-n", host, "link", "set", "lo", "up")
    sh("ip", "-n", host, "link", "add", "up0", "type", "veth", "peer", "name", "up1", "netns",
       world)  # fmt: skip
    sh("ip", "-n", host, "addr", "add", "192.0.2.1/24", "dev", "up0")
    sh("ip", "-n", host, "link", "set", "up0", "up")
    sh("ip", "-n", host, "route", "add", "default", "via", "192.0.2.2")


@contextlib.contextmanager
def agent(tmp: Path, host: str) -> Iterator[Path]:
    store = SqliteStore(tmp / "store.db")
    ipam = IPAM(store)
    add_pool(ipam, IPPool("bench", IPNetwork("10.70.0.0/16"), 26))
    add_node(ipam, Node(NODE))
    store.close()
    sock = tmp / "agent.sock"
    log = tmp / "agent.log"
    cmd = [sys.executable, "-m", "l3fabric.cli", "--log-level", "info", "--store",
           f"sqlite:{tmp / 'store.db'}", "agent", "--node", NODE, "--socket", str(sock),
           "--state-dir", str(tmp / "state"), "--host-netns", f"/var/run/netns/{host}"]  # fmt: skip
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, stderr=err, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"agent did not start:\n{log.read_text()}")
            time.sleep(0.05)
        yield log
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def invoke(plugin: Plugin, command: str, i: int) -> float:
    """One plugin run, as a runtime does it; its wall-clock latency in milliseconds."""
    env = {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": f"bench-{plugin.netns_tag}-{i}",
        "CNI_NETNS": f"/var/run/netns/{PREFIX}-{plugin.netns_tag}{i}",
        "CNI_IFNAME": plugin.ifname,
        "CNI_PATH": f"{REFERENCE}:{plugin.executable.parent}",
        "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE=bench;K8S_POD_NAME=p{i}",
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin"),
    }
    start = time.perf_counter()
    run = subprocess.run([str(plugin.executable)], input=plugin.conf, env=env,
                         capture_output=True)  # fmt: skip
    elapsed = (time.perf_counter() - start) * 1000
    if run.returncode != 0:
        raise RuntimeError(f"{plugin.name} {command} pod {i}: {run.stdout!r} {run.stderr!r}")
    return elapsed


def measure(plugins: list[Plugin], pods: int) -> dict[str, dict[str, list[float]]]:
    """ADD every pod, then DEL every pod, alternating plugins (and who goes first)."""
    samples: dict[str, dict[str, list[float]]] = {p.name: {"ADD": [], "DEL": []} for p in plugins}
    for p in plugins:  # warm caches and claim the first block outside the measurement
        for i in range(pods, pods + WARMUP):
            invoke(p, "ADD", i)
            invoke(p, "DEL", i)
    for command in ("ADD", "DEL"):
        for i in range(pods):
            for p in plugins if i % 2 == 0 else plugins[::-1]:
                samples[p.name][command].append(invoke(p, command, i))
    return samples


def startup_ms(plugin: Plugin, runs: int = 50) -> float:
    """Median latency of VERSION: process start-up, no work (the shim never calls the agent)."""
    env = {"CNI_COMMAND": "VERSION"}
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([str(plugin.executable)], input=b"{}", env=env, capture_output=True)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def agent_ms(log: Path, command: str) -> list[float]:
    pattern = re.compile(rf"cni {command} .*handle=bench.*\bms=([0-9.]+)")
    return [float(m.group(1)) for m in map(pattern.search, log.read_text().splitlines()) if m]


def pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def report(
    samples: dict[str, dict[str, list[float]]],
    startup: dict[str, float],
    agent_times: dict[str, list[float]],
    pods: int,
) -> tuple[str, bool]:
    l3f, ref = samples["l3fabric"], samples["bridge+host-local"]
    rows, ratios = [], {}
    for command in ("ADD", "DEL"):
        for q in (50, 99):
            a, b = pct(l3f[command], q), pct(ref[command], q)
            key = f"{command} p{q}"
            ratios[key] = a / b
            target = TARGETS.get(key)
            verdict = "" if target is None else ("met" if a / b <= target else "**missed**")
            goal = f"<= {target}x" if target else "—"
            rows.append(f"| {key} | {a:.1f} | {b:.1f} | {a / b:.2f}x | {goal} {verdict} |")
    ok = all(ratios[k] <= v for k, v in TARGETS.items())
    add_agent = statistics.median(agent_times["ADD"]) if agent_times["ADD"] else float("nan")
    del_agent = statistics.median(agent_times["DEL"]) if agent_times["DEL"] else float("nan")
    text = f"""{START}
## CNI ADD/DEL latency (`bench/cni.py`)

`sudo python bench/cni.py --pods {pods}` — {time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())},
{os.cpu_count()} CPUs, Linux {platform.release()}, Python {platform.python_version()},
Debian containernetworking-plugins {_plugins_version()}. Each plugin executed as a runtime
does (fresh process, env + stdin) from one namespace playing the node, one pod namespace per
plugin and pod, plugins alternating pod by pod. Milliseconds, {pods} pods each.

| | l3fabric | bridge + host-local | ratio | target |
| --- | ---: | ---: | ---: | --- |
{chr(10).join(rows)}

Where l3fabric's ADD time goes (medians): plugin start-up {startup["l3fabric"]:.1f} ms
(VERSION: `python -I -S` + the shim's imports; the Go reference starts in
{startup["bridge+host-local"]:.1f} ms), agent work {add_agent:.1f} ms (IPAM, records, veth +
addresses + routes), the rest is the socket round trip and process exit. Agent work per DEL
{del_agent:.1f} ms, dominated by the kernel deleting the veth pair.
{END}
"""
    return text, ok


def _plugins_version() -> str:
    out = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "containernetworking-plugins"],
                         capture_output=True, text=True)  # fmt: skip
    return out.stdout.strip() or "unknown"


def write_section(text: str, path: Path = RESULTS) -> None:
    replace_section(START, END, text, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pods", type=int, default=200)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("needs root (network namespaces)")
    host = f"{PREFIX}-host"
    pod_ns = [f"{PREFIX}-{tag}{i}" for tag in ("l", "b") for i in range(args.pods + WARMUP)]
    with tempfile.TemporaryDirectory(prefix="l3fabric-bench-") as tmpdir:
        tmp = Path(tmpdir)
        with namespaces([host, f"{host}w", *pod_ns]), agent(tmp, host) as log:
            prepare_host(host)
            plugin = install(tmp / "bin", tmp / "conf", socket=str(tmp / "agent.sock")).plugin
            l3f_conf = {"cniVersion": "1.0.0", "name": "bench", "type": "l3fabric",
                        "socket": str(tmp / "agent.sock")}  # fmt: skip
            ref_conf = {"cniVersion": "1.0.0", "name": "bench", "type": "bridge",
                        "bridge": "benchbr0", "isGateway": True, "ipMasq": False,
                        "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.71.0.0/16"}]],
                                 "dataDir": str(tmp / "host-local")}}  # fmt: skip
            plugins = [
                Plugin("l3fabric", plugin, json.dumps(l3f_conf).encode(), "eth0", "l"),
                Plugin("bridge+host-local", REFERENCE / "bridge",
                       json.dumps(ref_conf).encode(), "eth0", "b"),
            ]  # fmt: skip
            with open_netns(f"/var/run/netns/{host}") as fd:
                # Plugins run from a thread inside the node's namespace (children inherit it),
                # as a runtime's do on a real node.
                samples = run_in_netns(fd, lambda: measure(plugins, args.pods))
                startup = {p.name: run_in_netns(fd, lambda p=p: startup_ms(p)) for p in plugins}
            agent_times = {c: agent_ms(log, c)[-args.pods :] for c in ("ADD", "DEL")}
    text, ok = report(samples, startup, agent_times, args.pods)
    print(text)
    if not args.no_write:
        write_section(text)
        print(f"written to {RESULTS}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
