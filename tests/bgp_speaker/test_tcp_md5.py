"""TCP-MD5 mismatches, seen only in the kernel's counters: reading them, blaming sessions,
reporting in `node status` and the log (rate-limited). The real thing (a router with the
wrong password) is tests/interop/test_external_peer.py::test_md5_right_password_...
"""

from __future__ import annotations

import asyncio
import logging
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from bgp_speaker.bgp import md5_diagnosis
from bgp_speaker.bgp.routes import PeerType, SessionSpec, SessionState
from bgp_speaker.kernel.tcp_md5 import Md5Counters, parse_md5_counters, read_md5_counters
from bgp_speaker.routing.desired import DesiredState
from bgp_speaker.routing.md5_watch import Md5Watch
from bgp_speaker.routing.state import RoutingState

ME = IPv4Address("10.0.0.11")
SIGNED, PLAIN, UP = IPv4Address("10.0.0.1"), IPv4Address("10.0.0.2"), IPv4Address("10.0.0.3")
SESSIONS = (
    SessionSpec(SIGNED, 64512, 65001, ME, ME, PeerType.GLOBAL, md5_password="pw"),
    SessionSpec(PLAIN, 64512, 65002, ME, ME, PeerType.GLOBAL),
    SessionSpec(UP, 64512, 65003, ME, ME, PeerType.GLOBAL, md5_password="pw"),
)

NETSTAT = """TcpExt: SyncookiesSent TCPMD5NotFound TCPMD5Unexpected TCPMD5Failure Other
TcpExt: 0 7 3 12 9
IpExt: InNoRoutes TCPMD5Failure
IpExt: 1 999
"""


def test_the_counters_are_read_from_their_own_line_pair() -> None:
    assert parse_md5_counters(NETSTAT) == Md5Counters(failure=12, not_found=7, unexpected=3)
    assert parse_md5_counters("") == Md5Counters()  # an old kernel without them


@pytest.mark.root
def test_the_kernel_has_them() -> None:
    # Every kernel this runs on (CONFIG_TCP_MD5SIG) counts them: absent would read 0 forever.
    assert "TCPMD5Failure" in Path("/proc/net/netstat").read_text()
    assert isinstance(read_md5_counters(None), Md5Counters)


def test_a_rise_is_blamed_on_sessions_down_that_could_cause_it() -> None:
    up = {UP}
    assert md5_diagnosis.blame(SESSIONS, up, True, False) == {SIGNED: md5_diagnosis.MD5_MISMATCH}
    assert md5_diagnosis.blame(SESSIONS, up, False, True) == {PLAIN: md5_diagnosis.MD5_UNEXPECTED}
    assert md5_diagnosis.blame(SESSIONS, up, False, False) == {}
    assert md5_diagnosis.blame(SESSIONS, {SIGNED, PLAIN, UP}, True, True) == {}


def state_with_sessions() -> RoutingState:
    state = RoutingState()
    state.desired = DesiredState(SESSIONS, None, None)  # type: ignore[arg-type]
    state.peer_state[SIGNED] = (SessionState.DOWN, 100.0, "closing connection")
    state.peer_state[UP] = (SessionState.UP, 50.0, "")
    return state


def test_the_reason_shows_and_the_log_says_it_once_a_minute(
    caplog: pytest.LogCaptureFixture,
) -> None:
    state = state_with_sessions()
    watch = Md5Watch(lambda: Md5Counters(), state, log_every=60)
    with caplog.at_level(logging.WARNING, "l3fabric.agent.routing"):
        for _ in range(5):  # a peer retrying every few seconds
            watch.report(mismatch_rose=True, unexpected_rose=False)
    assert state.peer_state[SIGNED] == (SessionState.DOWN, 100.0, md5_diagnosis.MD5_MISMATCH)
    assert state.peer_state[UP] == (SessionState.UP, 50.0, "")
    logged = [r for r in caplog.records if getattr(r, "reason", "") == md5_diagnosis.MD5_MISMATCH]
    assert len(logged) == 1 and logged[0].peer == str(SIGNED)  # type: ignore[attr-defined]


class ReadingsDone(Exception):
    pass


def watch_readings(*readings: Md5Counters) -> RoutingState:
    """Run a watch over these successive readings; the state it left."""
    state = state_with_sessions()
    left = list(readings)

    def read() -> Md5Counters:
        if not left:
            raise ReadingsDone
        return left.pop(0)

    with pytest.raises(ReadingsDone):
        asyncio.run(Md5Watch(read, state, poll=0.01).watch())
    return state


def test_the_watch_reports_only_a_rise() -> None:
    quiet = watch_readings(Md5Counters(failure=4), Md5Counters(failure=4, unexpected=0))
    assert quiet.peer_state[SIGNED][2] == "closing connection"
    rose = watch_readings(Md5Counters(failure=4), Md5Counters(not_found=1, failure=4))
    assert rose.peer_state[SIGNED][2] == md5_diagnosis.MD5_MISMATCH
    assert PLAIN not in rose.peer_state
