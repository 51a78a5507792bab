"""Per-peer maximum prefix limits (BGPPeer `maxPrefixes`), pure.

ExaBGP has no limit of its own, so the agent counts: every prefix a peer announces (accepted
by policy or not — the limit protects the agent from a flood) is held in the RIB, and when a
peer holds more than its limit the session is torn down: everything it taught is dropped
*before* the batch it arrived in reaches the kernel (and its initial table, which may come
in several UPDATEs, reaches the kernel only at its End-of-RIB: a flood at session start is
never installed in part), the neighbour is removed from ExaBGP
(a Cease goes out) and the event is logged. The session stays down until its BGPPeer
changes (a raised limit, say) or the agent restarts — as BIRD's `receive limit ... action
disable` does; a peer that floods once floods again.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from bgp_speaker.bgp.routes import IPAddr, SessionSpec

__all__ = ["PrefixLimits"]

log = logging.getLogger("l3fabric.agent.routing")


@dataclass
class PrefixLimits:
    limits: dict[IPAddr, int] = field(default_factory=dict)
    tripped: dict[IPAddr, tuple[SessionSpec, str]] = field(default_factory=dict)
    """Peers cut off, with the session they were cut off under and why."""

    def set_sessions(self, sessions: Iterable[SessionSpec]) -> None:
        self.limits = {s.peer_ip: s.max_prefixes for s in sessions if s.max_prefixes is not None}

    def exceeded(self, peer: IPAddr, received: int) -> str:
        """Why the session must go ("" when within its limit)."""
        limit = self.limits.get(peer)
        if limit is None or received <= limit or peer in self.tripped:
            return ""
        return f"max-prefixes {limit} exceeded ({received} received)"

    def trip(self, spec: SessionSpec, reason: str) -> None:
        self.tripped[spec.peer_ip] = (spec, reason)
        log.error("session torn down", extra={"op": "max-prefixes", "peer": str(spec.peer_ip),
                                              "reason": reason})  # fmt: skip

    def is_tripped(self, peer: IPAddr) -> bool:
        return peer in self.tripped

    def reason(self, peer: IPAddr) -> str:
        return self.tripped[peer][1] if peer in self.tripped else ""

    def allowed(self, desired: Iterable[SessionSpec]) -> list[SessionSpec]:
        """`desired` without the tripped sessions; a tripped peer whose session changed (or
        is no longer wanted) is forgiven."""
        wanted = {s.peer_ip: s for s in desired}
        for peer, (spec, _) in list(self.tripped.items()):
            if wanted.get(peer) != spec:
                del self.tripped[peer]
                log.info("limit reset", extra={"op": "max-prefixes", "peer": str(peer)})
        return [s for s in wanted.values() if s.peer_ip not in self.tripped]
