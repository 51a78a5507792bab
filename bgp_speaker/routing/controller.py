"""The agent's routing half, composed: desired state from the caches of the store, the RIB,
exports and the FIB, each kept by its own part (see `RoutingController`)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bgp_speaker.bgp.peering import Peering
from bgp_speaker.bgp.reflection import ReflectorDesired
from bgp_speaker.bgp.rib import Rib
from bgp_speaker.bgp.routes import SessionState, SpeakerEvent
from bgp_speaker.bgp.speaker import RouteReflector, Speaker
from bgp_speaker.kernel.fib import KernelFib
from bgp_speaker.kernel.tcp_md5 import Md5Counters
from bgp_speaker.overlay.dataplane import OverlayDataplane
from bgp_speaker.routing.caches import RoutingCaches
from bgp_speaker.routing.desired import DesiredState, desired_state
from bgp_speaker.routing.durations import Durations
from bgp_speaker.routing.kernel_routes import KernelRoutes
from bgp_speaker.routing.md5_watch import Md5Watch
from bgp_speaker.routing.peer_timers import PeerTimers
from bgp_speaker.routing.reconcile import Reconciler
from bgp_speaker.routing.speaker_events import SpeakerEvents
from bgp_speaker.routing.state import RoutingState
from bgp_speaker.routing.tasks import BackgroundTasks
from ipam_blocks.errors import L3FabricError
from ipam_blocks.store.base import Store

__all__ = ["PeerStatus", "RoutingController"]

log = logging.getLogger("l3fabric.agent.routing")

DEBOUNCE = 0.05
FIB_BATCH = 5000
RESYNC = 30.0  # seconds between level reconciles without a change (from the caches)
SYNC_POLL = 1.0  # seconds per wait for the caches' first lists
BORROWED_RETRY = 0.2  # first wait before reading a borrowed block again (doubles to RESYNC)


@dataclass(frozen=True)
class PeerStatus:
    """One session as `node status` shows it."""

    address: str
    type: str
    state: str
    since: float
    received: int
    accepted: int
    advertised: int
    reason: str = ""
    speaker: str = "exabgp"
    """Which process holds the session: the node's ExaBGP, or BIRD on a reflector node."""


