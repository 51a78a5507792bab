"""Helpers for tests that run real ExaBGP processes in real network namespaces.

``ExaBGPLab`` owns an asyncio loop, the namespaces and veths it creates and the speakers it
starts; ``close`` stops every speaker (each kills its own ExaBGP by PID) and deletes every
namespace by name, also after a failed test. Nothing here touches the host namespace.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address, ip_address
from pathlib import Path
from typing import Any

import pytest

from bgp_speaker.bgp.routes import PeerType, SessionSpec, SpeakerEvent
from bgp_speaker.exabgp.process import ExaBGPSpeaker

GOLDEN = Path(__file__).parent / "golden"
AS = 64512
_names = itertools.count()

needs_exabgp_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("exabgp") is None,
    reason="needs root, iproute2 and exabgp",
)


def sh(*args: str) -> str:
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


def mesh_session(
    local: str, peer: str, *, passive: bool, hold_time: int = 9, password: str | None = None
) -> SessionSpec:
    """A node-to-node mesh session as the agent would resolve it."""
    return SessionSpec(
        peer_ip=ip_address(peer),
        peer_as=AS,
        local_as=AS,
        local_address=ip_address(local),
        router_id=IPv4Address(local),
        peer_type=PeerType.MESH,
        passive=passive,
        hold_time=hold_time,
        md5_password=password,
        name="mesh",
    )


class EventLog:
    """Everything a speaker yields, kept in order, with waiting on a predicate."""

    def __init__(self, speaker: ExaBGPSpeaker) -> None:
        self.events: list[SpeakerEvent] = []
        self._changed = asyncio.Event()
        self._task = asyncio.ensure_future(self._collect(speaker))

    async def _collect(self, speaker: ExaBGPSpeaker) -> None:
        async for event in speaker.events():
            self.events.append(event)
            self._changed.set()

    def mark(self) -> int:
        return len(self.events)

    def since(self, mark: int) -> list[SpeakerEvent]:
        return self.events[mark:]

    async def wait(
        self, predicate: Callable[[SpeakerEvent], bool], timeout: float = 10.0, since: int = 0
    ) -> SpeakerEvent:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        index = since
        while True:
            while index < len(self.events):
                if predicate(self.events[index]):
                    return self.events[index]
                index += 1
            remaining = deadline - loop.time()
            if remaining <= 0:
                tail = self.events[since:][-8:]
                raise AssertionError(f"no matching event within {timeout} s; last: {tail}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)


@dataclass
class Node:
    name: str
    netns: str
    address: str
    speaker: ExaBGPSpeaker
    log: EventLog
    raw: list[str] = field(default_factory=list)  # every API line, as the relay sent it


@dataclass
class ExaBGPLab:
    tmp: Path
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)
    prefix: str = field(default_factory=lambda: f"l3x{os.getpid() % 10000}n{next(_names)}")
    namespaces: list[str] = field(default_factory=list)
    nodes: list[Node] = field(default_factory=list)

    def run(self, coro: Any, timeout: float = 60) -> Any:
        return self.loop.run_until_complete(asyncio.wait_for(coro, timeout))

    def netns(self, suffix: str) -> str:
        name = f"{self.prefix}{suffix}"
        sh("ip", "netns", "add", name)
        self.namespaces.append(name)
        sh("ip", "-n", name, "link", "set", "lo", "up")
        return name

    def link(self, ns_a: str, addr_a: str, ns_b: str, addr_b: str) -> None:
        """A veth pair between two namespaces with one /24 address on each end."""
        index = len(self.namespaces)
        a, b = f"{self.prefix}v{index}a", f"{self.prefix}v{index}b"
        sh("ip", "link", "add", a[:15], "type", "veth", "peer", "name", b[:15])
        sh("ip", "link", "set", a[:15], "netns", ns_a)
        sh("ip", "link", "set", b[:15], "netns", ns_b)
        for ns, dev, addr in ((ns_a, a[:15], addr_a), (ns_b, b[:15], addr_b)):
            sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")

    def add_address(self, ns: str, addr: str) -> None:
        dev = next(
            line.split(":")[1].strip().split("@")[0]
            for line in sh("ip", "-n", ns, "-o", "link", "show", "type", "veth").splitlines()
        )
        sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)

    def node(self, name: str, netns: str, address: str, **kwargs: Any) -> Node:
        raw: list[str] = []
        speaker = ExaBGPSpeaker(
            self.tmp / name, IPv4Address(address), AS, True, netns, api_tap=raw.append, **kwargs
        )
        self.run(speaker.start())
        log = self.run(_make_log(speaker))
        node = Node(name, netns, address, speaker, log, raw)
        self.nodes.append(node)
        return node

    def close(self) -> None:
        try:
            for node in self.nodes:
                try:
                    self.run(node.speaker.stop(), timeout=30)
                except Exception as err:  # keep tearing down the rest
                    print(f"stopping {node.name}: {err!r}")
            self.loop.run_until_complete(_cancel_all())
            self.loop.close()
        finally:
            for name in self.namespaces:
                subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


async def _cancel_all() -> None:
    current = asyncio.current_task()
    tasks = [task for task in asyncio.all_tasks() if task is not current]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _make_log(speaker: ExaBGPSpeaker) -> EventLog:
    return EventLog(speaker)


@pytest.fixture(scope="module")
def exabgp_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ExaBGPLab]:
    """One lab per test module (sessions take ~1.3 s to establish: share them)."""
    lab = ExaBGPLab(tmp_path_factory.mktemp("exabgp"))
    try:
        yield lab
    finally:
        lab.close()
