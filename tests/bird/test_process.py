"""BirdReflector against real BIRD 2 processes in real network namespaces: no mocks.

Topology (one per module; tests run in file order and build on each other's state)::

    ns "<prefix>rr": 10.98.0.1, the reflector's BIRD (BirdReflector, tethered to this process)
        ──veth──
    ns "<prefix>cl": 10.98.0.2, a client BIRD this test starts (announces a pool route and one
                     outside the pools; installs what it learns in its kernel)

and in ns "<prefix>rr" a BIRD standing in for the node's own ExaBGP on the loopback session
(127.0.0.2 -> 127.0.0.1), announcing the node's block NODE_BLOCK.

Both ends dial (connect retry 1 s on the client, error wait 1-2 s), so a session returns in
seconds after the reflector's BIRD restarts. BIRD's "since" is epoch seconds (the rendered
`timeformat protocol "%s"`): a session reset between two readings changes it. The client BIRD
and the node-speaker BIRD are stopped by PID and both namespaces deleted in the fixture's
teardown.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from ipaddress import IPv4Address, ip_address, ip_network
from pathlib import Path
from typing import Any

import pytest

from bgp_speaker.bgp.reflection import (
    ReflectorDesired,
    ReflectorSessionState,
    node_speaker_session,
    reflector_desired,
)
from bgp_speaker.bgp.routes import PeerType, SessionSpec
from bgp_speaker.bird.config import protocol_name
from bgp_speaker.bird.control import bird_command
from bgp_speaker.bird.process import RELOAD_DEBOUNCE, BirdReflector
from tests.fabric.harness import RouteMonitor

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("bird") is None or shutil.which("ip") is None,
        reason="needs root (network namespaces), iproute2 and bird2 (Debian package bird2)",
    ),
]

PREFIX = f"l3d-{os.getpid() % 10000}-"
RR, CLIENT = IPv4Address("10.98.0.1"), IPv4Address("10.98.0.2")
CLUSTER = IPv4Address("244.0.0.1")
AS = 64512
POOLS = ((ip_network("10.244.0.0/16"), 26),)
NODE_BLOCK = "10.244.2.0/26"
SETTLE = RELOAD_DEBOUNCE * 3
"""Long enough for the reflector's worker to have acted on an apply."""

CLIENT_CONF = f"""\
router id {CLIENT};
timeformat protocol "%s";
protocol device {{}}
protocol static {{ ipv4; route 10.244.1.0/26 blackhole; route 192.0.2.0/24 blackhole; }}
protocol bgp reflector {{
  local {CLIENT} as {AS};
  neighbor {RR} as {AS};
  hold time 9; keepalive time 3; connect retry time 1; error wait time 1,2;
  graceful restart on;
  direct;
  ipv4 {{ import all; export all; next hop self; }};
}}
protocol kernel {{ ipv4 {{ export where source = RTS_BGP; }}; }}
"""

# The node's ExaBGP comes back to a restarted BIRD seconds later (its reconnect interval):
# this stand-in waits 3 s too, so the client session is back before it.
SPEAKER_CONF = f"""\
router id {RR};
protocol device {{}}
protocol static {{ ipv4; route {NODE_BLOCK} blackhole; }}
protocol bgp reflector {{
  local 127.0.0.2 as {AS};
  neighbor 127.0.0.1 as {AS};
  strict bind;
  hold time 9; keepalive time 3; connect retry time 3; error wait time 3,3;
  graceful restart on;
  ipv4 {{ import all; export all; }};
}}
"""


def sh(*argv: str) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, f"{argv}: {done.stderr}"
    return done.stdout


def session(peer: str, **extra: Any) -> SessionSpec:
    return SessionSpec(ip_address(peer), AS, AS, RR, RR, PeerType.RR_CLIENT, hold_time=9,
                       keepalive_time=3, rr_client=True, name="clients", **extra)  # fmt: skip


def desired(*sessions: SessionSpec) -> ReflectorDesired:
    speaker = node_speaker_session(RR, AS, 9, 3, 120)
    return reflector_desired(RR, CLUSTER, AS, POOLS, sessions, speaker, frozenset(), {})


GOOD = desired(session(str(CLIENT)))