class RoutingController:
    """Composes the routing half of the agent and runs its loops on one event loop.

    Data flows two ways:

    - store -> informers (`caches.RoutingCaches`) -> desired state -> sessions, exports ->
      ExaBGP: `_reconcile_loop` wakes when an event changed what routing reads (or every
      RESYNC seconds), computes the desired state from the caches (`desired.desired_state`,
      in a worker thread, no store request) and has the `Reconciler` level the RIB's
      sessions and policy, the speaker's sessions and exports, the overlay and the
      blackholes to it.
    - ExaBGP updates -> RIB -> FIB: `_event_loop` feeds the speaker's events through
      `SpeakerEvents` into the RIB, then has `KernelRoutes` program the affected prefixes,
      in batches (it drains whatever is queued before touching the FIB).

    On a reflector node BIRD reflects (`RouteReflector`): the `Reconciler` hands it its part
    of the desired state, and the node's ExaBGP is one of its clients (`bgp.reflection`).

    Beside them run `KernelRoutes.initial_sync` (sweeping what a restart left in the kernel)
    and `PeerTimers.watch` (our hold timers). The parts share the `RoutingState` and one
    set of `BackgroundTasks`, cancelled when `run` ends.
    """

    def __init__(
        self,
        node: str,
        store: Store,
        speaker: Speaker,
        fib: KernelFib,
        reflector: RouteReflector,
        *,
        initial_sync_timeout: float | None = None,
        overlay: OverlayDataplane | None = None,
        md5_counters: Callable[[], Md5Counters] | None = None,
        list_jitter: float = 0.0,
    ) -> None:
        """``md5_counters`` reads the kernel's TCP-MD5 counters of the speaker's namespace
        (blocking); None: no session is ever reported refused by TCP-MD5. ``list_jitter``:
        the caches' first lists wait a random 0..that many seconds (agents starting together
        spread their lists)."""
        self.node = node
        self.store = store
        self.caches = RoutingCaches(store, node, start_jitter=list_jitter)
        self.reconcile_durations = Durations()
        self.last_sync: float | None = None
        """Wall-clock time the last reconcile from fully synced caches finished."""
        self.speaker = speaker
        self.reflector = reflector
        self.rib = Rib()
        self.state = RoutingState()
        self._md5_counters = md5_counters
        self.tasks = BackgroundTasks()
        self.peering = Peering(self.rib)  # sessions to configure, limits, communities
        self.kernel = KernelRoutes(
            self.rib, fib, overlay, self.state, self.tasks, initial_sync_timeout
        )
        self.timers = PeerTimers(self.rib, speaker, self.state, self.kernel, self.tasks)
        self.speaker_events = SpeakerEvents(
            self.rib, self.peering, speaker, self.state, self.timers, self.kernel, self.tasks
        )
        self.reconciler = Reconciler(
            self.rib, self.peering, speaker, reflector, self.state, self.kernel, self.tasks
        )

    # --- desired state ------------------------------------------------------------------------

    def desired_now(self, *, reread_borrowed: bool = False) -> DesiredState | None:
        """The desired state from the caches as they are (blocking only for a password or a
        borrowed block to read)."""
        listings = self.caches.listings(reread_borrowed=reread_borrowed)
        return desired_state(self.node, listings, self.caches.passwords.resolve)

    async def reconcile_desired(self, *, resync: bool = False) -> None:
        """Level everything to the caches' desired state. ``resync`` (the periodic one) also
        reads the borrowed blocks and the passwords again."""
        started = time.perf_counter()
        if resync:
            self.caches.passwords.forget()
        desired = await asyncio.to_thread(self.desired_now, reread_borrowed=resync)
        if desired is None:
            log.warning("node has no IPv4 address yet", extra={"op": "routing", "node": self.node})
            return
        await self.reconciler.apply(desired)
        self.reconcile_durations.observe(time.perf_counter() - started)
        self.last_sync = time.time()

    def pod_mtu(self) -> int | None:
        """The MTU pods get when their CNI config names none (None: not known yet)."""
        return self.kernel.pod_mtu()

    # --- the loops ----------------------------------------------------------------------------

    async def _event_loop(self) -> None:
        events = self.speaker.events()
        queue: asyncio.Queue[SpeakerEvent] = asyncio.Queue()

        async def pump() -> None:
            async for event in events:
                self.timers.heard(event)  # as it arrives: a busy FIB must not fake silence
                await queue.put(event)

        self.tasks.spawn(pump())
        while True:
            affected = self.speaker_events.handle(await queue.get())
            while not queue.empty() and len(affected) < FIB_BATCH:
                affected |= self.speaker_events.handle(queue.get_nowait())
            if affected:
                await self.kernel.program(affected)

    async def _reconcile_loop(self) -> None:
        changed = self.state.changed
        # No desired state from half a cache. Waited for in short steps: a worker thread
        # blocked for good would hold up the agent's exit while the store is unreachable.
        while not await asyncio.to_thread(self.caches.wait_synced, SYNC_POLL):
            pass
        changed.set()
        borrowed_retry = BORROWED_RETRY
        while True:
            resync = False
            try:  # level-based: look again now and then (at the caches, not the server)
                await asyncio.wait_for(changed.wait(), RESYNC)
            except TimeoutError:
                resync = True
            await asyncio.sleep(DEBOUNCE)
            changed.clear()
            try:
                await self.reconcile_desired(resync=resync)
            except L3FabricError as err:
                log.error("reconcile failed", extra={"op": "routing", "reason": str(err)})
                await asyncio.sleep(1)
                changed.set()
                continue
            if self.caches.borrowed.complete:
                borrowed_retry = BORROWED_RETRY
            else:  # a handle counted up before its block was written: read that block again
                self.caches.borrow_again()
                asyncio.get_running_loop().call_later(borrowed_retry, changed.set)
                borrowed_retry = min(borrowed_retry * 2, RESYNC)

    async def run(self, stop: asyncio.Event) -> None:
        await self.kernel.adopt()
        loop = asyncio.get_running_loop()
        changed = self.state.changed

        def wake() -> None:  # from an informer's thread
            if not loop.is_closed():
                loop.call_soon_threadsafe(changed.set)

        self.caches.start(wake)
        for coro in (
            self._event_loop(),
            self._reconcile_loop(),
            self.kernel.initial_sync(),
            self.timers.watch(),
            *([Md5Watch(self._md5_counters, self.state).watch()] if self._md5_counters else []),
        ):
            self.tasks.spawn(coro)
        try:
            await stop.wait()
        finally:
            self.caches.stop()
            await self.tasks.stop()
            await self.reflector.stop()

    # --- status -------------------------------------------------------------------------------

    async def status(self) -> dict[str, Any]:
        """For `node status` and metrics; runs on the event loop (see RoutingHolder.status)."""
        desired = self.state.desired
        sessions = desired.sessions if desired else ()
        sessions = (*sessions, *self.peering.retiring())  # kept until replaced (handover)
        advertised = len(self.reconciler.announced)
        peers = []
        for s in sessions:
            session_state, since, reason = self.state.peer_state.get(
                s.peer_ip, (SessionState.DOWN, 0.0, "")
            )
            reason = self.peering.note(s.peer_ip) or reason
            peers.append(
                PeerStatus(
                    str(s.peer_ip), s.peer_type.value,
                    "established" if session_state is SessionState.UP else session_state.value,
                    since, self.rib.received(s.peer_ip), self.rib.accepted(s.peer_ip),
                    advertised, reason,
                ).__dict__
            )  # fmt: skip
        if desired is not None and desired.reflector is not None:
            peers += await self._reflector_peers(desired.reflector)
        return {
            "node": self.node,
            "router_id": str(desired.policy.router_id) if desired else None,
            "peers": peers,
            "exported": sorted(str(p) for p in self.reconciler.announced),
            "routes_installed": len(self.kernel.installed),
            "dropped_by_policy": self.rib.dropped_total(),
            "speaker_restarts": self.speaker_events.speaker_restarts,
            "synced": self.kernel.synced.is_set(),
            "overlay": self.kernel.overlay_status(),
            "reflector": self.reflector.describe() if self.reflector.active else None,
            "last_sync": self.last_sync,
            "caches": self.caches.describe(),
            "reconcile_seconds": self.reconcile_durations.to_dict(),
        }

    async def _reflector_peers(self, desired: ReflectorDesired) -> list[dict[str, Any]]:
        """BIRD's sessions, in `node status`'s words."""
        reported = {s.peer: s for s in await self.reflector.sessions()}
        peers = []
        for session in desired.sessions:
            spec = session.spec
            seen = reported.get(spec.peer_ip)
            if seen is None:
                state, since, received, advertised, reason = "down", 0.0, 0, 0, "not in BIRD yet"
            else:
                state = "established" if seen.established else seen.bgp_state.lower()
                since, received, advertised = seen.since, seen.imported, seen.exported
                reason = seen.last_error or (seen.info if not seen.established else "")
            peers.append(
                PeerStatus(
                    str(spec.peer_ip), spec.peer_type.value, state, since, received, received,
                    advertised, reason, speaker="bird",
                ).__dict__
            )  # fmt: skip
        return peers
