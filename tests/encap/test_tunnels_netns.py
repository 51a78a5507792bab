"""Tunnel devices, VTEP entries and NAT rules against the real kernel, in namespaces of our
own (bgp_speaker.overlay.tunnels, bgp_speaker.overlay.nat).
IP-in-IP needs the `ipip` module, which this
machine's kernel lacks: here its refusal is checked; tests/kernel runs the real thing."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from ipaddress import IPv4Address, IPv4Interface, ip_network

import pytest

from bgp_speaker.bgp.routes import KernelRoute, NextHop
from bgp_speaker.kernel.fib import Fib
from bgp_speaker.overlay.dataplane import Overlay
from bgp_speaker.overlay.encap import (
    IPIP_DEVICE,
    VXLAN_DEVICE,
    Encap,
    EncapPolicy,
    PoolEncap,
    VxlanSettings,
)
from bgp_speaker.overlay.nat import NatTable
from bgp_speaker.overlay.tunnels import EncapFib, Tunnels
from ipam_blocks.model import EncapMode

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("bridge") is None,
        reason="needs root and iproute2",
    ),
]

NODE = IPv4Interface("10.0.1.11/24")
PEER_A, PEER_B = IPv4Address("10.0.2.13"), IPv4Address("10.0.3.14")
POOL = ip_network("10.244.0.0/16")
_names = itertools.count()


def sh(*args: str) -> str:
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"{' '.join(args)}: {done.stderr.strip()}"
    return done.stdout


def kernel_has_ipip() -> bool:
    ns = f"l3t-ipip-{os.getpid()}"
    sh("ip", "netns", "add", ns)
    try:
        return subprocess.run(["ip", "-n", ns, "link", "add", "probe0", "type", "ipip",
                               "remote", "192.0.2.1", "local", "192.0.2.2"],
                              capture_output=True, check=False).returncode == 0  # fmt: skip
    finally:
        sh("ip", "netns", "del", ns)


@contextmanager
def node_netns(address: str, device: str) -> Iterator[str]:
    """A namespace with an uplink eth1 of MTU 1400 and the node's `address` on `device`."""
    ns = f"l3t-tun-{os.getpid()}-{next(_names)}"
    sh("ip", "netns", "add", ns)
    try:
        sh("ip", "-n", ns, "link", "add", "eth1", "mtu", "1400", "type", "veth", "peer", "eth2")
        sh("ip", "-n", ns, "addr", "add", address, "dev", device)
        for dev in ("eth1", "eth2", "lo"):
            sh("ip", "-n", ns, "link", "set", dev, "up")
        yield ns
    finally:
        sh("ip", "netns", "del", ns)


@pytest.fixture
def netns() -> Iterator[str]:
    """The node's address on the uplink."""
    with node_netns(str(NODE), "eth1") as ns:
        yield ns


@pytest.fixture
def loopback_node_netns() -> Iterator[str]:
    """The node's address on lo (as /32, BGP-unnumbered style), its traffic out of eth1."""
    with node_netns(f"{NODE.ip}/32", "lo") as ns:
        yield ns


def policy(ipip: str = "Never", vxlan: str = "Never", vni: int = 4096) -> EncapPolicy:
    pool = PoolEncap(POOL, "default", EncapMode(ipip), EncapMode(vxlan))
    return EncapPolicy((pool,), NODE, VxlanSettings(vni, 4789))


def link(ns: str, name: str) -> dict | None:
    out = subprocess.run(["ip", "-n", ns, "-d", "-j", "link", "show", name],
                         capture_output=True, text=True, check=False)  # fmt: skip
    return json.loads(out.stdout)[0] if out.returncode == 0 else None


def entries(ns: str) -> tuple[set[tuple[str, str]], set[tuple[str, str]]]:
    neigh = json.loads(sh("ip", "-n", ns, "-j", "neigh", "show", "dev", VXLAN_DEVICE))
    fdb = json.loads(sh("bridge", "-n", ns, "-j", "fdb", "show", "dev", VXLAN_DEVICE))
    return (
        {(n["dst"], n["lladdr"]) for n in neigh if "PERMANENT" in n.get("state", [])},
        {(f["dst"], f["mac"]) for f in fdb if f.get("dst")},
    )


def test_vxlan_device_follows_the_policy(netns: str) -> None:
    tunnels = Tunnels("n1", netns)
    status = tunnels.reconcile(policy(vxlan="CrossSubnet"))
    assert status.available == {Encap.VXLAN}
    assert status.underlay_mtu == 1400
    dev = link(netns, VXLAN_DEVICE)
    assert dev is not None
    data = dev["linkinfo"]["info_data"]
    assert (data["id"], data["port"], data["local"], data.get("learning")) == (
        4096, 4789, "10.0.1.11", False,
    )  # fmt: skip
    assert dev["address"] == "0e:4c:0a:00:01:0b"  # derived from 10.0.1.11
    assert dev["mtu"] == 1350 and "UP" in dev["flags"]
    index = dev["ifindex"]

    # Unchanged policy: left alone. Another VNI: replaced (a new index).
    generation = tunnels.generation
    tunnels.reconcile(policy(vxlan="CrossSubnet"))
    assert link(netns, VXLAN_DEVICE)["ifindex"] == index  # type: ignore[index]
    assert tunnels.generation == generation
    tunnels.reconcile(policy(vxlan="Always", vni=77))
    replaced = link(netns, VXLAN_DEVICE)
    assert replaced is not None and replaced["linkinfo"]["info_data"]["id"] == 77
    assert tunnels.generation > generation

    # No pool wants it: gone.
    assert tunnels.reconcile(policy()).available == frozenset()
    assert link(netns, VXLAN_DEVICE) is None


