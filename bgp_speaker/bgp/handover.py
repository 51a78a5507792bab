"""Make-before-break for session changes (pure; the caller passes `now`).

When the desired sessions change shape — a running full mesh switched to route reflectors,
a BGPPeer replaced by another — the sessions that are no longer wanted must not go down
before the new ones carry the same routes, or pod traffic stops in between. So a session
that leaves the desired set while it is established is kept as *retiring* until:

- every session that is new since then is established and has sent End-of-RIB (or owes
  none: no graceful restart, see `graceful.awaiting_end_of_rib`), and
- every prefix the retiring session taught us has another accepted path from a session
  that is not retiring (the RIB's candidates: `covered`),

and both have held for `settle` seconds (our routes travel the other way over the same new
sessions; the settle time lets the neighbour's side catch up before our side hangs up).
After `max_wait` seconds it goes regardless (a new session that never comes up must not keep
the old topology forever). A retiring session that goes down is simply dropped.

Sessions the desired set still has under the same address are not retiring: a change of
type or name (mesh -> rr-client) is no change for ExaBGP and never flaps the session.

Only sessions between l3fabric nodes retire (`may_retire`): those are what a change of
fabric shape replaces. A session to an external router whose BGPPeer is deleted goes at
once — the operator asked for it, and a peer being removed for misbehaving must not linger.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

from bgp_speaker.bgp.routes import IPAddr, SessionSpec

__all__ = ["SessionHandover"]

log = logging.getLogger("l3fabric.agent.routing")

DEFAULT_SETTLE = 3.0
DEFAULT_MAX_WAIT = 90.0


@dataclass
class _Retiring:
    spec: SessionSpec
    since: float
    newcomers: frozenset[IPAddr]
    ready_since: float | None = None


@dataclass
class SessionHandover:
    settle: float = DEFAULT_SETTLE
    max_wait: float = DEFAULT_MAX_WAIT
    configured: dict[IPAddr, SessionSpec] = field(default_factory=dict)
    """What the last plan configured (desired plus retiring)."""
    retiring: dict[IPAddr, _Retiring] = field(default_factory=dict)

    def plan(
        self,
        desired: Sequence[SessionSpec],
        established: Collection[IPAddr],
        end_of_rib: Collection[IPAddr],
        covered: Callable[[IPAddr, Collection[IPAddr]], bool],
        now: float,
        may_retire: Callable[[IPAddr], bool] = lambda peer: True,
    ) -> tuple[SessionSpec, ...]:
        """The sessions to configure now. `covered(peer, retiring)`: whether every prefix
        `peer` taught us has an accepted path from a session outside `retiring`;
        `may_retire(peer)`: whether a session to `peer` is kept while it is replaced."""
        wanted = {s.peer_ip: s for s in desired}
        newcomers = frozenset(p for p in wanted if p not in self.configured)
        for peer, spec in self.configured.items():
            if (
                peer not in wanted
                and peer not in self.retiring
                and peer in established
                and may_retire(peer)
            ):
                self.retiring[peer] = _Retiring(spec, now, newcomers)
                log.info("session retiring", extra={"op": "handover", "peer": str(peer)})
        for peer in list(self.retiring):
            retiring = self.retiring[peer]
            if peer in wanted or peer not in established:
                del self.retiring[peer]
                continue
            if now - retiring.since >= self.max_wait:
                log.warning("retiring session dropped without a replacement", extra={
                    "op": "handover", "peer": str(peer), "reason": f"after {self.max_wait:g} s",
                })  # fmt: skip
                del self.retiring[peer]
                continue
            ready = all(
                p in established and p in end_of_rib for p in retiring.newcomers if p in wanted
            ) and covered(peer, self.retiring.keys())
            if not ready:
                retiring.ready_since = None
            elif retiring.ready_since is None:
                retiring.ready_since = now
            if retiring.ready_since is not None and now - retiring.ready_since >= self.settle:
                log.info(
                    "session retired",
                    extra={
                        "op": "handover",
                        "peer": str(peer),
                        "waited": round(now - retiring.since, 1),
                    },
                )
                del self.retiring[peer]
        planned = dict(wanted)
        for peer, retiring in self.retiring.items():
            planned[peer] = retiring.spec
        self.configured = planned
        return tuple(sorted(planned.values(), key=lambda s: (s.peer_ip.version, s.peer_ip)))

    @property
    def busy(self) -> bool:
        """Some session is retiring: plan again soon."""
        return bool(self.retiring)