@dataclass
class Lab:
    loop: asyncio.AbstractEventLoop
    reflector: BirdReflector
    rr_netns: str
    client_netns: str
    client: subprocess.Popen[bytes]
    speaker: subprocess.Popen[bytes]

    def run(self, coro: Any, timeout: float = 60.0) -> Any:
        return self.loop.run_until_complete(asyncio.wait_for(coro, timeout))

    def apply(self, *wanted: ReflectorDesired | None, gap: float = 0.0) -> None:
        """Apply each of ``wanted`` in turn (``gap`` s apart), from inside the event loop."""

        async def go() -> None:
            for i, one in enumerate(wanted):
                if i and gap:
                    await asyncio.sleep(gap)
                self.reflector.apply(one)

        self.run(go())

    def pause(self, seconds: float) -> None:
        """Let the reflector's tasks run for a while."""
        self.run(asyncio.sleep(seconds))

    def sessions(self) -> dict[str, ReflectorSessionState]:
        return {s.name: s for s in self.run(self.reflector.sessions())}

    def until(self, check: Callable[[], list[str]], what: str, timeout: float = 30.0) -> None:
        """Run the loop until ``check`` finds no problem."""
        deadline = time.monotonic() + timeout
        while problems := check():
            assert time.monotonic() < deadline, f"no {what} after {timeout} s: {problems}"
            self.pause(0.1)

    def client_up(self) -> list[str]:
        seen = self.sessions().get(protocol_name(CLIENT))
        if seen is None or not seen.established:
            return [f"client session {seen}"]
        return []

    def recovered(self) -> list[str]:
        status = self.run(bird_command(self.reflector.socket_path, "show status")).text()
        return ["graceful restart recovery in progress"] if "recovery" in status.lower() else []

    def all_up(self) -> list[str]:
        """Both sessions established and the node's block in the client's kernel."""
        sessions = self.sessions()
        if set(sessions) != {protocol_name(CLIENT), "node_speaker"}:
            return [f"BIRD's sessions: {sorted(sessions)}"]
        problems = [f"{n}: {s.bgp_state}" for n, s in sessions.items() if not s.established]
        if NODE_BLOCK not in sh("ip", "-n", self.client_netns, "route", "show", NODE_BLOCK):
            problems.append(f"{NODE_BLOCK} not in the client's kernel")
        return problems


