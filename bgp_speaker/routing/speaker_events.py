"""What the speaker reports, applied to the RIB and the sessions' state.

`SpeakerEvents.handle` takes one event and returns the prefixes whose selection may have
changed; the caller programs the kernel with them, once per batch of events. A
peer with a prefix limit has its initial table held out of the kernel until its End-of-RIB,
so a flood is cut off whole even when it arrives in several UPDATEs.
"""

from __future__ import annotations

import asyncio
import logging
import time

from bgp_speaker.bgp.peering import Peering
from bgp_speaker.bgp.rib import Rib
from bgp_speaker.bgp.routes import (
    EndOfRib,
    IPAddr,
    IPNet,
    PeerStateChanged,
    RoutesAnnounced,
    RoutesWithdrawn,
    SessionState,
    SpeakerEvent,
    SpeakerRestarted,
)
from bgp_speaker.bgp.speaker import Speaker
from bgp_speaker.routing.kernel_routes import KernelRoutes
from bgp_speaker.routing.peer_timers import PeerTimers
from bgp_speaker.routing.state import RoutingState
from bgp_speaker.routing.tasks import BackgroundTasks

__all__ = ["SpeakerEvents"]

log = logging.getLogger("l3fabric.agent.routing")

# A limited peer that sends no End-of-RIB has its routes installed this long after the
# session came up.
INITIAL_TABLE_WAIT = 5.0


class SpeakerEvents:
    """Speaker events into the RIB; session states, End-of-RIBs and speaker restarts kept."""

    def __init__(
        self,
        rib: Rib,
        peering: Peering,
        speaker: Speaker,
        state: RoutingState,
        timers: PeerTimers,
        kernel: KernelRoutes,
        tasks: BackgroundTasks,
    ) -> None:
        self.rib = rib
        self.peering = peering
        self.speaker = speaker
        self.speaker_restarts = 0
        self._state = state
        self._timers = timers
        self._kernel = kernel
        self._tasks = tasks
        self._sessions_up: dict[IPAddr, int] = {}  # per peer: sessions seen up, for timers

    def handle(self, event: SpeakerEvent) -> set[IPNet]:
        """Apply one event; the prefixes it affected."""
        state = self._state
        self._timers.track(event)
        if self.peering.ignores(event):  # OPENs; anything from a peer being cut off
            return set()
        match event:
            case RoutesAnnounced(peer, prefixes, attributes):
                affected = self.rib.announce(peer, prefixes, attributes)
                if (cut := self.peering.over_limit(event)) is not None:
                    # Before this batch reaches the kernel: nothing of it is installed.
                    affected |= self.rib.drop_peer(peer)
                    state.peer_state[peer] = (
                        SessionState.DOWN, time.time(), self.peering.limits.reason(peer)
                    )  # fmt: skip
                    state.eor_seen.discard(cut.peer_ip)
                    state.changed.set()  # reconcile: the speaker drops the session
                return affected
            case RoutesWithdrawn(peer, prefixes):
                return self.rib.withdraw(peer, prefixes)
            case EndOfRib(peer):
                state.eor_seen.add(peer)
                return self.rib.sweep_stale(peer) | self.rib.release(peer)
            case PeerStateChanged(peer, session_state, reason):
                state.peer_state[peer] = (session_state, time.time(), reason)
                if session_state is SessionState.DOWN:
                    state.eor_seen.discard(peer)
                    if self.rib.is_held(peer):  # never installed: nothing to keep forwarding
                        return self.rib.drop_peer(peer)
                    return self._timers.session_lost(peer, reason)
                if session_state is SessionState.UP:
                    self._hold_initial_table(peer)
                    self._tasks.spawn(self._after_session_up(peer))
            case SpeakerRestarted(reason):
                self.speaker_restarts += 1
                log.warning("speaker restarted", extra={"op": "bgp", "reason": reason})
                lost: set[IPNet] = set()
                for peer in list(state.peer_state):
                    state.peer_state[peer] = (SessionState.DOWN, time.time(), "speaker restart")
                    lost |= self._timers.session_lost(peer, "speaker restart")
                state.eor_seen.clear()
                return lost
        return set()

    def _hold_initial_table(self, peer: IPAddr) -> None:
        session = self._sessions_up[peer] = self._sessions_up.get(peer, 0) + 1
        spec = self._state.session_spec(peer)
        # Not while graceful restart keeps its stale routes: those forward meanwhile.
        if spec is None or spec.max_prefixes is None or self.rib.stale(peer):
            return
        self.rib.hold(peer)
        self._tasks.spawn(self._release_initial_table(peer, session))

    async def _release_initial_table(self, peer: IPAddr, session: int) -> None:
        await asyncio.sleep(INITIAL_TABLE_WAIT)
        if self._sessions_up.get(peer) == session and self.rib.is_held(peer):
            log.warning("no end-of-rib: installing the initial table",
                        extra={"op": "bgp", "peer": str(peer)})  # fmt: skip
            affected = self.rib.release(peer)
            await self._kernel.program(affected)

    async def _after_session_up(self, peer: IPAddr) -> None:
        # manual-eor: ExaBGP sends End-of-RIB only when told, after our exports are queued.
        try:
            await self.speaker.send_eor(peer)
        except Exception as err:  # the session may already be gone again: log, go on
            log.warning(
                "end-of-rib not sent", extra={"op": "bgp", "peer": str(peer), "reason": str(err)}
            )
