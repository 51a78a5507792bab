"""Starting and stopping the routing half of the agent: ExaBGP, FIB and the controller.

The speaker needs the node's router id and AS number, so routing starts once the node's
Node object has an IPv4 address (the lab and `node add --ipv4` set it; in a cluster the
node annotation does), and stops with the agent, leaving kernel routes in place.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Any

from bgp_speaker.config import BGP_CONFIG_NAME, parse_bgp_config
from bgp_speaker.exabgp_process import ExaBGPSpeaker
from bgp_speaker.fib import Fib
from bgp_speaker.peers import node_address
from bgp_speaker.routing import RoutingController
from ipam_blocks.errors import L3FabricError, NotFound
from ipam_blocks.model import parse_node
from ipam_blocks.store.base import Store

log = logging.getLogger("l3fabric.agent.routing")

NODE_POLL = 1.0
STATUS_TIMEOUT = 10.0


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
                return controller.status()

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


def _identity(store: Store, node: str) -> tuple[Any, int, int] | None:
    """(router id, local AS, listen port) once the node has an address."""
    try:
        me = parse_node(store.get("Node", node))
    except NotFound:
        return None
    address = node_address(me)
    if address is None:
        return None
    try:
        cfg = parse_bgp_config(store.get("BGPConfiguration", BGP_CONFIG_NAME))
    except NotFound:
        cfg = parse_bgp_config(None)
    return address, me.as_number or cfg.as_number, cfg.listen_port


async def run_routing(
    node: str,
    store: Store,
    settings: Any,
    holder: RoutingHolder,
    stop: asyncio.Event,
) -> None:
    """Run until `stop`. `settings` is the agent's (state_dir, host_netns)."""
    identity = None
    while identity is None and not stop.is_set():
        try:
            identity = await asyncio.to_thread(_identity, store, node)
        except L3FabricError as err:
            log.warning("cannot read node", extra={"op": "routing", "reason": str(err)})
        if identity is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), NODE_POLL)
    if identity is None:
        return
    router_id, local_as, listen_port = identity
    workdir = Path(settings.state_dir) / "exabgp"
    speaker = ExaBGPSpeaker(
        workdir, router_id, local_as, listen=True, netns=settings.host_netns,
        listen_port=listen_port,
    )  # fmt: skip
    fib = Fib(netns=settings.host_netns)
    controller = RoutingController(node, store, speaker, fib)
    await speaker.start()
    holder.loop = asyncio.get_running_loop()
    holder.controller = controller
    log.info("routing started", extra={"op": "routing", "node": node, "router_id": str(router_id)})
    try:
        await controller.run(stop)
    finally:
        await speaker.stop(keep_routes=True)
        fib.close()
