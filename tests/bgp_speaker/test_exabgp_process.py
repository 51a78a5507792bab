"""ExaBGPSpeaker against real ExaBGP processes in real network namespaces — no mocks.

Topology (one per module, shared because sessions take ~1.3 s to establish)::

    ns "a": 10.0.0.1 ──veth── ns "b": 10.0.0.2 (speaker B), 10.0.0.3 (speaker C),
                                      10.0.0.4 (speaker D, in a child process, added late)

A is the mesh's lower address, so it connects; B, C and D are passive. B is started first
(DESIGN §8: a passive peer that listens before the active one dials avoids ExaBGP's
reconnect backoff). Tests run in file order and build on each other's state; each one
checks what it changed. Every process is stopped by PID and every namespace deleted in
the fixtures' teardown. Run with ``-s`` to see the timings.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from ipaddress import IPv4Address, IPv4Network, ip_address
from pathlib import Path

import pytest

from bgp_speaker.bgp.routes import (
    EndOfRib,
    PathAttributes,
    PeerStateChanged,
    RoutesAnnounced,
    RoutesWithdrawn,
    SessionState,
    SpeakerRestarted,
)
from bgp_speaker.exabgp.codec import MalformedMessage, parse_line
from bgp_speaker.exabgp.process import CommandFailed, ConfigRejected, ExaBGPSpeaker
from tests.bgp_speaker.conftest import (
    GOLDEN,
    ExaBGPLab,
    Node,
    mesh_session,
    needs_exabgp_root,
    sh,
)

pytestmark = [pytest.mark.root, needs_exabgp_root]

REPO = Path(__file__).resolve().parents[2]
A_IP, B_IP, C_IP = ip_address("10.0.0.1"), ip_address("10.0.0.2"), ip_address("10.0.0.3")
# TCP-MD5 on A-B, with characters ExaBGP's config syntax cannot quote (sent base64).
PASSWORD = 'it\'s "l3" \\ fabric'
BLOCKS = [IPv4Network(f"10.60.0.{n * 64}/26") for n in range(3)]


def up(peer: object):
    return lambda e: isinstance(e, PeerStateChanged) and e.peer == peer and e.state == "up"


def down(peer: object):
    return lambda e: isinstance(e, PeerStateChanged) and e.peer == peer and e.state == "down"


def announced(peer: object, prefix: IPv4Network):
    return lambda e: isinstance(e, RoutesAnnounced) and e.peer == peer and prefix in e.prefixes


@pytest.fixture(scope="module")
def mesh(exabgp_lab: ExaBGPLab) -> dict[str, Node]:
    lab = exabgp_lab
    ns_a, ns_b = lab.netns("a"), lab.netns("b")
    lab.link(ns_a, "10.0.0.1", ns_b, "10.0.0.2")
    lab.add_address(ns_b, "10.0.0.3")
    b = lab.node("b", ns_b, "10.0.0.2")
    c = lab.node("c", ns_b, "10.0.0.3")
    a = lab.node("a", ns_a, "10.0.0.1")
    started = time.monotonic()
    lab.run(
        b.speaker.set_sessions(
            [mesh_session("10.0.0.2", "10.0.0.1", passive=True, password=PASSWORD)]
        )
    )
    lab.run(c.speaker.set_sessions([mesh_session("10.0.0.3", "10.0.0.1", passive=True)]))
    lab.run(
        a.speaker.set_sessions(
            [mesh_session("10.0.0.1", "10.0.0.2", passive=False, password=PASSWORD)]
        )
    )
    lab.run(b.log.wait(up(A_IP)))
    lab.run(a.log.wait(up(B_IP)))
    print(f"\nsession A-B established {time.monotonic() - started:.2f} s after the first start")
    return {"a": a, "b": b, "c": c}


def test_lower_address_connects_and_higher_is_passive(mesh: dict[str, Node]) -> None:
    a, b = mesh["a"], mesh["b"]
    # One TCP connection, dialled by A (ephemeral port) to B's port 179: no collision.
    conns_a = sh("ip", "netns", "exec", a.netns, "ss", "-tnH", "state", "established")
    conns_b = sh("ip", "netns", "exec", b.netns, "ss", "-tnH", "state", "established")
    lines_a = [line.split() for line in conns_a.splitlines() if "10.0.0.2:179" in line]
    assert len(lines_a) == 1, conns_a
    local = lines_a[0][-2]
    assert local.startswith("10.0.0.1:") and local != "10.0.0.1:179"
    assert [line for line in conns_b.splitlines() if "10.0.0.2:179" in line and "10.0.0.1:" in line]
    for node in (a, b):
        states = [e.state for e in node.log.events if isinstance(e, PeerStateChanged)]
        assert states[-1] == SessionState.UP
        assert states.count(SessionState.UP) == 1, states  # established once, no flap


def test_announce_reaches_peer_with_next_hop_and_attributes(
    exabgp_lab: ExaBGPLab, mesh: dict[str, Node]
) -> None:
    a, b = mesh["a"], mesh["b"]
    mark = b.log.mark()
    exabgp_lab.run(
        a.speaker.announce(BLOCKS, local_pref=200, med=5, communities=["64512:100", "64512:7"])
    )
    got: set[IPv4Network] = set()
    while got != set(BLOCKS):
        event = exabgp_lab.run(b.log.wait(lambda e: isinstance(e, RoutesAnnounced), since=mark))
        mark = b.log.events.index(event) + 1
        assert event.peer == A_IP
        assert event.attributes == PathAttributes(
            next_hop=A_IP, as_path=(), origin="igp", local_pref=200, med=5,
            communities=("64512:7", "64512:100"),  # a set: sorted numerically
        )  # fmt: skip
        got.update(event.prefixes)


def test_end_of_rib_reaches_peer(exabgp_lab: ExaBGPLab, mesh: dict[str, Node]) -> None:
    a, b = mesh["a"], mesh["b"]
    mark = b.log.mark()
    exabgp_lab.run(a.speaker.send_eor(B_IP))
    exabgp_lab.run(b.log.wait(lambda e: e == EndOfRib(A_IP), since=mark))


def test_withdraw_reaches_peer(exabgp_lab: ExaBGPLab, mesh: dict[str, Node]) -> None:
    a, b = mesh["a"], mesh["b"]
    mark = b.log.mark()
    exabgp_lab.run(a.speaker.withdraw(BLOCKS[:2]))
    event = exabgp_lab.run(b.log.wait(lambda e: isinstance(e, RoutesWithdrawn), since=mark))
    assert event == RoutesWithdrawn(A_IP, tuple(BLOCKS[:2]))


def test_adding_a_neighbour_keeps_the_first_and_replays_exports(
    exabgp_lab: ExaBGPLab, mesh: dict[str, Node]
) -> None:
    a, b, c = mesh["a"], mesh["b"], mesh["c"]
    marks = {name: node.log.mark() for name, node in mesh.items()}
    to_b = mesh_session("10.0.0.1", "10.0.0.2", passive=False, password=PASSWORD)
    to_c = mesh_session("10.0.0.1", "10.0.0.3", passive=False)
    assert exabgp_lab.run(a.speaker.set_sessions([to_b, to_c])) is True
    exabgp_lab.run(c.log.wait(up(A_IP), since=marks["c"]))
    # C was not configured when A announced: it gets A's exports all the same.
    exabgp_lab.run(c.log.wait(announced(A_IP, BLOCKS[2]), since=marks["c"]))
    # The same desired state again is not even rendered to ExaBGP.
    assert exabgp_lab.run(a.speaker.set_sessions([to_c, to_b])) is False
    assert not [e for e in a.log.since(marks["a"]) if down(B_IP)(e)]
    assert not [e for e in b.log.since(marks["b"]) if isinstance(e, PeerStateChanged)]


def _reactor_speed(pid: int | None) -> str:
    assert pid is not None
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    [speed] = [v for v in environ if v.startswith(b"exabgp.reactor.speed=")]
    return speed.split(b"=", 1)[1].decode()


def test_invalid_config_is_refused_and_the_daemon_untouched(
    exabgp_lab: ExaBGPLab, mesh: dict[str, Node]
) -> None:
    a, b = mesh["a"], mesh["b"]
    pid, config = a.speaker.pid, a.speaker.config_path.read_text()
    mark_b = b.log.mark()
    twice = mesh_session("10.0.0.1", "10.0.0.2", passive=False, password=PASSWORD)
    with pytest.raises(ConfigRejected, match="two sessions"):
        exabgp_lab.run(a.speaker.set_sessions([twice, twice]))
    # What only ExaBGP's own parser knows: `exabgp validate` refuses it before any reload.
    with pytest.raises(ConfigRejected, match="exabgp validate"):
        exabgp_lab.run(a.speaker._validate("neighbor 10.0.0.2 { bogus 1; }\n", {}))
    assert a.speaker.pid == pid
    assert a.speaker.config_path.read_text() == config
    assert not a.speaker.config_path.with_suffix(".new").exists()
    # Still serving: a route announced now arrives, and B saw no session change.
    prefix = IPv4Network("10.60.1.0/26")
    exabgp_lab.run(a.speaker.announce([prefix]))
    exabgp_lab.run(b.log.wait(announced(A_IP, prefix), since=mark_b))
    assert not [e for e in b.log.since(mark_b) if isinstance(e, PeerStateChanged)]


def test_refused_command_raises_and_later_acks_stay_matched(
    exabgp_lab: ExaBGPLab, mesh: dict[str, Node]
) -> None:
    a, b = mesh["a"], mesh["b"]
    mark = b.log.mark()
    batch = [
        IPv4Network(f"10.{64 + n // 1024}.{n // 4 % 256}.{n % 4 * 64}/26") for n in range(3000)
    ]

    async def both() -> list[object]:
        # ExaBGP refuses an EOR for a peer that is not established at once, ahead of the
        # queued announcements' acks: the speaker must not pair them up wrongly.
        return await asyncio.gather(
            a.speaker.announce(batch),
            a.speaker.send_eor(ip_address("10.0.0.99")),
            a.speaker.announce(BLOCKS[2:]),
            return_exceptions=True,
        )

    first, eor, last = exabgp_lab.run(both())
    assert first is None and last is None
    assert isinstance(eor, CommandFailed) and "10.0.0.99" in str(eor)
    exabgp_lab.run(b.log.wait(announced(A_IP, batch[-1]), since=mark))
    exabgp_lab.run(a.speaker.withdraw(batch))


def test_flood_of_20k_prefixes_arrives_completely(
    exabgp_lab: ExaBGPLab, mesh: dict[str, Node]
) -> None:
    a, b = mesh["a"], mesh["b"]
    prefixes = [IPv4Network(f"10.{128 + n // 256}.{n % 256}.0/26") for n in range(20_000)]
    wanted = set(prefixes)

    async def flood() -> tuple[float, float]:
        mark = b.log.mark()
        started = time.monotonic()
        await a.speaker.announce(prefixes)
        acked = time.monotonic() - started
        seen: set[IPv4Network] = set()
        index = mark
        while not wanted <= seen:
            await b.log.wait(lambda e: isinstance(e, RoutesAnnounced), since=index, timeout=30)
            for event in b.log.events[index:]:
                if isinstance(event, RoutesAnnounced) and event.peer == A_IP:
                    seen.update(event.prefixes)
            index = len(b.log.events)
        return acked, time.monotonic() - started

    acked, arrived = exabgp_lab.run(flood())
    print(f"\n20,000 prefixes: acked by A's ExaBGP in {acked:.2f} s, all at B in {arrived:.2f} s")

    started = time.monotonic()
    exabgp_lab.run(a.speaker.withdraw(prefixes))
    print(f"20,000 withdrawals acked in {time.monotonic() - started:.2f} s")


def test_sessions_change_while_routes_are_queued(
    exabgp_lab: ExaBGPLab, mesh: dict[str, Node]
) -> None:
    """ExaBGP drops a SIGUSR1 that arrives while it still has routes queued for a peer; the
    speaker re-signals until ExaBGP logs the reload, so the change lands all the same."""
    a, b = mesh["a"], mesh["b"]
    keep = [
        mesh_session("10.0.0.1", "10.0.0.2", passive=False, password=PASSWORD),
        mesh_session("10.0.0.1", "10.0.0.3", passive=False),
    ]
    # Nobody there; passive, so its own queue never defers a reload (only active ones do).
    extra = mesh_session("10.0.0.1", "10.0.0.5", passive=True)
    prefixes = [IPv4Network(f"10.{200 + n // 256}.{n % 256}.0/26") for n in range(4_000)]
    mark = b.log.mark()

    async def both() -> None:
        flood = asyncio.create_task(a.speaker.announce(prefixes))
        await asyncio.sleep(0.3)  # the first commands are in ExaBGP: its adj-RIB-out is busy
        assert await a.speaker.set_sessions([*keep, extra]) is True
        await flood
        await b.log.wait(announced(A_IP, prefixes[-1]), since=mark, timeout=30)
        await a.speaker.withdraw(prefixes)
        assert await a.speaker.set_sessions(keep) is True

    exabgp_lab.run(both())
    assert not [e for e in b.log.since(mark) if isinstance(e, PeerStateChanged)]


def test_a_stalled_agent_never_stalls_exabgp_and_resyncs_after(
    exabgp_lab: ExaBGPLab, mesh: dict[str, Node], tmp_path: Path
) -> None:
    """DESIGN §5: ExaBGP's API writes block; an agent that stops reading must not freeze it.

    Node D's agent runs in a child process that the test SIGSTOPs for longer than the hold
    time while A floods D. D's relay (4 KiB buffer) keeps ExaBGP unblocked, so the session
    survives; it drops output, so after SIGCONT D's speaker restarts ExaBGP to resync.
    """
    lab, a = exabgp_lab, mesh["a"]
    lab.add_address(mesh["b"].netns, "10.0.0.4")
    d_ip = ip_address("10.0.0.4")
    argv = [mesh["b"].netns, "10.0.0.4", "10.0.0.1", str(tmp_path / "d"), "4096", "3"]
    child = StalledAgent(argv)
    # ~360 KB of JSON at D: more than the socket (~220 KB) and the relay (4 KiB) hold.
    prefixes = [IPv4Network(f"10.{160 + n // 256}.{n % 256}.0/26") for n in range(12_000)]
    keep = [
        mesh_session("10.0.0.1", "10.0.0.2", passive=False, password=PASSWORD),
        mesh_session("10.0.0.1", "10.0.0.3", passive=False),
    ]
    try:
        child.wait(lambda e: e["event"] == "configured")
        lab.run(
            a.speaker.set_sessions(
                [*keep, mesh_session("10.0.0.1", "10.0.0.4", passive=False, hold_time=3)]
            )
        )
        child.wait(lambda e: e["event"] == "PeerStateChanged" and e["state"] == "up")
        lab.run(a.log.wait(up(d_ip)))
        mark = a.log.mark()
        os.kill(child.proc.pid, signal.SIGSTOP)
        stopped = time.monotonic()
        lab.run(a.speaker.announce(prefixes))
        lab.run(asyncio.sleep(max(0.0, stopped + 5 - time.monotonic())))  # > hold time 3 s
        assert not [e for e in a.log.since(mark) if down(d_ip)(e)], "D's ExaBGP froze"
        os.kill(child.proc.pid, signal.SIGCONT)
        restarted = child.wait(lambda e: e["event"] == "SpeakerRestarted", timeout=20)
        assert "dropped" in restarted["reason"]
        after = child.events.index(restarted) + 1
        child.wait(lambda e: e["event"] == "PeerStateChanged" and e["state"] == "up", since=after)
        print(f"\nD stalled 5 s under a 12k flood, session kept; resynced "
              f"{time.monotonic() - stopped - 5:.2f} s after SIGCONT")  # fmt: skip
    finally:
        os.kill(child.proc.pid, signal.SIGCONT)
        child.close(tmp_path / "d" / "exabgp.pid")
        lab.run(a.speaker.set_sessions(keep))
        lab.run(a.speaker.withdraw(prefixes))


class StalledAgent:
    """Node D's agent: this module run as a script, in its own process (see _child_main)."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.bgp_speaker.test_exabgp_process", *argv],
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.events: list[dict[str, object]] = []
        self.changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self.changed:
                self.events.append(json.loads(line))
                self.changed.notify_all()

    def wait(self, predicate, timeout: float = 10, since: int = 0) -> dict[str, object]:
        with self.changed:
            deadline = time.monotonic() + timeout
            while True:
                for event in self.events[since:]:
                    if predicate(event):
                        return event
                if not self.changed.wait(max(0.0, deadline - time.monotonic())):
                    raise AssertionError(f"child: no matching event; last {self.events[-5:]}")

    def close(self, pid_file: Path) -> None:
        self.proc.terminate()  # it stops its speaker, which kills its ExaBGP
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        if pid_file.exists():  # it did not get to stop its ExaBGP: do it by PID
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid_file.read_text()), signal.SIGKILL)


