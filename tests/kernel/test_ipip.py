"""IP-in-IP on a kernel that has it (DESIGN §8: run inside a throw-away VM by test_vm.py).

The two-subnets topology (n1, n2 on 10.0.1.0/24; n3 on 10.0.2.0/24 behind the plain router
r1) realised by the lab code, with three real routing controllers — real FIB, real tunnel
devices and tunnel-address allocation, real store — whose BGP is the in-process `mesh`
(ExaBGP would take minutes to start in the emulated guest). Checked: routes via tunl0
onlink per mode, tunl0 itself (up, MTU, its own pool address held by a Tunnel handle), pod
MTU, the outer and inner addresses on the wire, that the subnet stays plain under
CrossSubnet, that the node's own traffic leaves from its tunnel address and gets answers,
and that switching the mode off takes every tunl0 route, the address and the device state
back.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest
import yaml
from netaddr import IPNetwork

from bgp_speaker.kernel.fib import Fib
from bgp_speaker.overlay.dataplane import Overlay
from bgp_speaker.overlay.encap import IPIP_DEVICE, ipip_tunnel_handle
from bgp_speaker.overlay.nat import NatTable
from bgp_speaker.overlay.tunnels import EncapFib, Tunnels
from bgp_speaker.pods import dataplane
from bgp_speaker.routing.controller import RoutingController
from ipam_blocks import block as blockmath
from ipam_blocks.allocator import IPAM, AssignRequest
from ipam_blocks.errors import NotFound
from ipam_blocks.model import (
    AllocationType,
    EncapMode,
    IPPool,
    Node,
    block_name,
    parse_block,
    parse_handle,
)
from ipam_blocks.pools import add_node, add_pool
from ipam_blocks.store import open_store
from l3fabric.lab.realise import bring_up, tear_down
from l3fabric.lab.topology import parse_topology
from tests.capture import capture
from tests.kernel.mesh import Mesh
from tests.reflection.doubles import FakeReflector

REPO = Path(__file__).resolve().parents[2]
ADDRESS = {"n1": "10.0.1.11", "n2": "10.0.1.12", "n3": "10.0.2.13"}
PODS = {"n1": "p1", "n2": "p2", "n3": "p3"}
TIMEOUT = 60.0


def kernel_has_ipip() -> bool:
    ns = f"l3k-probe-{os.getpid()}"
    if subprocess.run(["ip", "netns", "add", ns], capture_output=True).returncode != 0:
        return False
    try:
        done = subprocess.run(["ip", "-n", ns, "link", "add", "probe0", "type", "ipip",
                               "remote", "192.0.2.1", "local", "192.0.2.2"],
                              capture_output=True, check=False)  # fmt: skip
        return done.returncode == 0
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


pytestmark = [
    pytest.mark.root,
    pytest.mark.kernel,
    pytest.mark.skipif(
        os.geteuid() != 0 or any(shutil.which(t) is None for t in ("ip", "ping", "tcpdump")),
        reason="needs root, iproute2, ping and tcpdump",
    ),
    pytest.mark.skipif(
        not kernel_has_ipip(),
        reason="this kernel has no IP-in-IP; tests/kernel/test_vm.py runs these in a VM",
    ),
]


def sh(*args: str, timeout: float = 20) -> str:
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, f"{' '.join(args)}: {done.stderr.strip()}"
    return done.stdout


def eventually(check: Callable[[], list[str]], what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while problems := check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {problems[:10]}"
        time.sleep(0.1)


@dataclass
class KernelFabric:
    lab: str
    store_url: str
    loop: asyncio.AbstractEventLoop
    controllers: dict[str, RoutingController] = field(default_factory=dict)
    pods: dict[str, str] = field(default_factory=dict)  # pod -> address

    def netns(self, node: str) -> str:
        return f"{self.lab}-{node}"

    def on_loop(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` on the controllers' loop, awaited when it is a coroutine function."""

        async def call() -> Any:
            result = fn()
            return await result if inspect.isawaitable(result) else result

        return asyncio.run_coroutine_threadsafe(call(), self.loop).result(10)

    def set_pool(self, mode: str) -> None:
        store = open_store(self.store_url)
        try:
            res = store.get("IPPool", "default")
            store.update(res.with_spec({**res.spec, "ipipMode": mode}))
        finally:
            store.close()

    def routes(self, node: str) -> dict[str, tuple[str, str, bool]]:
        out = json.loads(sh("ip", "-n", self.netns(node), "-j", "route", "show", "proto", "77"))
        return {
            r["dst"]: (r.get("gateway", ""), r.get("dev", ""), "onlink" in r.get("flags", []))
            for r in out
            if r.get("type") != "blackhole"
        }

    def block_of(self, node: str) -> str:
        return str(IPNetwork(f"{self.pods[PODS[node]]}/26").cidr)

    def expected(self, node: str, mode: str) -> dict[str, tuple[str, str, bool]]:
        out = {}
        for other in ADDRESS:
            if other == node:
                continue
            cross = ADDRESS[other].startswith("10.0.2.") != ADDRESS[node].startswith("10.0.2.")
            if mode == "Always" or (mode == "CrossSubnet" and cross):
                out[self.block_of(other)] = (ADDRESS[other], IPIP_DEVICE, True)
            elif not cross:
                out[self.block_of(other)] = (ADDRESS[other], "eth1", False)
        return out

    def wait_routes(self, mode: str) -> None:
        eventually(
            lambda: [
                f"{n}: {self.routes(n)} want {self.expected(n, mode)}"
                for n in ADDRESS
                if self.routes(n) != self.expected(n, mode)
            ],
            f"the routes of mode {mode}",
        )

    def tunl0(self, node: str) -> dict[str, Any]:
        link = json.loads(sh("ip", "-n", self.netns(node), "-j", "-s", "addr", "show", "tunl0"))
        return link[0]

    def tx(self, node: str) -> int:
        return int(self.tunl0(node)["stats64"]["tx"]["packets"])

    def ping(self, netns: str, address: str, count: int = 3) -> None:
        sh("ip", "netns", "exec", netns, "ping", "-c", str(count), "-i", "0.2", "-W", "2",
           address, timeout=30)  # fmt: skip

    def capture(
        self, netns: str, device: str, bpf: str
    ) -> contextlib.AbstractContextManager[list[str]]:
        # Emulated: tcpdump starts slowly and packets trail.
        return capture(netns, device, bpf, start_timeout=60, settle=1)


