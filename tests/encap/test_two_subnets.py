"""Overlays end to end on the shipped two-subnets topology: n1 and n2 share a subnet, n3 is
behind a plain router that knows no pod routes, ext is "the world" with no route to pods.

One lab serves the module; each test sets the pool mode it needs first. Pods: a1 (n1), a2
(n2), b1 (n3).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from bgp_speaker.overlay.encap import IPIP_DEVICE, VXLAN_DEVICE
from tests.encap.overlay_lab import (
    ADDRESS,
    CONVERGE,
    EXTERNAL,
    NODES,
    OverlayFabric,
    two_subnets_document,
)
from tests.fabric.harness import eventually, needs_fabric, running_lab

pytestmark = [pytest.mark.root, pytest.mark.slow, needs_fabric]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OverlayFabric]:
    tmp = tmp_path_factory.mktemp("two-subnets")
    with running_lab(tmp, two_subnets_document(), nodes=NODES) as fabric:
        net = OverlayFabric(fabric)
        eventually(net.sessions_up, CONVERGE, "sessions across the router")
        for node, pod in (("n1", "a1"), ("n2", "a2"), ("n3", "b1")):
            fabric.add_pod(node, pod)
        yield net


def pod_ip(lab: OverlayFabric, pod: str) -> str:
    return lab.pods[pod][1]


def test_never_leaves_cross_subnet_pods_unreachable(lab: OverlayFabric) -> None:
    lab.set_pool(ipipMode="Never", vxlanMode="Never", natOutgoing=False)
    # Same subnet: plain routes. Across the router: the kernel refuses a route via a next hop
    # that is not on a connected subnet, and r1 knows nothing of pods.
    lab.wait_routes(
        {
            "n1": {lab.block_of("n2"): (ADDRESS["n2"], "eth1", False)},
            "n3": {},
        },
        "plain routes on the shared subnet only",
    )
    assert lab.pings("a1", pod_ip(lab, "a2"))
    assert lab.unreachable("a1", pod_ip(lab, "b1"))
    assert lab.unreachable("b1", pod_ip(lab, "a2"))


def test_vxlan_cross_subnet_reaches_across_and_leaves_the_subnet_plain(
    lab: OverlayFabric,
) -> None:
    lab.set_pool(ipipMode="Never", vxlanMode="CrossSubnet")
    lab.wait_routes(
        {n: lab.expected(n, "CrossSubnet", VXLAN_DEVICE) for n in NODES},
        "VXLAN routes across the router, plain ones beside it",
    )
    for node in NODES:
        overlay = lab.overlay(node)
        assert overlay["available"] == ["vxlan"] and overlay["unavailable"] == {}, overlay
        assert overlay["devices"] == {VXLAN_DEVICE: 1450}
        assert overlay["pod_mtu"] == 1450
    assert lab.pings("a1", pod_ip(lab, "b1"))
    assert lab.pings("b1", pod_ip(lab, "a2"))

    # Same-subnet traffic is not encapsulated: n1's VXLAN device does not count it...
    before = lab.counters("n1", VXLAN_DEVICE)
    assert lab.pings("a1", pod_ip(lab, "a2"), count=5)
    assert lab.counters("n1", VXLAN_DEVICE) == before
    # ...cross-subnet traffic is, both ways, and it crosses r1 as UDP to port 4789 between
    # the node addresses, the pods' addresses inside.
    with lab.capture(lab.netns("r1"), "eth2", "udp port 4789") as seen:
        assert lab.pings("a1", pod_ip(lab, "b1"), count=5)
    tx, rx = lab.counters("n1", VXLAN_DEVICE)
    assert tx - before[0] >= 5 and rx - before[1] >= 5
    outer = f"{ADDRESS['n1']}.* > {ADDRESS['n3']}.4789: VXLAN"
    inner = f"{pod_ip(lab, 'a1')} > {pod_ip(lab, 'b1')}: ICMP echo request"
    assert any(_matches(line, outer) for line in seen), seen
    assert any(inner in line for line in seen), seen

    # Pods started now get the encapsulation's MTU (the CNI config names none).
    lab.add_pod("n1", "a3")
    assert lab.mtu(lab.pod_netns("a3"), "eth0") == 1450
    assert lab.pings("a3", pod_ip(lab, "b1"))


def test_vxlan_always_encapsulates_on_the_subnet_too(lab: OverlayFabric) -> None:
    lab.set_pool(ipipMode="Never", vxlanMode="Always")
    lab.wait_routes({n: lab.expected(n, "Always", VXLAN_DEVICE) for n in NODES}, "VXLAN Always")
    before = lab.counters("n1", VXLAN_DEVICE)
    assert lab.pings("a1", pod_ip(lab, "a2"), count=3)
    assert lab.counters("n1", VXLAN_DEVICE)[0] - before[0] >= 3


def test_ipip_is_refused_on_a_kernel_without_it(lab: OverlayFabric) -> None:
    if lab.overlay("n1").get("available") == ["ipip"]:
        pytest.skip("this kernel has IP-in-IP (tests/kernel covers it)")
    lab.set_pool(ipipMode="CrossSubnet", vxlanMode="Never")

    def refused() -> list[str]:
        return [
            f"{n}: {lab.overlay(n)}"
            for n in NODES
            if "no IP-in-IP support" not in lab.overlay(n).get("unavailable", {}).get("ipip", "")
        ]

    eventually(refused, CONVERGE, "every agent to report IP-in-IP unavailable")
    # No broken route anywhere: the same-subnet route stays plain, the cross-subnet ones
    # (which need the tunnel) are not installed, and nothing points at a tunl0.
    lab.wait_routes(
        {
            "n1": {lab.block_of("n2"): (ADDRESS["n2"], "eth1", False)},
            "n2": {lab.block_of("n1"): (ADDRESS["n1"], "eth1", False)},
            "n3": {},
        },
        "only the routes that need no tunnel",
    )
    assert all(IPIP_DEVICE not in str(lab.kernel_routes(n)) for n in NODES)
    assert lab.overlay("n1")["ipip_address"] is None  # no tunnel address taken for nothing
    assert lab.pings("a1", pod_ip(lab, "a2"))


def test_nat_outgoing_lets_pods_out_and_never_nats_pod_traffic(lab: OverlayFabric) -> None:
    lab.set_pool(ipipMode="Never", vxlanMode="CrossSubnet", natOutgoing=False)
    lab.wait_routes({n: lab.expected(n, "CrossSubnet", VXLAN_DEVICE) for n in NODES}, "VXLAN")
    # ext has no route to pods: without NAT its answers never come back.
    assert lab.unreachable("a1", EXTERNAL)

    lab.set_pool(natOutgoing=True)
    eventually(
        lambda: [n for n in NODES if not (lab.overlay(n).get("nat") or {}).get("enabled")],
        CONVERGE,
        "natOutgoing rules on every node",
    )
    with lab.capture(lab.netns("ext"), "eth1", "icmp") as at_ext:
        assert lab.pings("a1", EXTERNAL)
        assert lab.pings("b1", EXTERNAL)
    # ext saw the node addresses, never a pod's.
    assert any(f"{ADDRESS['n1']} > {EXTERNAL}: ICMP echo request" in x for x in at_ext), at_ext
    assert any(f"{ADDRESS['n3']} > {EXTERNAL}: ICMP echo request" in x for x in at_ext), at_ext
    assert not any(pod_ip(lab, "a1") in x for x in at_ext)
    # Pod to pod keeps the pod's source address, on the subnet and across it.
    with lab.capture(lab.pod_netns("b1"), "eth0", "icmp") as at_b1:
        assert lab.pings("a1", pod_ip(lab, "b1"))
        assert lab.pings("a2", pod_ip(lab, "b1"))
    for pod in ("a1", "a2"):
        request = f"{pod_ip(lab, pod)} > {pod_ip(lab, 'b1')}: ICMP echo request"
        assert any(request in x for x in at_b1), at_b1

    lab.set_pool(natOutgoing=False)
    eventually(
        lambda: [n for n in NODES if (lab.overlay(n).get("nat") or {}).get("enabled")],
        CONVERGE,
        "natOutgoing rules gone",
    )
    assert lab.unreachable("a1", EXTERNAL)


def _matches(line: str, pattern: str) -> bool:
    return re.search(pattern, line) is not None
