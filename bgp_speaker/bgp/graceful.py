"""Graceful restart decisions (pure): how long a lost peer's routes stay, how long a
restarted agent waits before sweeping what it found in the kernel (RFC 4724).

Receiving side. When a session goes down, the routes the peer taught us stay (marked
stale, still forwarding) for the restart time *the peer* advertised in the graceful-restart
capability of its last OPEN, capped by ``BGPPeer.maxRestartTime``; a peer that advertised
no capability, or that closed the session with a NOTIFICATION it sent (a Cease: it is
leaving on purpose), loses them at once. A peer we have no OPEN from (the session never
came up since we started) is judged by our own setting for the session.

Hold timer. ExaBGP counts the hold time in whole seconds and so notices a silent peer up to
a second late; the agent keeps its own timer per established session (``HoldTimers``, fed by
every message including KEEPALIVEs), so a dead peer's routes go within the hold time. If
the peer turns out to be alive after all (ExaBGP kept the session), the agent asks it for
its routes again (route refresh).

Our own restart. When our ExaBGP dies and comes back, every session is new: the routes it
had learned are kept for our own restart time (if we advertise graceful restart at all),
then swept unless learned again. When the agent itself starts, the routes it finds in the
kernel are adopted, stale, and swept once every session that negotiated graceful restart
has sent End-of-RIB, or after our restart time at the latest. A session without it (we or the
peer advertised no capability) need not send End-of-RIB at all, so it is not waited for once
it is up; one not up yet may still negotiate it.
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Mapping
from dataclasses import dataclass, field

from bgp_speaker.bgp.routes import IPAddr, SessionSpec

__all__ = [
    "HOLD_EXPIRED",
    "SPEAKER_RESTART",
    "UNKNOWN",
    "HoldTimers",
    "awaiting_end_of_rib",
    "initial_sync_wait",
    "retention",
]

HOLD_EXPIRED = "hold timer expired"
"""The reason the controller gives for a session its own hold timer declared dead."""
SPEAKER_RESTART = "speaker restart"
"""The reason the controller gives for sessions lost with our own ExaBGP."""
UNKNOWN = -1
"""``advertised`` when no OPEN has been seen from the peer."""
NO_RESTART_SYNC_WAIT = 10.0
"""Seconds a starting agent waits for End-of-RIB when no session does graceful restart."""


def retention(spec: SessionSpec | None, advertised: int | None, reason: str) -> int | None:
    """Seconds to keep the routes of a session that went down; None: remove them now.

    ``advertised``: the restart time in the peer's last OPEN (None: it advertised no
    graceful-restart capability; ``UNKNOWN``: no OPEN seen). ``reason``: ExaBGP's.
    """
    if reason == SPEAKER_RESTART:
        return None if spec is None else spec.graceful_restart_time or None
    if reason.startswith("notification received"):
        return None
    if advertised == UNKNOWN:
        restart = spec.graceful_restart_time if spec is not None else None
    else:
        restart = advertised
    if not restart:
        return None
    cap = spec.max_restart_time if spec is not None else None
    if cap is not None:
        restart = min(restart, cap)
    return restart or None


def initial_sync_wait(sessions: Iterable[SessionSpec]) -> float:
    """How long a starting agent keeps the routes it adopted from the kernel, at most,
    waiting for End-of-RIB from every session: our longest restart time."""
    times = [s.graceful_restart_time for s in sessions if s.graceful_restart_time]
    return float(max(times)) if times else NO_RESTART_SYNC_WAIT


def awaiting_end_of_rib(
    sessions: Iterable[SessionSpec],
    advertised: Mapping[IPAddr, int | None],
    established: Container[IPAddr],
    eor_seen: Container[IPAddr],
) -> set[IPAddr]:
    """Of ``sessions``, the peers whose End-of-RIB is still due (a starting agent sweeps what
    it adopted from the kernel, a handover retires old sessions, only once none is).

    ``advertised``: the restart time in each peer's last OPEN (None: no capability; a peer
    missing has sent no OPEN yet). End-of-RIB is due from a session that negotiated graceful
    restart, and from one not up yet, which may still negotiate it.
    """
    return {
        s.peer_ip
        for s in sessions
        if s.peer_ip not in eor_seen
        and (s.peer_ip not in established or _negotiated(s, advertised))
    }


def _negotiated(spec: SessionSpec, advertised: Mapping[IPAddr, int | None]) -> bool:
    # Both sides advertised the capability (no OPEN seen: it may still be).
    return spec.graceful_restart_time is not None and (
        advertised.get(spec.peer_ip, UNKNOWN) is not None
    )


@dataclass
class HoldTimers:
    """Per established session: when we last heard from the peer, and its hold time
    (RFC 4271: the smaller of ours and the one in its OPEN; 0 turns the timer off). Pure:
    the caller passes ``now`` (a monotonic clock)."""

    _proposed: dict[IPAddr, int | None] = field(default_factory=dict)
    _hold: dict[IPAddr, float] = field(default_factory=dict)
    _heard: dict[IPAddr, float] = field(default_factory=dict)
    _expired: set[IPAddr] = field(default_factory=set)

    def opened(self, peer: IPAddr, hold_time: int | None) -> None:
        """The peer's OPEN proposed ``hold_time`` (None: not known)."""
        self._proposed[peer] = hold_time

    def up(self, peer: IPAddr, ours: int, now: float) -> None:
        theirs = self._proposed.get(peer)
        hold = ours if theirs is None else min(ours, theirs)
        self._expired.discard(peer)
        self._heard[peer] = now
        if hold > 0:
            self._hold[peer] = float(hold)
        else:
            self._hold.pop(peer, None)

    def down(self, peer: IPAddr) -> None:
        self._hold.pop(peer, None)
        self._heard.pop(peer, None)
        self._expired.discard(peer)

    def heard(self, peer: IPAddr, now: float) -> bool:
        """A message from the peer; True when we had declared it dead (its session
        outlived our timer: its routes must be asked for again)."""
        if peer not in self._hold:
            return False
        self._heard[peer] = now
        if peer in self._expired:
            self._expired.discard(peer)
            return True
        return False

    def expired(self, now: float) -> list[IPAddr]:
        """Peers silent for longer than their hold time, each reported once."""
        out = [
            peer
            for peer, hold in self._hold.items()
            if peer not in self._expired and now - self._heard.get(peer, now) > hold
        ]
        self._expired.update(out)
        return out