def topology(name: str) -> dict[str, Any]:
    """two-subnets with the l3fabric nodes as plain namespaces: this test runs their
    controllers itself."""
    doc = yaml.safe_load((REPO / "tests" / "topologies" / "two-subnets.clab.yml").read_text())
    doc["name"] = name
    for node in ADDRESS:
        spec = doc["topology"]["nodes"][node]
        spec["image"] = "alpine:3.20"
        spec.pop("labels", None)
    return doc


@pytest.fixture(scope="module")
def fabric(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KernelFabric]:
    tmp = tmp_path_factory.mktemp("kernel")
    name = f"kip{os.getpid() % 10000}"
    store_url = f"sqlite:{tmp / 'store.db'}"
    doc = topology(name)
    source = tmp / "topology.clab.yml"
    source.write_text(yaml.safe_dump(doc))
    state_dir = tmp / "lab"
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    fab = KernelFabric(name, store_url, loop)
    pod_netns: list[str] = []
    runs: list[Any] = []
    stop = asyncio.run_coroutine_threadsafe(_event(), loop).result(10)
    try:
        bring_up(parse_topology(doc, tmp), source, state_dir, store_url)
        store = open_store(store_url)
        ipam = IPAM(store)
        add_pool(ipam, IPPool("default", IPNetwork("10.244.0.0/16"), 26,
                              ipip_mode=EncapMode.CROSS_SUBNET))  # fmt: skip
        for node, address in ADDRESS.items():
            add_node(ipam, Node(node, {}, IPNetwork(f"{address}/24")))
            dataplane.enable_host_forwarding(host_netns=f"/run/netns/{fab.netns(node)}")
        mesh = Mesh()
        for node, address in ADDRESS.items():
            ns = fab.netns(node)
            node_store = open_store(store_url)
            tunnels = Tunnels(node, ns, IPAM(node_store))
            speaker = mesh.speaker(IPv4Address(address))
            controller = RoutingController(
                node, node_store, speaker, EncapFib(Fib(netns=ns), tunnels),  # type: ignore[arg-type]
                FakeReflector(), overlay=Overlay(tunnels, NatTable(ns)),
            )  # fmt: skip
            fab.controllers[node] = controller
            runs.append(asyncio.run_coroutine_threadsafe(controller.run(stop), loop))
        # Tunnel addresses first: a pod allocated at the same moment could claim a second
        # block for its node.
        eventually(
            lambda: [
                n for n, c in fab.controllers.items()
                if not (fab.on_loop(c.status)["overlay"] or {}).get("ipip_address")
            ],
            "the overlays and their tunnel addresses",
        )  # fmt: skip
        for node, pod in PODS.items():
            ns = f"{name}-{pod}"
            sh("ip", "netns", "add", ns)
            pod_netns.append(ns)
            [ip] = ipam.auto_assign(AssignRequest(node, f"kernel.{pod}", pod=pod,
                                                  namespace="default"))  # fmt: skip
            mtu = fab.on_loop(fab.controllers[node].pod_mtu)
            dataplane.attach_pod(f"/run/netns/{ns}", "eth0", dataplane.host_veth_name("k", pod),
                                 [ip], mtu, host_netns=f"/run/netns/{fab.netns(node)}")  # fmt: skip
            fab.pods[pod] = str(ip)
        store.close()
        yield fab
    finally:
        loop.call_soon_threadsafe(stop.set)
        for run in runs:
            with contextlib.suppress(Exception):
                run.result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        for ns in pod_netns:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        if (state_dir / "state.json").exists():
            tear_down(state_dir)


