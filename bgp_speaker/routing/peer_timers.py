"""When a peer counts as lost, and how long its routes outlive it (decisions: `bgp.graceful`).

- Our own hold timer per session: ExaBGP's counts whole seconds, up to a second late. A peer
  silent for its hold time is lost here; one heard again after that (ExaBGP kept the
  session) is asked for its routes again.
- Graceful restart (DESIGN §5): a lost peer's routes stay, stale, until it is back and sends
  End-of-RIB, or its restart time runs out; a peer that closed the session with a
  NOTIFICATION (a Cease: it is leaving) is dropped at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable

from bgp_speaker.bgp import graceful
from bgp_speaker.bgp.config import DEFAULT_HOLD
from bgp_speaker.bgp.rib import Rib
from bgp_speaker.bgp.routes import (
    IPAddr,
    IPNet,
    PeerOpened,
    PeerStateChanged,
    SessionState,
    SpeakerEvent,
    SpeakerRestarted,
)
from bgp_speaker.bgp.speaker import Speaker
from bgp_speaker.routing.kernel_routes import KernelRoutes
from bgp_speaker.routing.state import RoutingState
from bgp_speaker.routing.tasks import BackgroundTasks

__all__ = ["PeerTimers"]

log = logging.getLogger("l3fabric.agent.routing")

# Past a deadline by this much before looking: `HoldTimers.expired` wants silence of *more*
# than the hold time, and a wake-up right on the deadline would find none and spin.
HOLD_SLACK = 0.001


class _HoldDeadlines(graceful.HoldTimers):
    """The hold timers, and when the next one runs out (the watch sleeps until then instead
    of looking every tick: an idle node wakes once per hold time, not ten times a second)."""

    def next_expiry(self) -> float | None:
        """The earliest monotonic time a running timer expires (None: none runs)."""
        return min(
            (self._heard[peer] + hold for peer, hold in self._hold.items()
             if peer not in self._expired),
            default=None,
        )  # fmt: skip


class PeerTimers:
    """The hold timer of every session and the restart timer of every lost peer."""

    def __init__(
        self,
        rib: Rib,
        speaker: Speaker,
        state: RoutingState,
        kernel: KernelRoutes,
        tasks: BackgroundTasks,
    ) -> None:
        self.rib = rib
        self.speaker = speaker
        self.hold_timers = _HoldDeadlines()
        # Set when a deadline may have moved earlier (a timer started): the watch looks again.
        # Hearing from a peer only moves its deadline later: the watch finds that out when it
        # wakes at the old one.
        self._rearm = asyncio.Event()
        self._state = state
        self._kernel = kernel
        self._tasks = tasks
        self._stale_episode: dict[IPAddr, int] = {}

    # --- hold timers ----------------------------------------------------------------------

    def track(self, event: SpeakerEvent) -> None:
        """Start, restart or stop timers as sessions open, come up and go down."""
        match event:
            case PeerOpened(peer, _, restart, hold):
                self._state.peer_restart[peer] = restart
                self.hold_timers.opened(peer, hold)
            case PeerStateChanged(peer, SessionState.UP, _):
                spec = self._state.session_spec(peer)
                hold = spec.hold_time if spec is not None else DEFAULT_HOLD
                self.hold_timers.up(peer, hold, time.monotonic())
                self._rearm.set()
            case PeerStateChanged(peer, SessionState.DOWN, _):
                self.hold_timers.down(peer)
            case SpeakerRestarted():
                for peer in list(self._state.peer_state):
                    self.hold_timers.down(peer)

    def heard(self, event: SpeakerEvent) -> None:
        """Anything from a peer but a state change proves it alive."""
        if isinstance(event, (SpeakerRestarted, PeerStateChanged)):
            return
        peer = event.peer
        if self.hold_timers.heard(peer, time.monotonic()):
            # We called it dead, ExaBGP kept the session: its routes are gone here, ask for
            # them again.
            self._rearm.set()  # its timer runs again
            log.warning("peer alive after all, refreshing its routes",
                        extra={"op": "bgp", "peer": str(peer)})  # fmt: skip
            self._state.peer_state[peer] = (SessionState.UP, time.time(), "")
            self._tasks.spawn(
                self._quietly(self.speaker.route_refresh(peer), "route refresh", peer)
            )

    async def _quietly(self, call: Awaitable[None], what: str, peer: IPAddr) -> None:
        try:
            await call
        except Exception as err:  # the session may be gone meanwhile: log, go on
            log.warning(f"{what} failed", extra={"op": "bgp", "peer": str(peer),
                                                 "reason": str(err)})  # fmt: skip

    async def watch(self) -> None:
        """Declare peers lost whose hold timer expired, until cancelled."""
        state = self._state
        while True:
            self._rearm.clear()
            due = self.hold_timers.next_expiry()
            timeout = None if due is None else max(0.0, due - time.monotonic()) + HOLD_SLACK
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._rearm.wait(), timeout)
            for peer in self.hold_timers.expired(time.monotonic()):
                log.warning("hold timer expired", extra={"op": "bgp", "peer": str(peer)})
                state.peer_state[peer] = (SessionState.DOWN, time.time(), graceful.HOLD_EXPIRED)
                state.eor_seen.discard(peer)
                affected = self.session_lost(peer, graceful.HOLD_EXPIRED)
                if affected:
                    await self._kernel.program(affected)

    # --- graceful restart -----------------------------------------------------------------

    def session_lost(self, peer: IPAddr, reason: str) -> set[IPNet]:
        """A session is gone: drop its routes now (returned: the affected prefixes), or mark
        them stale and start its restart timer. A session BIRD has taken over keeps its
        routes for as long as `reflection.TakenOver` says."""
        reflector = self._state.desired.reflector if self._state.desired else None
        if reflector is not None and peer in reflector.peers:
            return set()
        spec = self._state.session_spec(peer)
        advertised = self._state.peer_restart.get(peer, graceful.UNKNOWN)
        restart = graceful.retention(spec, advertised, reason)
        if not restart:
            self._stale_episode.pop(peer, None)
            return self.rib.drop_peer(peer)
        self.rib.mark_stale(peer)
        episode = self._stale_episode[peer] = self._stale_episode.get(peer, 0) + 1
        self._tasks.spawn(self._stale_timer(peer, episode, restart))
        return set()

    async def _stale_timer(self, peer: IPAddr, episode: int, restart: float) -> None:
        await asyncio.sleep(restart)
        if self._stale_episode.get(peer) == episode:
            affected = self.rib.sweep_stale(peer)
            if affected:
                log.warning("stale routes swept", extra={"op": "bgp", "peer": str(peer),
                                                         "count": len(affected)})  # fmt: skip
                await self._kernel.program(affected)
