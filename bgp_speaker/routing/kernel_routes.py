"""The kernel side of routing: what the RIB selects, as kernel routes, in the FIB.

Each selected route is mapped through the pools' encapsulation (`encap.encapsulate`) onto
the tunnel devices the overlay has ready; our own blocks get blackhole routes. Changes go to
the FIB per batch of affected prefixes, and what failed is tried again after FIB_RETRY.

On start the kernel may still hold routes from before a restart: they are adopted, not
flushed, until every session that negotiated graceful restart has sent End-of-RIB (one
without it may never send one: it is not waited for once it is up), or until
`initial_sync_timeout` passes, by default our graceful-restart time; then one reconcile of
the FIB against the RIB removes what was not learned again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from bgp_speaker.bgp import graceful
from bgp_speaker.bgp.export import Exports, blackhole_routes
from bgp_speaker.bgp.rib import Rib, kernel_route
from bgp_speaker.bgp.routes import IPNet, KernelRoute
from bgp_speaker.kernel.fib import FibError, KernelFib
from bgp_speaker.overlay.dataplane import OverlayDataplane
from bgp_speaker.overlay.encap import TUNNEL_DEVICES, Encap, EncapPolicy, encapsulate
from bgp_speaker.routing.state import RoutingState
from bgp_speaker.routing.tasks import BackgroundTasks

__all__ = ["KernelRoutes"]

log = logging.getLogger("l3fabric.agent.routing")

FIB_RETRY = 1.0
OVERLAY_RETRY = 2.0


class KernelRoutes:
    """Keeps the FIB equal to the RIB's selections (through the overlay) for the prefixes it
    is given, and levels the overlay to the pools' encapsulation."""

    def __init__(
        self,
        rib: Rib,
        fib: KernelFib,
        overlay: OverlayDataplane | None,
        state: RoutingState,
        tasks: BackgroundTasks,
        initial_sync_timeout: float | None = None,
    ) -> None:
        self.rib = rib
        self.fib = fib
        self.overlay = overlay
        self.installed: dict[IPNet, KernelRoute] = {}
        self.synced = asyncio.Event()
        """Set once the FIB was reconciled against the RIB after the start."""
        self._state = state
        self._tasks = tasks
        self._initial_sync_timeout = initial_sync_timeout
        self._fib_lock = asyncio.Lock()  # a Fib is used from one thread at a time
        self._encap: tuple[EncapPolicy, frozenset[Encap]] = (EncapPolicy(), frozenset())
        self._overlay_generation = 0

    async def adopt(self) -> None:
        """Take the kernel's routes as installed (they stay until the initial sync)."""
        self.installed = await asyncio.to_thread(self.fib.dump)

    def wanted_route(self, prefix: IPNet) -> KernelRoute | None:
        desired = self._state.desired
        if desired and prefix in desired.exports.blocks:
            return blackhole_routes(Exports(frozenset({prefix})))[prefix]
        selection = self.rib.select(prefix)
        if selection is None:
            return None
        policy, available = self._encap
        return encapsulate(kernel_route(prefix, selection), policy, available)

    # --- the overlay --------------------------------------------------------------------------

    async def reconcile_overlay(self, policy: EncapPolicy) -> set[IPNet]:
        """Level tunnel devices and NAT rules; every prefix when what routes may use changed
        (a mode switched, a device came or went), so each is re-encapsulated."""
        if self.overlay is None:
            available = frozenset(Encap)  # nothing to set up: tests, or a plain fabric
        else:
            available = await asyncio.to_thread(self.overlay.reconcile, policy)
            if not self.overlay.healthy:
                self._tasks.spawn(self._look_again(OVERLAY_RETRY))
            generation = self.overlay.generation
            if generation != self._overlay_generation:
                # A tunnel device was replaced and the kernel dropped the routes through it:
                # forget them (after any FIB change in flight), so they are installed again.
                async with self._fib_lock:
                    self._overlay_generation = generation
                    for prefix, route in list(self.installed.items()):
                        if any(hop.device in TUNNEL_DEVICES for hop in route.nexthops):
                            del self.installed[prefix]
                self._encap = (policy, available)
                return set(self.rib.prefixes())
        if (policy, available) == self._encap:
            return set()
        self._encap = (policy, available)
        return set(self.rib.prefixes())

    async def _look_again(self, delay: float) -> None:
        await asyncio.sleep(delay)
        self._state.changed.set()

    def pod_mtu(self) -> int | None:
        """The MTU pods get when their CNI config names none (None: not known yet)."""
        return self.overlay.pod_mtu() if self.overlay is not None else None

    def overlay_status(self) -> dict[str, Any] | None:
        return self.overlay.status() if self.overlay is not None else None

    # --- the FIB ------------------------------------------------------------------------------

    async def program(self, prefixes: set[IPNet]) -> None:
        """Bring the kernel in line with the RIB for these prefixes."""
        async with self._fib_lock:
            await self._program_locked(prefixes)

    async def _program_locked(self, prefixes: set[IPNet]) -> None:
        upserts: list[KernelRoute] = []
        removes: list[IPNet] = []
        for prefix in prefixes:
            route = self.wanted_route(prefix)
            if route is None:
                if prefix in self.installed:
                    removes.append(prefix)
            elif self.installed.get(prefix) != route:
                upserts.append(route)
        if not upserts and not removes:
            return
        failed: set[IPNet] = set()
        try:
            await asyncio.to_thread(self.fib.apply, upserts, removes)
        except FibError as err:
            # Everything not listed was applied; a FIB unusable as a whole lists nothing.
            failed = set(err.failures) or {r.prefix for r in upserts} | set(removes)
            log.error("kernel update failed", extra={"op": "fib", "reason": str(err)})
        for route in upserts:
            if route.prefix not in failed:
                self.installed[route.prefix] = route
        for prefix in removes:
            if prefix not in failed:
                self.installed.pop(prefix, None)
        if failed:
            self._tasks.spawn(self._retry_later(failed))

    async def _retry_later(self, prefixes: set[IPNet]) -> None:
        """Failures are mostly transient (a gateway not resolvable yet): try again."""
        await asyncio.sleep(FIB_RETRY)
        await self.program(prefixes)

    async def _full_sync(self) -> None:
        async with self._fib_lock:
            desired = {p: r for p in self.rib.prefixes() if (r := self.wanted_route(p))}
            if self._state.desired:
                desired.update(blackhole_routes(self._state.desired.exports))
            changed, removed = await asyncio.to_thread(self.fib.reconcile, desired)
            self.installed = desired
        self.synced.set()
        log.info("kernel reconciled", extra={"op": "fib", "changed": changed, "removed": removed})

    async def initial_sync(self) -> None:
        """Sweep routes left from before a start once every session that negotiated graceful
        restart has sent End-of-RIB, or when our graceful-restart time (the peers keep our
        routes that long) has passed."""
        state = self._state
        started = time.monotonic()
        while state.desired is None and time.monotonic() - started < graceful.NO_RESTART_SYNC_WAIT:
            await asyncio.sleep(0.1)
        wait = self._initial_sync_timeout
        if wait is None:
            wait = graceful.initial_sync_wait(state.desired.sessions if state.desired else ())
        deadline = started + wait
        while time.monotonic() < deadline:
            if state.desired is not None and not state.awaiting_end_of_rib(state.desired.sessions):
                break
            await asyncio.sleep(0.1)
        await self._full_sync()
