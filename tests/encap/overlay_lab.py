"""The shipped two-subnets topology as a fabric for overlay tests (helpers, no tests).

n1 and n2 share 10.0.1.0/24, n3 sits on 10.0.2.0/24 behind the plain router r1, and ext
(203.0.113.10) routes back to the node subnets only. `OverlayFabric` adds to the mesh3
harness what the overlay tests look at: pool modes, kernel routes with their devices,
interface counters, captures.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
from typing import Any

import yaml

from l3fabric.lab import host
from tests.capture import capture
from tests.fabric.harness import Fabric, eventually
from tests.lab.harness import REPO, in_netns

TWO_SUBNETS = REPO / "tests" / "topologies" / "two-subnets.clab.yml"
NODES = ("n1", "n2", "n3")
ADDRESS = {"n1": "10.0.1.11", "n2": "10.0.1.12", "n3": "10.0.2.13"}
SUBNET = {"n1": "a", "n2": "a", "n3": "b"}
EXTERNAL = "203.0.113.10"
CONVERGE = 60.0


def two_subnets_document() -> dict[str, Any]:
    return yaml.safe_load(TWO_SUBNETS.read_text())


class OverlayFabric:
    def __init__(self, fabric: Fabric) -> None:
        self.fabric = fabric

    def __getattr__(self, name: str) -> Any:
        return getattr(self.fabric, name)

    # --- the store -------------------------------------------------------------------------

    def set_pool(self, **spec: Any) -> None:
        with self.fabric.store() as store:
            res = store.get("IPPool", "default")
            store.update(res.with_spec({**res.spec, **spec}))

    def block_of(self, node: str) -> str:
        blocks = self.fabric.blocks()[node]
        assert len(blocks) == 1, blocks
        return next(iter(blocks))

    # --- what the nodes show ---------------------------------------------------------------

    def routes(self, node: str) -> dict[str, tuple[str, str, bool]]:
        """Protocol-77 unicast routes: destination -> (gateway, device, onlink)."""
        return {
            r["dst"]: (r.get("gateway", ""), r.get("dev", ""), "onlink" in r.get("flags", []))
            for r in self.fabric.kernel_routes(node)
            if r.get("type") != "blackhole"
        }

    def expected(self, node: str, mode: str, device: str) -> dict[str, tuple[str, str, bool]]:
        """Routes to the other nodes' blocks under one pool mode for every pool."""
        out = {}
        for other in NODES:
            if other == node:
                continue
            encap = mode == "Always" or (mode == "CrossSubnet" and SUBNET[other] != SUBNET[node])
            route = (ADDRESS[other], device, True) if encap else (ADDRESS[other], "eth1", False)
            out[self.block_of(other)] = route
        return out

    def overlay(self, node: str) -> dict[str, Any]:
        return self.fabric.status(node)["overlay"] or {}

    def sessions_up(self) -> list[str]:
        out = []
        for node in NODES:
            try:
                peers = self.fabric.peers(node)
            except Exception as err:
                out.append(f"{node}: no status ({err})")
                continue
            want = {ADDRESS[n] for n in NODES if n != node}
            if set(peers) != want:
                out.append(f"{node}: peers {sorted(peers)}")
            out += [f"{node}: {a} {p['state']}" for a, p in peers.items()
                    if p["state"] != "established"]  # fmt: skip
        return out

    def wait_routes(self, want: dict[str, dict[str, tuple[str, str, bool]]], what: str) -> None:
        def check() -> list[str]:
            return [
                f"{node}: {self.routes(node)}, want {routes}"
                for node, routes in want.items()
                if self.routes(node) != routes
            ]

        eventually(check, CONVERGE, what)

    def counters(self, node: str, device: str) -> tuple[int, int]:
        """(tx, rx) packets of a device in the node's namespace (0, 0 if it is absent)."""
        done = subprocess.run(
            ["ip", "-n", self.fabric.netns(node), "-j", "-s", "link", "show", device],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            return 0, 0
        stats = json.loads(done.stdout)[0]["stats64"]
        return stats["tx"]["packets"], stats["rx"]["packets"]

    def mtu(self, netns: str, device: str) -> int:
        return int(json.loads(host.ip("-n", netns, "-j", "link", "show", device))[0]["mtu"])

    # --- traffic ---------------------------------------------------------------------------

    def pings(self, pod: str, address: str, count: int = 3) -> bool:
        done = in_netns(self.fabric.pod_netns(pod), "ping", "-c", str(count), "-i", "0.2",
                        "-W", "1", address, timeout=count + 10)  # fmt: skip
        return done.returncode == 0

    def unreachable(self, pod: str, address: str) -> bool:
        """Two pings, none answered."""
        done = in_netns(self.fabric.pod_netns(pod), "ping", "-c", "2", "-i", "0.2", "-W", "1",
                        address, timeout=10)  # fmt: skip
        return " 0 received" in done.stdout

    def capture(
        self, netns: str, device: str, bpf: str
    ) -> contextlib.AbstractContextManager[list[str]]:
        """tcpdump lines seen on `device` in `netns` while the block runs."""
        return capture(netns, device, bpf)
