"""The routing controller with an overlay (fake devices, fake FIB): learned routes follow
their pool's mode, change with it, and are refused while their encapsulation is
unavailable."""

from __future__ import annotations

import asyncio
import dataclasses
from ipaddress import IPv4Interface
from typing import Any

from rich.console import Console

from bgp_speaker.bgp.routes import KernelRoute, NextHop
from bgp_speaker.overlay.encap import IPIP_DEVICE, VXLAN_DEVICE, Encap, EncapPolicy, PoolEncap
from ipam_blocks.model import EncapMode
from l3fabric.views.node_status import render_node_status
from tests.fabric.test_graceful_restart import BLOCK_1, LEARNED, PEER, POOL, controller, feed
from tests.reflection.doubles import FakeOverlay


def policy(ipip: str = "Never", vxlan: str = "Never") -> EncapPolicy:
    pool = PoolEncap(POOL, "default", EncapMode(ipip), EncapMode(vxlan))
    return EncapPolicy((pool,), IPv4Interface("10.0.0.11/24"))


def scenario(available: frozenset[Encap], *steps: EncapPolicy) -> list[Any]:
    """Learn BLOCK_1 from PEER, then apply each policy; the FIB's route after each."""

    async def run() -> list[Any]:
        routing, fib = controller(120, overlay=FakeOverlay(available))
        out = []
        await feed(routing, *LEARNED)
        for step in steps:
            await routing.kernel.program(await routing.kernel.reconcile_overlay(step))
            out.append(fib.routes.get(BLOCK_1))
        routing.tasks.cancel()
        return out

    return asyncio.run(run())


def test_routes_follow_the_pool_mode_both_ways() -> None:
    plain = KernelRoute(BLOCK_1, (NextHop(PEER),))
    ipip = KernelRoute(BLOCK_1, (NextHop(PEER, IPIP_DEVICE, True),))
    vxlan = KernelRoute(BLOCK_1, (NextHop(PEER, VXLAN_DEVICE, True),))
    assert scenario(
        frozenset(Encap),
        policy(),
        policy(ipip="Always"),
        policy(vxlan="Always"),
        policy(vxlan="CrossSubnet"),  # the peer is on our subnet: plain again
        policy(),
    ) == [plain, ipip, vxlan, plain, plain]


def test_an_unavailable_mode_is_refused_not_installed_broken() -> None:
    # This kernel has no IPIP: the route goes (no route beats one into a missing tunnel).
    assert scenario(frozenset({Encap.VXLAN}), policy(), policy(ipip="Always"), policy()) == [
        KernelRoute(BLOCK_1, (NextHop(PEER),)),
        None,
        KernelRoute(BLOCK_1, (NextHop(PEER),)),
    ]


def test_cross_subnet_next_hops_only_are_refused() -> None:
    far = dataclasses.replace(policy(ipip="CrossSubnet"), node_address=IPv4Interface("10.9.0.1/24"))
    near = policy(ipip="CrossSubnet")
    assert scenario(frozenset(), near, far) == [KernelRoute(BLOCK_1, (NextHop(PEER),)), None]


def test_status_and_pod_mtu_come_from_the_overlay() -> None:
    plain, _ = controller(120)
    assert plain.pod_mtu() is None
    routing, _ = controller(120, overlay=FakeOverlay(frozenset()))
    assert routing.pod_mtu() == 1480
    assert asyncio.run(routing.status())["overlay"] == {"available": []}


def test_node_status_shows_the_overlay_and_what_is_unavailable() -> None:
    status = {
        "node": "n1", "router_id": "10.0.0.11", "peers": [], "exported": [],
        "routes_installed": 0, "dropped_by_policy": {}, "speaker_restarts": 0,
        "overlay": {
            "devices": {"vxlan.l3f": 1450}, "pod_mtu": 1450, "nat": {"enabled": True},
            "unavailable": {"ipip": "this kernel has no IP-in-IP support"}, "errors": {},
        },
    }  # fmt: skip
    console = Console(record=True, width=200)
    console.print(render_node_status(status, now=0.0))
    text = console.export_text()
    assert "encapsulation: vxlan.l3f mtu 1450" in text and "pod MTU 1450" in text
    assert "natOutgoing on" in text
    assert "ipip UNAVAILABLE: this kernel has no IP-in-IP support" in text
