"""Starting and stopping the routing half of the agent: ExaBGP, BIRD (on a reflector node),
FIB and the controller.

The speaker needs the node's router id and AS number, so routing starts once the node's
Node object has an IPv4 address (the lab and `node add --ipv4` set it; in a cluster the
node annotation does), and stops with the agent, leaving kernel routes in place.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from netaddr import IPNetwork

from bgp_speaker.bgp.config import BGP_CONFIG_NAME, parse_bgp_config
from bgp_speaker.bgp.peering import describe_routes
from bgp_speaker.bgp.sessions import node_address
from bgp_speaker.bird.process import BirdReflector
from bgp_speaker.exabgp.process import ExaBGPSpeaker
from bgp_speaker.kernel.autodetect import detect_ipv4
from bgp_speaker.kernel.fib import Fib
from bgp_speaker.kernel.tcp_md5 import read_md5_counters
from bgp_speaker.overlay.dataplane import Overlay
from bgp_speaker.overlay.nat import NatTable
from bgp_speaker.overlay.tunnels import EncapFib, Tunnels
from bgp_speaker.routing.controller import RoutingController
from ipam_blocks.allocator import IPAM
from ipam_blocks.errors import BeingDeleted, Conflict, L3FabricError, NotFound
from ipam_blocks.model import Node, parse_node
from ipam_blocks.node_labels import label_node_objects
from ipam_blocks.store.base import Store

log = logging.getLogger("l3fabric.agent.routing")

NODE_POLL = 1.0
STATUS_TIMEOUT = 10.0
IDENTITY_WRITE_ATTEMPTS = 5


class RoutingHolder:
    """The running controller, once there is one; what `node status` reads."""

    def __init__(self, node: str) -> None:
        self.node = node
        self.controller: RoutingController | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def status(self) -> dict[str, Any]:
        """Callable from any thread: the controller's state is read on its own loop, where
        nothing changes it mid-read."""
        controller, loop = self.controller, self.loop
        if controller is not None and loop is not None:

            async def snapshot() -> dict[str, Any]:
                return await controller.status()

            return asyncio.run_coroutine_threadsafe(snapshot(), loop).result(STATUS_TIMEOUT)
        return {
            "node": self.node,
            "router_id": None,
            "peers": [],
            "exported": [],
            "routes_installed": 0,
            "dropped_by_policy": {},
            "speaker_restarts": 0,
            "synced": False,
        }

    def pod_mtu(self) -> int | None:
        """The overlay's pod MTU (None: routing not running or the underlay not seen yet).
        Plain attribute reads: safe from the CNI worker threads."""
        controller = self.controller
        return controller.pod_mtu() if controller is not None else None

    def routes(self, prefix: str | None = None) -> dict[str, Any]:
        """`node.routes`: the RIB's accepted paths with their attributes (read on the loop)."""
        controller, loop = self.controller, self.loop
        if controller is None or loop is None:
            return {"routes": []}

        async def snapshot() -> dict[str, Any]:
            return describe_routes(controller.rib, prefix)

        return asyncio.run_coroutine_threadsafe(snapshot(), loop).result(STATUS_TIMEOUT)


def _identity(
    store: Store, node: str, detect: Callable[[], IPNetwork | None] = lambda: None
) -> tuple[Any, int, int] | None:
    """(router id, local AS, listen port) once the node has an address. A node without one
    gets the detected address written to it (in a cluster: its annotation), as Calico does.
    A Node being deleted is leaving: it gets no address and routing does not start."""
    me = _node_with_address(store, node, detect)
    if me is None:
        return None
    try:
        cfg = parse_bgp_config(store.get("BGPConfiguration", BGP_CONFIG_NAME))
    except NotFound:
        cfg = parse_bgp_config(None)
    return node_address(me), me.as_number or cfg.as_number, cfg.listen_port


def _node_with_address(
    store: Store, node: str, detect: Callable[[], IPNetwork | None]
) -> Node | None:
    """The node, once it has an address; writes the detected one to a node without. Other
    controllers write the Node too: a Conflict is re-read and re-applied at once (bounded;
    after that the next poll tries again)."""
    for _ in range(IDENTITY_WRITE_ATTEMPTS):
        try:
            res = store.get("Node", node)
        except NotFound:
            return None
        me = parse_node(res)
        if node_address(me) is not None:
            return me
        detected = detect()
        if detected is None:
            return None
        try:
            me = parse_node(store.update(res.with_spec({**res.spec, "ipv4Address": str(detected)})))
        except Conflict:
            continue  # changed meanwhile (by us or another controller): read it again
        except BeingDeleted:
            log.info("node is being deleted: no address written",
                     extra={"op": "routing", "node": node})  # fmt: skip
            return None
        except NotFound:
            return None
        log.info("detected node address", extra={"op": "routing", "node": node,
                                                 "address": str(detected)})  # fmt: skip
        return me
    return None


async def _label_node_objects(node: str, store: Store, stop: asyncio.Event) -> bool:
    """Label this node's IPAM objects an older release wrote unlabelled, before the caches
    watch them by that label (retried until it works; False: stopped first)."""
    while not stop.is_set():
        try:
            await asyncio.to_thread(label_node_objects, store, node)
            return True
        except L3FabricError as err:
            log.warning("cannot label node objects", extra={"op": "routing", "reason": str(err)})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), NODE_POLL)
    return False


async def run_routing(
    node: str,
    store: Store,
    settings: Any,
    holder: RoutingHolder,
    stop: asyncio.Event,
) -> None:
    """Run until `stop`. `settings` is the agent's (state_dir, host_netns, first_list_jitter)."""
    identity = None
    while identity is None and not stop.is_set():
        try:
            identity = await asyncio.to_thread(
                _identity, store, node, partial(detect_ipv4, settings.host_netns)
            )
        except L3FabricError as err:
            log.warning("cannot read node", extra={"op": "routing", "reason": str(err)})
        if identity is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), NODE_POLL)
    if identity is None or not await _label_node_objects(node, store, stop):
        return
    router_id, local_as, listen_port = identity
    workdir = Path(settings.state_dir) / "exabgp"
    speaker = ExaBGPSpeaker(
        workdir, router_id, local_as, listen=True, netns=settings.host_netns,
        listen_port=listen_port,
    )  # fmt: skip
    tunnels = Tunnels(node, settings.host_netns, IPAM(store))
    fib = EncapFib(Fib(netns=settings.host_netns), tunnels)
    overlay = Overlay(tunnels, NatTable(settings.host_netns))
    reflector = BirdReflector(Path(settings.state_dir) / "bird", netns=settings.host_netns)
    controller = RoutingController(
        node, store, speaker, fib, reflector, overlay=overlay,
        md5_counters=partial(read_md5_counters, settings.host_netns),
        list_jitter=settings.first_list_jitter,
    )  # fmt: skip
    await speaker.start()
    holder.loop = asyncio.get_running_loop()
    holder.controller = controller
    log.info("routing started", extra={"op": "routing", "node": node, "router_id": str(router_id)})
    try:
        await controller.run(stop)
    finally:
        await speaker.stop(keep_routes=True)
        fib.close()