def test_vtep_entries_follow_the_routes_that_use_them(netns: str) -> None:
    tunnels = Tunnels("n1", netns)
    tunnels.reconcile(policy(vxlan="Always"))
    fib = EncapFib(Fib(netns=netns), tunnels)
    try:
        block_a, block_b = ip_network("10.244.1.0/26"), ip_network("10.244.2.0/26")
        route_a = KernelRoute(block_a, (NextHop(PEER_A, VXLAN_DEVICE, True),))
        route_b = KernelRoute(block_b, (NextHop(PEER_B, VXLAN_DEVICE, True),))
        fib.dump()
        fib.apply([route_a, route_b], [])
        mac_a, mac_b = "0e:4c:0a:00:02:0d", "0e:4c:0a:00:03:0e"
        want = {("10.0.2.13", mac_a), ("10.0.3.14", mac_b)}
        assert entries(netns) == (want, want)
        routes = sh("ip", "-n", netns, "route", "show", "proto", "77")
        assert "10.244.1.0/26 via 10.0.2.13 dev vxlan.l3f onlink" in routes

        fib.apply([], [block_b])
        assert entries(netns) == ({("10.0.2.13", mac_a)},) * 2
        # A replaced device loses its entries: the next reconcile puts them back, and the
        # FIB resolves the new device's index for the routes.
        tunnels.reconcile(policy(vxlan="Always", vni=99))
        assert entries(netns) == ({("10.0.2.13", mac_a)},) * 2
        fib.apply([route_b], [])
        assert "10.244.2.0/26 via 10.0.3.14 dev vxlan.l3f onlink" in sh(
            "ip", "-n", netns, "route", "show", "proto", "77"
        )
        fib.reconcile({})
        assert entries(netns) == (set(), set())
    finally:
        fib.close()


def test_ipip_is_refused_with_a_reason_when_the_kernel_lacks_it(netns: str) -> None:
    tunnels = Tunnels("n1", netns)
    status = tunnels.reconcile(policy(ipip="Always"))
    if kernel_has_ipip():
        assert status.available == {Encap.IPIP}
        dev = link(netns, IPIP_DEVICE)
        assert dev is not None and dev["mtu"] == 1380 and "UP" in dev["flags"]
        return
    assert status.available == frozenset()
    assert "no IP-in-IP support" in status.unavailable["ipip"]
    assert link(netns, IPIP_DEVICE) is None
    assert status.to_dict()["unavailable"] == dict(status.unavailable)


def nft(ns: str, *args: str) -> str:
    return sh("ip", "netns", "exec", ns, "nft", *args)


@pytest.mark.skipif(shutil.which("nft") is None, reason="needs nft (nftables)")
def test_nat_rules_are_levelled_and_repaired(netns: str) -> None:
    nat = NatTable(netns)
    nft(netns, "add", "table", "ip", "operator")  # someone else's: never touched
    assert nat.reconcile(policy().pools) is False  # nothing wanted, nothing there
    pools = (PoolEncap(POOL, "default", nat_outgoing=True),)
    assert nat.reconcile(pools) is True
    listed = nft(netns, "list", "table", "inet", "l3fabric")
    assert "ip saddr @nat-pools4 ip daddr != @all-pools4 masquerade" in listed
    assert nat.reconcile(pools) is False  # unchanged: no write

    nft(netns, "flush", "chain", "inet", "l3fabric", "nat-outgoing")  # tampered with
    assert nat.reconcile(pools) is True
    assert "masquerade" in nft(netns, "list", "table", "inet", "l3fabric")

    assert nat.reconcile((PoolEncap(POOL, "default"),)) is True  # natOutgoing off: removed
    ruleset = nft(netns, "list", "ruleset")
    assert "l3fabric" not in ruleset and "table ip operator" in ruleset


def test_a_node_address_on_lo_takes_the_mtu_of_the_device_traffic_leaves_by(
    loopback_node_netns: str,
) -> None:
    ns = loopback_node_netns
    overlay = Overlay(Tunnels("n1", ns))
    # No default route: nothing says which device carries traffic, so no MTU is guessed
    # (the agent then uses --mtu or its default); never lo's 65536.
    overlay.reconcile(policy())
    assert overlay.tunnels.status.underlay_mtu is None and overlay.pod_mtu() is None

    sh("ip", "-n", ns, "route", "add", "default", "dev", "eth1")
    overlay.reconcile(policy(vxlan="Always"))
    status = overlay.tunnels.status
    assert (status.underlay_mtu, status.underlay_source) == (
        1400,
        "eth1, the default route's device",
    )
    assert overlay.pod_mtu() == 1350
