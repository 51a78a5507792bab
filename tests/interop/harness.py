"""Interop and reflection labs: a shipped topology (tests/topologies/<name>.clab.yml, its
objects file and config directory copied beside it) realised by `l3fabric lab up` under a
unique lab name, pods through the real CNI path, and what the tests read from it — the
agents' RIBs (`node.routes`: every accepted path with its attributes), BIRD's routes
(`birdc show route all`), FRR's (`vtysh ... json`), the kernels' routing tables.

Everything is taken down by the context manager, also when a test fails; processes a test
starts itself (continuous pings, route monitors) are stopped by PID.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from cni.protocol import call
from l3fabric.lab import host
from tests.fabric.harness import Fabric, eventually
from tests.lab.harness import Lab, in_netns
from tests.lab.schema import TOPOLOGIES

CONVERGE = 90.0
"""Seconds a lab gets to converge (the machine is shared: generous)."""

needs_interop = pytest.mark.skipif(
    os.geteuid() != 0
    or any(shutil.which(t) is None for t in ("ip", "ping", "exabgp", "bird", "birdc", "vtysh"))
    or not Path("/usr/lib/frr/bgpd").exists(),
    reason="needs root, iproute2, ping, exabgp, bird2 and frr",
)


def shipped(name: str) -> tuple[dict[str, Any], dict[str, str]]:
    """A shipped topology's document and the files beside it (relative path -> text)."""
    document = yaml.safe_load((TOPOLOGIES / f"{name}.clab.yml").read_text())
    files: dict[str, str] = {}
    objects = TOPOLOGIES / f"{name}.objects.yaml"
    if objects.exists():
        files[objects.name] = objects.read_text()
    configs = TOPOLOGIES / name
    if configs.is_dir():
        for path in sorted(configs.rglob("*")):
            if path.is_file():
                files[str(path.relative_to(TOPOLOGIES))] = path.read_text()
    return document, files


class InteropLab(Fabric):
    """A running lab with l3fabric, BIRD and FRR nodes."""

    def __init__(self, lab: Lab, nodes: tuple[str, ...]) -> None:
        super().__init__(lab, nodes)

    # --- l3fabric nodes ------------------------------------------------------------------

    def rib(self, node: str) -> dict[str, list[dict[str, Any]]]:
        """Prefix -> accepted paths (each with `peer`, `best`, `next_hop`, `as_path`,
        `originator_id`, `cluster_list`, ...) from the agent's `node.routes`."""
        answer = call(str(self.socket(node)), "node.routes", {}, timeout=10)
        return {r["prefix"]: r["paths"] for r in answer["routes"]}

    def block_of(self, node: str) -> str:
        blocks = self.blocks()[node]
        assert len(blocks) == 1, (node, blocks)
        return next(iter(blocks))

    def established(self, node: str) -> set[str]:
        return {a for a, p in self.peers(node).items() if p["state"] == "established"}

    # --- routers -------------------------------------------------------------------------

    def birdc(self, node: str, *command: str) -> str:
        socket = str(self.paths.node(node).bird_socket)
        done = in_netns(self.netns(node), "birdc", "-s", socket, *command, timeout=20)
        assert done.returncode == 0, done
        return done.stdout

    def bird_route(self, node: str, prefix: str) -> dict[str, str]:
        """`show route all for PREFIX` of BIRD as attribute -> value (first route); empty
        while BIRD has no route for it."""
        socket = str(self.paths.node(node).bird_socket)
        done = in_netns(self.netns(node), "birdc", "-s", socket, "show", "route", "all", "for",
                        prefix, timeout=20)  # fmt: skip
        if "Network not found" in done.stdout:
            return {}
        assert done.returncode == 0, done
        out = done.stdout
        attrs: dict[str, str] = {}
        for line in out.splitlines():
            m = re.match(r"\s+(BGP\.\w+|Type):\s*(.*)$", line)
            if m and m.group(1) not in attrs:
                attrs[m.group(1)] = m.group(2).strip()
            via = re.match(r"\s+via (\S+) on", line)
            if via and "via" not in attrs:
                attrs["via"] = via.group(1)
        return attrs

    def vtysh(self, node: str, command: str) -> str:
        instance = self.netns(node)
        done = in_netns(instance, "vtysh", "-N", instance, "-c", command, timeout=20)
        assert done.returncode == 0, done
        return done.stdout

    def vtysh_json(self, node: str, command: str) -> Any:
        return json.loads(self.vtysh(node, command + " json") or "{}")

    def frr_paths(self, node: str, prefix: str) -> list[dict[str, Any]]:
        return self.vtysh_json(node, f"show bgp ipv4 unicast {prefix}").get("paths", [])

    def frr_state(self, node: str, neighbor: str) -> str:
        info = self.vtysh_json(node, f"show bgp neighbors {neighbor}")
        return str(info.get(neighbor, {}).get("bgpState", ""))

    # --- reachability --------------------------------------------------------------------

    def ping_from(self, pod: str, address: str, source: str | None = None) -> bool:
        argv = ["ping", "-c", "1", "-W", "2", *(["-I", source] if source else []), address]
        return any(in_netns(self.pod_netns(pod), *argv).returncode == 0 for _ in range(3))

    def ping_in(self, node: str, address: str, source: str) -> bool:
        """From a router's namespace, with one of its own addresses as the source."""
        argv = ["ping", "-c", "1", "-W", "2", "-I", source, address]
        return any(in_netns(self.netns(node), *argv).returncode == 0 for _ in range(3))