def test_killed_exabgp_is_restarted_and_the_session_returns(
    exabgp_lab: ExaBGPLab, mesh: dict[str, Node]
) -> None:
    a, b = mesh["a"], mesh["b"]
    mark_a, mark_b = a.log.mark(), b.log.mark()
    old_pid = a.speaker.pid
    assert old_pid is not None
    started = time.monotonic()
    os.kill(old_pid, signal.SIGKILL)
    restarted = exabgp_lab.run(a.log.wait(lambda e: isinstance(e, SpeakerRestarted), since=mark_a))
    noticed = time.monotonic() - started
    assert "-9" in restarted.reason
    assert a.speaker.pid not in (None, old_pid)
    exabgp_lab.run(a.log.wait(up(B_IP), since=mark_a))
    exabgp_lab.run(b.log.wait(up(A_IP), since=mark_b))
    # The restarted ExaBGP knew nothing: the speaker replayed A's exports to it.
    exabgp_lab.run(b.log.wait(announced(A_IP, BLOCKS[2]), since=mark_b))
    print(f"\nrestarted and ready {noticed:.2f} s after SIGKILL, "
          f"session and routes back {time.monotonic() - started:.2f} s after")  # fmt: skip


def test_every_captured_api_line_decodes(mesh: dict[str, Node]) -> None:
    """Everything real ExaBGP wrote during this module parses (and can refresh golden/)."""
    lines = [line for node in mesh.values() for line in node.raw]
    assert len(lines) > 20
    for line in lines:
        try:
            parse_line(line)
        except MalformedMessage as err:  # pragma: no cover - the assertion message
            raise AssertionError(line) from err
    if os.environ.get("L3FABRIC_UPDATE_GOLDEN"):
        _store_samples(mesh["b"].raw + mesh["a"].raw)


