"""What the routing controller's parts share on the event loop."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from bgp_speaker.bgp import graceful
from bgp_speaker.bgp.routes import IPAddr, SessionSpec, SessionState
from bgp_speaker.routing.desired import DesiredState

__all__ = ["RoutingState"]


class RoutingState:
    """The desired state last applied, what each session did last, and the reconcile loop's
    wake-up call. Written and read only on the event loop, so no part sees it half-changed."""

    def __init__(self) -> None:
        self.desired: DesiredState | None = None
        self.peer_state: dict[IPAddr, tuple[SessionState, float, str]] = {}
        """Per peer: its session's state, since when (wall clock) and why."""
        self.eor_seen: set[IPAddr] = set()
        """Peers that sent End-of-RIB in their current session."""
        self.peer_restart: dict[IPAddr, int | None] = {}
        """Per peer: the graceful-restart time in its last OPEN (None: no capability)."""
        self.changed = asyncio.Event()
        """Set: the reconcile loop reads the desired state again."""

    def established(self) -> set[IPAddr]:
        """Peers whose session is up."""
        return {p for p, (s, _, _) in self.peer_state.items() if s is SessionState.UP}

    def awaiting_end_of_rib(self, sessions: Iterable[SessionSpec]) -> set[IPAddr]:
        """Of ``sessions``, the peers whose End-of-RIB is still due: not sent yet by a session
        that negotiated graceful restart or may still do so (`graceful.awaiting_end_of_rib`)."""
        return graceful.awaiting_end_of_rib(
            sessions, self.peer_restart, self.established(), self.eor_seen
        )

    def session_spec(self, peer: IPAddr) -> SessionSpec | None:
        """The desired session with ``peer`` (None: not desired, or nothing read yet)."""
        sessions = self.desired.sessions if self.desired else ()
        return next((s for s in sessions if s.peer_ip == peer), None)