async def _event() -> asyncio.Event:
    return asyncio.Event()


def test_cross_subnet_routes_go_onlink_through_tunl0(fabric: KernelFabric) -> None:
    fabric.wait_routes("CrossSubnet")
    store = open_store(fabric.store_url)
    try:
        handle = parse_handle(store.get("IPAMHandle", ipip_tunnel_handle("n1")))
        [cidr] = handle.blocks
        block = parse_block(store.get("IPAMBlock", block_name(IPNetwork(cidr))))
    finally:
        store.close()
    tunl0 = fabric.tunl0("n1")
    assert "UP" in tunl0["flags"] and tunl0["mtu"] == 1480
    [address] = [a["local"] for a in tunl0["addr_info"] if a["family"] == "inet"]
    held = [a for ip, a, _ in blockmath.allocated(block) if str(ip) == address]
    assert held and held[0].type is AllocationType.TUNNEL, block
    assert address in IPNetwork(fabric.block_of("n1"))  # inside n1's exported block
    for node in ADDRESS:
        assert fabric.on_loop(fabric.controllers[node].pod_mtu) == 1480
        assert json.loads(sh("ip", "-n", f"{fabric.lab}-{PODS[node]}", "-j", "link", "show",
                             "eth0"))[0]["mtu"] == 1480  # fmt: skip


def test_packets_carry_node_addresses_outside_pod_addresses_inside(fabric: KernelFabric) -> None:
    fabric.wait_routes("CrossSubnet")
    p1, p2, p3 = fabric.pods["p1"], fabric.pods["p2"], fabric.pods["p3"]
    with fabric.capture(f"{fabric.lab}-r1", "eth2", "ip proto 4") as wire:
        fabric.ping(f"{fabric.lab}-p1", p3)
    request = re.compile(
        rf"IP {ADDRESS['n1']} > {ADDRESS['n3']}: IP {re.escape(p1)} > {re.escape(p3)}: "
        "ICMP echo request"
    )
    reply = re.compile(
        rf"IP {ADDRESS['n3']} > {ADDRESS['n1']}: IP {re.escape(p3)} > {re.escape(p1)}: "
        "ICMP echo reply"
    )
    assert any(request.search(x) for x in wire), wire
    assert any(reply.search(x) for x in wire), wire

    # Beside the subnet nothing is encapsulated.
    before = fabric.tx("n1")
    fabric.ping(f"{fabric.lab}-p1", p2)
    assert fabric.tx("n1") == before

    # The node's own packets to a remote pod leave from its tunnel address, and come back.
    tunnel = next(a["local"] for a in fabric.tunl0("n1")["addr_info"] if a["family"] == "inet")
    with fabric.capture(f"{fabric.lab}-r1", "eth2", "ip proto 4") as wire:
        fabric.ping(fabric.netns("n1"), p3)
    assert any(f"IP {tunnel} > {p3}: ICMP echo request" in x for x in wire), wire
    assert any(f"IP {p3} > {tunnel}: ICMP echo reply" in x for x in wire), wire


def test_always_encapsulates_beside_the_subnet_too(fabric: KernelFabric) -> None:
    fabric.set_pool("Always")
    fabric.wait_routes("Always")
    p1, p2 = fabric.pods["p1"], fabric.pods["p2"]
    before = fabric.tx("n1")
    with fabric.capture(fabric.netns("n2"), "eth1", "ip proto 4") as wire:
        fabric.ping(f"{fabric.lab}-p1", p2)
    assert fabric.tx("n1") - before >= 3
    assert any(
        f"IP {ADDRESS['n1']} > {ADDRESS['n2']}: IP {p1} > {p2}: ICMP echo request" in x
        for x in wire
    ), wire


def test_never_takes_the_tunnel_back(fabric: KernelFabric) -> None:
    fabric.set_pool("Never")
    fabric.wait_routes("Never")
    for node in ADDRESS:
        tunl0 = fabric.tunl0(node)
        assert "UP" not in tunl0["flags"], tunl0
        assert not [a for a in tunl0["addr_info"] if a["family"] == "inet"], tunl0
    store = open_store(fabric.store_url)
    try:
        with pytest.raises(NotFound):
            store.get("IPAMHandle", ipip_tunnel_handle("n1"))
    finally:
        store.close()
    fabric.ping(f"{fabric.lab}-p1", fabric.pods["p2"])  # the subnet still works, plain
