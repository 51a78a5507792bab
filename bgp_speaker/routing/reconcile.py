"""Levels the node to a desired state: the RIB's sessions and import policy, the exported
prefixes and their communities, the overlay, the kernel routes, the speaker's sessions and,
on a reflector node, BIRD's configuration.

Sessions are planned, not copied: the desired ones minus those cut off for too many
prefixes, plus those retiring until their replacements carry their routes (`handover`).
While sessions retire the plan is looked at again every HANDOVER_TICK, without a store read.
"""

from __future__ import annotations

import asyncio
import time

from bgp_speaker.bgp.peering import Peering
from bgp_speaker.bgp.reflection import TakenOver
from bgp_speaker.bgp.rib import Rib
from bgp_speaker.bgp.routes import IPNet, SessionSpec
from bgp_speaker.bgp.speaker import RouteReflector, Speaker
from bgp_speaker.routing.desired import DesiredState
from bgp_speaker.routing.kernel_routes import KernelRoutes
from bgp_speaker.routing.state import RoutingState
from bgp_speaker.routing.tasks import BackgroundTasks

__all__ = ["Reconciler"]

HANDOVER_TICK = 0.5


class Reconciler:
    """Applies desired states, in order, to the RIB, the speaker and the kernel."""

    def __init__(
        self,
        rib: Rib,
        peering: Peering,
        speaker: Speaker,
        reflector: RouteReflector,
        state: RoutingState,
        kernel: KernelRoutes,
        tasks: BackgroundTasks,
    ) -> None:
        self.rib = rib
        self.peering = peering
        self.speaker = speaker
        self.reflector = reflector
        self.announced: frozenset[IPNet] = frozenset()
        self._state = state
        self._kernel = kernel
        self._tasks = tasks
        self._handover_ticking = False
        self.taken_over = TakenOver()

    async def apply(self, desired: DesiredState) -> None:
        """Level everything to ``desired``, which becomes the state's desired state."""
        state = self._state
        self.peering.set_desired(desired.peering)
        configured = self.plan_sessions(desired)
        affected = self.rib.set_sessions(self.rib_sessions(configured))
        affected |= self.rib.set_policy(desired.policy)
        wanted = desired.exports.prefixes
        # Exports before sessions: the speaker replays exports to sessions it adds, while a
        # session change can wait on ExaBGP for a long while (it defers reloads while an
        # unreachable neighbour has routes queued) and must not hold up a new block.
        for communities, prefixes in self.peering.export_changes(wanted).items():
            await self.speaker.announce(sorted(prefixes, key=_sort_key), communities=communities)
        if self.announced - wanted:
            await self.speaker.withdraw(sorted(self.announced - wanted, key=_sort_key))
        previous_blocks = state.desired.exports.blocks if state.desired else frozenset()
        self.announced = wanted
        state.desired = desired
        affected |= previous_blocks | desired.exports.blocks
        affected |= await self._kernel.reconcile_overlay(desired.encap)
        await self._kernel.program(affected)
        # BIRD first, in the background: it need not wait for ExaBGP to (re)start. Where ExaBGP
        # still holds the listening socket BIRD needs (a node becoming a reflector), BIRD
        # retries those sessions once ExaBGP has let go (`BirdReflector._rebind`).
        self.reflector.apply(desired.reflector)
        await self.speaker.set_sessions(
            configured,
            handed_over=self.taken_over.sessions.keys(),
            listen=desired.reflector is None,
        )

    def plan_sessions(self, desired: DesiredState) -> tuple[SessionSpec, ...]:
        """Desired sessions minus those cut off for too many prefixes, plus those retiring
        until their replacements carry their routes (see `handover`)."""
        state = self._state
        before = self.peering.configured
        established = state.established()
        # A session without graceful restart owes no End-of-RIB: up, its table counts as sent.
        sent_table = established - state.awaiting_end_of_rib(desired.sessions)
        configured = self.peering.plan_sessions(desired.sessions, established, sent_table)
        taken = self.taken_over.update(
            before,
            {s.peer_ip for s in configured},
            desired.reflector.peers if desired.reflector else frozenset(),
            lambda peer: self.peering.covered(peer, self.taken_over.sessions.keys()),
            time.monotonic(),
        )
        for peer in taken:
            self.rib.mark_stale(peer)
        if self._busy() and not self._handover_ticking:
            self._handover_ticking = True
            self._tasks.spawn(self._handover_tick())
        return configured

    def rib_sessions(self, configured: tuple[SessionSpec, ...]) -> list[SessionSpec]:
        """The RIB's sessions: ExaBGP's, and those BIRD took over while their routes stay."""
        return [*configured, *self.taken_over.specs]

    def _busy(self) -> bool:
        return self.peering.handover.busy or bool(self.taken_over.sessions)

    async def _handover_tick(self) -> None:
        """While sessions retire, look again every HANDOVER_TICK (no store read needed)."""
        state = self._state
        try:
            while self._busy() and state.desired is not None:
                await asyncio.sleep(HANDOVER_TICK)
                before = self.peering.configured, self.taken_over.specs
                configured = self.plan_sessions(state.desired)
                if (configured, self.taken_over.specs) != before:
                    affected = self.rib.set_sessions(self.rib_sessions(configured))
                    await self._kernel.program(affected)
                    await self.speaker.set_sessions(
                        configured,
                        handed_over=self.taken_over.sessions.keys(),
                        listen=state.desired.reflector is None,
                    )
        finally:
            self._handover_ticking = False


def _sort_key(prefix: IPNet) -> tuple[int, int, int]:
    return (prefix.version, int(prefix.network_address), prefix.prefixlen)