def _store_samples(lines: list[str]) -> None:
    """One captured line per kind of message, for the codec's unit tests."""
    picked: dict[str, str] = {}
    for line in lines:
        text = line.strip()
        if text in ("done", "error"):
            picked.setdefault(text, text)
            continue
        try:
            obj = json.loads(text)
        except ValueError:
            continue
        kind = obj.get("type") or obj.get("l3fabric-relay", "")
        message = obj.get("neighbor", {}).get("message", {})
        update = message.get("update", {})
        if kind == "state":
            kind = f"state-{obj['neighbor']['state']}"
        elif "eor" in message:
            kind = "eor"
        elif "originator-id" in update.get("attribute", {}):
            kind = "update-reflected"
        elif "withdraw" in update:
            kind = "update-withdraw"
        elif "announce" in update:
            kind = "update-announce"
        if len(text) < 4000:  # not one of the flood's 1000-prefix updates
            picked.setdefault(kind, text)
    target = GOLDEN / "exabgp_api_lines.json"
    # Merged: some samples were captured in other runs (an eBGP path, a route refresh).
    samples = json.loads(target.read_text()) if target.exists() else {}
    samples.update(picked)
    target.write_text(json.dumps(samples, indent=1, sort_keys=True) + "\n")


async def _child_main(argv: list[str]) -> None:
    netns, address, peer, workdir, relay_buffer, hold = argv
    speaker = ExaBGPSpeaker(
        workdir, IPv4Address(address), 64512, True, netns, relay_buffer=int(relay_buffer)
    )
    await speaker.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)

    def emit(**fields: object) -> None:
        print(json.dumps(fields, default=str), flush=True)

    async def forward() -> None:
        async for event in speaker.events():
            emit(event=type(event).__name__, **{
                k: v for k, v in vars(event).items() if k in ("peer", "state", "reason")
            })  # fmt: skip

    task = asyncio.create_task(forward())
    await speaker.set_sessions([mesh_session(address, peer, passive=True, hold_time=int(hold))])
    emit(event="configured", pid=speaker.pid)
    await stop.wait()
    await speaker.stop()
    await task


if __name__ == "__main__":
    asyncio.run(_child_main(sys.argv[1:]))