@contextlib.contextmanager
def topology_lab(
    tmp: Path,
    name: str,
    nodes: tuple[str, ...],
    edit: Callable[[dict[str, Any], dict[str, str]], None] | None = None,
) -> Iterator[InteropLab]:
    """`lab up` a shipped topology (optionally edited first); `lab down` afterwards."""
    document, files = shipped(name)
    if edit is not None:
        edit(document, files)
    with document_lab(tmp, document, files, nodes) as running:
        yield running


@contextlib.contextmanager
def document_lab(
    tmp: Path, document: dict[str, Any], files: dict[str, str], nodes: tuple[str, ...]
) -> Iterator[InteropLab]:
    """`lab up` a topology document with `files` beside it; `lab down` afterwards."""
    lab = Lab(tmp, document, files)
    running = InteropLab(lab, nodes)
    try:
        done = lab.up()
        assert done.code == 0, done
        yield running
    finally:
        lab.close()
        running.reap()
        leftover = lab.namespaces()
        assert not leftover, f"lab down left namespaces behind: {leftover}"


class ContinuousPing:
    """`ping -i 0.05` from a pod for as long as it runs: proof that no packet was lost."""

    def __init__(self, netns: str, address: str) -> None:
        self.address = address
        self._proc = subprocess.Popen(
            ["ip", "netns", "exec", netns, "ping", "-i", "0.05", "-W", "1", address],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip

    def stop(self) -> tuple[int, int]:
        """(transmitted, received)."""
        self._proc.send_signal(signal.SIGINT)
        try:
            out, _ = self._proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            out, _ = self._proc.communicate(timeout=10)
        m = re.search(r"(\d+) packets transmitted, (\d+) received", out or "")
        assert m, out
        return int(m.group(1)), int(m.group(2))


def wait(check: Callable[[], list[str]], what: str, timeout: float = CONVERGE) -> None:
    eventually(check, timeout, what)


def settle(seconds: float) -> None:
    time.sleep(seconds)


def kernel(lab: InteropLab, node: str) -> dict[str, str]:
    """All routes of a router's main table: destination -> `via A[,B]`, `dev X` or the type
    (`blackhole`, `unreachable`)."""
    out = host.ip("-n", lab.netns(node), "-j", "route", "show")
    table = {}
    for r in json.loads(out) if out.strip() else []:
        hops = r.get("nexthops") or ([r] if "gateway" in r else [])
        table[r["dst"]] = (
            "via " + ",".join(sorted(h["gateway"] for h in hops))
            if hops
            else f"dev {r['dev']}"
            if "dev" in r
            else str(r.get("type"))
        )
    return table