def start_bird(tmp: Path, name: str, netns: str, conf: str) -> subprocess.Popen[bytes]:
    (tmp / f"{name}.conf").write_text(conf)
    return subprocess.Popen(
        ["ip", "netns", "exec", netns, "bird", "-f", "-c", str(tmp / f"{name}.conf"),
         "-s", str(tmp / f"{name}.ctl"), "-P", str(tmp / f"{name}.pid")],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    tmp = tmp_path_factory.mktemp("bird")
    rr_ns, cl_ns = f"{PREFIX}rr", f"{PREFIX}cl"
    veth = f"l3d{os.getpid() % 10000}"
    loop = asyncio.new_event_loop()
    created: list[str] = []
    client = speaker = None
    reflector: BirdReflector | None = None
    try:
        for ns in (rr_ns, cl_ns):
            sh("ip", "netns", "add", ns)
            created.append(ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "link", "add", f"{veth}r", "netns", rr_ns, "type", "veth",
           "peer", f"{veth}c", "netns", cl_ns)  # fmt: skip
        for ns, dev, addr in ((rr_ns, f"{veth}r", RR), (cl_ns, f"{veth}c", CLIENT)):
            sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
        client = start_bird(tmp, "client", cl_ns, CLIENT_CONF)
        speaker = start_bird(tmp, "speaker", rr_ns, SPEAKER_CONF)
        reflector = BirdReflector(tmp / "state" / "bird", netns=rr_ns)
        yield Lab(loop, reflector, rr_ns, cl_ns, client, speaker)
    finally:
        if reflector is not None:
            loop.run_until_complete(reflector.stop())
        for proc in (client, speaker):
            if proc is not None:
                proc.kill()  # `ip netns exec` execs bird: this PID is the BIRD
                proc.wait()
        loop.close()
        for ns in created:
            subprocess.run(["ip", "netns", "del", ns], check=False)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def others_in(netns: str, lab: Lab) -> list[str]:
    """The processes in ``netns`` but the node-speaker stand-in."""
    return [p for p in sh("ip", "netns", "pids", netns).split() if int(p) != lab.speaker.pid]


def modes(reflector: BirdReflector) -> dict[str, int]:
    paths = (reflector.workdir, reflector.config_path, reflector.socket_path)
    return {path.name: stat.S_IMODE(path.stat().st_mode) for path in paths}


def test_client_session_establishes_and_is_reported(lab: Lab) -> None:
    lab.apply(GOOD)
    lab.until(lab.client_up, "established session with the client BIRD")
    state = lab.reflector.describe()
    assert state["running"] and alive(state["pid"]), state
    assert (state["restarts"], state["reloads"], state["last_error"]) == (0, 0, ""), state
    # The client sends a pool route and one outside every pool: only the pool route is in.
    lab.until(lambda: [] if lab.sessions()[protocol_name(CLIENT)].imported == 1 else ["routes"],
              "the client's pool route")  # fmt: skip
    sessions = lab.sessions()
    client = sessions[protocol_name(CLIENT)]
    assert client.peer == CLIENT and client.last_error == "" and client.since > 0
    assert set(sessions) == {protocol_name(CLIENT), "node_speaker"}
    # The node's own block, over the loopback session, reaches the client.
    lab.until(lab.all_up, "the node's block at the client")
    speaker = lab.sessions()["node_speaker"]
    assert speaker.peer == IPv4Address("127.0.0.2") and speaker.imported == 1, speaker
    route = sh("ip", "-n", lab.client_netns, "route", "show", NODE_BLOCK)
    assert f"via {RR}" in route, route


def test_files_are_private(lab: Lab) -> None:
    assert modes(lab.reflector) == {"bird": 0o700, "bird.conf": 0o600, "bird.ctl": 0o600}
    assert stat.S_ISSOCK(lab.reflector.socket_path.stat().st_mode)


def test_the_same_desired_again_reloads_nothing(lab: Lab) -> None:
    before = lab.reflector.describe()
    since = lab.sessions()[protocol_name(CLIENT)].since
    written = lab.reflector.config_path.stat().st_mtime_ns
    lab.apply(GOOD)
    lab.apply(desired(session(str(CLIENT))))  # equal, not the same object
    lab.pause(SETTLE + 1.0)  # BIRD's "since" has one-second resolution
    assert lab.reflector.describe() == before
    assert lab.sessions()[protocol_name(CLIENT)].since == since
    assert lab.reflector.config_path.stat().st_mtime_ns == written


def test_a_burst_of_changes_is_one_reload_and_resets_no_other_session(lab: Lab) -> None:
    reloads = lab.reflector.describe()["reloads"]
    since = lab.sessions()[protocol_name(CLIENT)].since
    client = session(str(CLIENT))
    burst = [
        desired(client, session("10.98.0.5")),
        desired(client, session("10.98.0.5"), session("10.98.0.6")),
        desired(client, session("10.98.0.5"), session("10.98.0.6"), session("10.98.0.7")),
    ]
    started = time.monotonic()
    lab.apply(*burst, gap=0.04)
    assert time.monotonic() - started < 0.1 + 0.05  # the three applies within ~0.1 s
    lab.pause(SETTLE + 1.0)
    state = lab.reflector.describe()
    assert state["reloads"] == reloads + 1, state
    assert state["last_error"] == "", state
    sessions = lab.sessions()
    assert {protocol_name(ip_address(f"10.98.0.{n}")) for n in (5, 6, 7)} <= set(sessions)
    client_now = sessions[protocol_name(CLIENT)]
    assert client_now.established and client_now.since == since, client_now
    assert "10.98.0.7" in lab.reflector.config_path.read_text()


def test_a_config_bird_cannot_take_keeps_the_last_good_one(lab: Lab) -> None:
    lab.apply(GOOD)
    lab.pause(SETTLE)
    good = lab.reflector.describe()
    good_text = lab.reflector.config_path.read_text()
    since = lab.sessions()[protocol_name(CLIENT)].since
    assert set(lab.sessions()) == {protocol_name(CLIENT), "node_speaker"}

    # A password BIRD's strings cannot carry: refused while rendering, naming the BGPPeer.
    quoted = desired(session(str(CLIENT)), session("10.98.0.9", md5_password='say "hi"'))
    lab.apply(quoted)
    lab.pause(SETTLE)
    error = lab.reflector.describe()["last_error"]
    assert "BGPPeer clients: password" in error and "'\"'" in error, error
    # A hold time BIRD refuses (3-65535 or 0): rendered, but `bird -p` says no.
    short_hold = desired(replace(session(str(CLIENT)), hold_time=1))
    lab.apply(short_hold)
    lab.pause(SETTLE + 0.5)
    error = lab.reflector.describe()["last_error"]
    assert "bird -p refused" in error and "old time" in error, error

    state = lab.reflector.describe()
    assert state["running"] and state["pid"] == good["pid"], state
    assert (state["reloads"], state["restarts"]) == (good["reloads"], good["restarts"]), state
    assert lab.reflector.config_path.read_text() == good_text
    sessions = lab.sessions()
    assert set(sessions) == {protocol_name(CLIENT), "node_speaker"}
    assert sessions[protocol_name(CLIENT)].established
    assert sessions[protocol_name(CLIENT)].since == since


def test_bird_killed_is_restarted_and_the_client_returns(lab: Lab) -> None:
    lab.apply(GOOD)
    lab.pause(SETTLE)
    lab.until(lab.all_up, "every session up before the kill")
    before = lab.reflector.describe()
    old_pid = before["pid"]
    os.kill(old_pid, signal.SIGKILL)
    lab.until(
        lambda: [] if lab.reflector.describe()["restarts"] == before["restarts"] + 1 else ["no"],
        "restart counted",
    )
    lab.until(lab.all_up, "every session back after BIRD's restart")
    state = lab.reflector.describe()
    assert state["running"] and state["pid"] != old_pid and alive(state["pid"]), state
    assert not alive(old_pid)
    assert state["restarts"] == before["restarts"] + 1, state
    assert "BIRD exited with" in state["last_error"], state
    # The restarted BIRD serves the same configuration.
    assert lab.reflector.config_path.read_text().count("protocol bgp ") == 2


def test_a_restarted_bird_does_not_withdraw_the_nodes_block(lab: Lab) -> None:
    """The client keeps the node's block (graceful restart) while BIRD restarts, and the new
    BIRD must not end its initial table before the node's speaker is back: a client that gets
    End-of-RIB without the block drops its stale copy, and the node is unreachable meanwhile."""
    lab.until(lab.all_up, "every session up before the kill")
    # Not while the BIRD the previous test restarted still recovers: a client that loses the
    # session again before the End-of-RIB that ends its graceful restart drops what it kept.
    lab.until(lab.recovered, "the previous restart's recovery to end")
    restarts = lab.reflector.describe()["restarts"]
    monitor = RouteMonitor(lab.client_netns, device=f"l3d{os.getpid() % 10000}c")
    try:
        os.kill(lab.reflector.describe()["pid"], signal.SIGKILL)
        lab.until(
            lambda: [] if lab.reflector.describe()["restarts"] == restarts + 1 else ["no"],
            "restart counted",
        )
        lab.until(lab.all_up, "every session back after BIRD's restart")
        lab.pause(1.0)
    finally:
        monitor.close()
    assert [line for line in monitor.lines if NODE_BLOCK in line] == []


def test_files_stay_private_after_a_restart(lab: Lab) -> None:
    """The BIRD the supervisor restarted creates a new control socket: 0600 as the first."""
    assert lab.reflector.describe()["restarts"] >= 1
    assert modes(lab.reflector) == {"bird": 0o700, "bird.conf": 0o600, "bird.ctl": 0o600}


def test_apply_none_stops_bird(lab: Lab) -> None:
    pid = lab.reflector.describe()["pid"]
    assert pid is not None and alive(pid)
    lab.apply(None)
    lab.pause(SETTLE)
    state = lab.reflector.describe()
    assert state["running"] is False and state["pid"] is None, state
    assert not lab.reflector.active
    assert not alive(pid)
    assert lab.run(lab.reflector.sessions()) == ()
    assert others_in(lab.rr_netns, lab) == []


def test_stop_leaves_no_process(lab: Lab) -> None:
    lab.apply(GOOD)  # a reflector again: BIRD starts anew
    lab.until(lambda: [] if lab.reflector.describe()["running"] else ["down"], "BIRD started")
    pid = lab.reflector.describe()["pid"]
    lab.until(lab.client_up, "the client session with the new BIRD")
    lab.run(lab.reflector.stop())
    assert not alive(pid)
    assert lab.reflector.describe()["running"] is False
    assert others_in(lab.rr_netns, lab) == []
