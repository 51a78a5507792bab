"""The agent's desired state as its caches see a store: informers started, one sync, read."""

from __future__ import annotations

from bgp_speaker.routing.controller import RoutingController
from bgp_speaker.routing.desired import DesiredState
from ipam_blocks.store.base import Store

SYNC_TIMEOUT = 10.0


def desired_of(store: Store, node: str) -> DesiredState | None:
    """What `node`'s agent would level its routing to, read through its own caches."""
    controller = RoutingController(node, store, speaker=None, fib=None, reflector=None)  # type: ignore[arg-type]
    controller.caches.start(lambda: None)
    try:
        assert controller.caches.wait_synced(SYNC_TIMEOUT), "the caches did not sync"
        return controller.desired_now()
    finally:
        controller.caches.stop()
