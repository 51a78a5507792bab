"""Names a TCP-MD5 mismatch as the reason a session stays down (decisions: bgp.md5_diagnosis).

Every MD5_POLL seconds the kernel's MD5 counters of the speaker's namespace are read; when
they rose, the sessions that are down and could be the cause get that reason in
``node status``, and a warning in the log: when the reason first appears for a peer, then
at most every MD5_LOG_EVERY seconds while it lasts (a peer retries every few seconds).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from bgp_speaker.bgp import md5_diagnosis
from bgp_speaker.bgp.routes import IPAddr, SessionState
from bgp_speaker.kernel.tcp_md5 import Md5Counters
from bgp_speaker.routing.state import RoutingState

__all__ = ["Md5Watch"]

log = logging.getLogger("l3fabric.agent.routing")

MD5_POLL = 2.0
MD5_LOG_EVERY = 60.0


class Md5Watch:
    """Polls the counters (``read``, blocking: run in a thread) and reports on the state."""

    def __init__(
        self,
        read: Callable[[], Md5Counters],
        state: RoutingState,
        poll: float = MD5_POLL,
        log_every: float = MD5_LOG_EVERY,
    ) -> None:
        self._read = read
        self._state = state
        self._poll = poll
        self._log_every = log_every
        self._logged: dict[IPAddr, tuple[str, float]] = {}  # per peer: reason, when

    async def watch(self) -> None:
        """Until cancelled."""
        last = await self._counters()
        while True:
            await asyncio.sleep(self._poll)
            now = await self._counters()
            if now is None or last is None:
                last = now or last
                continue
            mismatch = now.failure + now.not_found > last.failure + last.not_found
            self.report(mismatch, now.unexpected > last.unexpected)
            last = now

    def report(self, mismatch_rose: bool, unexpected_rose: bool) -> None:
        state = self._state
        sessions = state.desired.sessions if state.desired else ()
        blamed = md5_diagnosis.blame(sessions, state.established(), mismatch_rose,
                                     unexpected_rose)  # fmt: skip
        now = time.monotonic()
        for peer, reason in blamed.items():
            session_state, since, _ = state.peer_state.get(peer, (SessionState.DOWN, 0.0, ""))
            state.peer_state[peer] = (session_state, since or time.time(), reason)
            logged, when = self._logged.get(peer, ("", 0.0))
            if logged != reason or now - when >= self._log_every:
                self._logged[peer] = (reason, now)
                log.warning("session refused by the kernel",
                            extra={"op": "bgp", "peer": str(peer), "reason": reason})  # fmt: skip

    async def _counters(self) -> Md5Counters | None:
        try:
            return await asyncio.to_thread(self._read)
        except OSError as err:  # e.g. the namespace is gone: look again next time
            log.warning("cannot read TCP-MD5 counters", extra={"op": "bgp", "reason": str(err)})
            return None
