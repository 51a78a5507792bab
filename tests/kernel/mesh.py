"""An in-process stand-in for BGP between routing controllers (a test double, no I/O).

Inside the throw-away VM every process start costs seconds (the guest reads the host's
files over 9p under emulation: ExaBGP alone takes ~45 s to start there), so the kernel
tests run the agents' routing controllers in one process and let this mesh carry what BGP
would: each controller's exports reach every controller it has a session with, next hop =
the exporting node's address, with session-up, End-of-RIB and withdrawals. BGP itself is
tested against real ExaBGP, BIRD and FRR outside the VM; what the VM adds is the kernel's
IP-in-IP.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Collection, Iterable, Sequence
from ipaddress import IPv4Address
from typing import Any

from bgp_speaker.bgp.routes import (
    EndOfRib,
    IPAddr,
    IPNet,
    PathAttributes,
    PeerOpened,
    PeerStateChanged,
    RoutesAnnounced,
    RoutesWithdrawn,
    SessionSpec,
    SessionState,
    SpeakerEvent,
)


class Mesh:
    def __init__(self) -> None:
        self.speakers: dict[IPAddr, MeshSpeaker] = {}
        self.up: set[frozenset[IPAddr]] = set()

    def speaker(self, address: IPv4Address) -> MeshSpeaker:
        speaker = self.speakers[address] = MeshSpeaker(self, address)
        return speaker

    def connect(self) -> None:
        """Bring up every session both ends want; drop those one end no longer wants."""
        for a, left in self.speakers.items():
            for b, right in self.speakers.items():
                pair = frozenset({a, b})
                wanted = a != b and b in left.peers and a in right.peers
                if wanted and pair not in self.up and a < b:
                    self.up.add(pair)
                    for side, other in ((left, right), (right, left)):
                        # Hold time 0: no keepalives on the mesh, so no hold timer either.
                        side.deliver(PeerOpened(other.address, other.address, None, 0))
                        side.deliver(PeerStateChanged(other.address, SessionState.UP))
                        if other.exports:
                            side.deliver(other.announcement(other.exports))
                elif not wanted and pair in self.up:
                    self.up.discard(pair)
                    for side, other in ((left, right), (right, left)):
                        side.deliver(PeerStateChanged(other.address, SessionState.DOWN, "gone"))

    def neighbours(self, speaker: MeshSpeaker) -> list[MeshSpeaker]:
        return [
            self.speakers[p] for p in self.speakers
            if frozenset({p, speaker.address}) in self.up and p != speaker.address
        ]  # fmt: skip


class MeshSpeaker:
    """The routing controller's Speaker, on the mesh."""

    def __init__(self, mesh: Mesh, address: IPv4Address) -> None:
        self.mesh = mesh
        self.address = address
        self.exports: set[IPNet] = set()
        self.peers: set[IPAddr] = set()
        self.sessions: tuple[SessionSpec, ...] = ()
        self._queue: asyncio.Queue[SpeakerEvent] = asyncio.Queue()

    def deliver(self, event: SpeakerEvent) -> None:
        self._queue.put_nowait(event)

    def announcement(self, prefixes: Iterable[IPNet]) -> RoutesAnnounced:
        return RoutesAnnounced(self.address, tuple(sorted(prefixes, key=str)),
                               PathAttributes(self.address))  # fmt: skip

    async def set_sessions(
        self,
        sessions: Sequence[SessionSpec],
        *,
        handed_over: Collection[IPAddr] = (),
        listen: bool = True,
    ) -> bool:
        self.sessions = tuple(sessions)
        self.peers = {s.peer_ip for s in sessions}
        self.mesh.connect()
        return True

    async def announce(self, prefixes: Iterable[IPNet], **_: Any) -> None:
        new = set(prefixes) - self.exports
        self.exports |= new
        for other in self.mesh.neighbours(self):
            if new:
                other.deliver(self.announcement(new))

    async def withdraw(self, prefixes: Iterable[IPNet]) -> None:
        gone = set(prefixes) & self.exports
        self.exports -= gone
        for other in self.mesh.neighbours(self):
            if gone:
                other.deliver(RoutesWithdrawn(self.address, tuple(gone)))

    async def send_eor(self, peer: IPAddr | None = None, afi: int = 4) -> None:
        for other in self.mesh.neighbours(self):
            if peer is None or other.address == peer:
                other.deliver(EndOfRib(self.address))

    async def route_refresh(self, peer: IPAddr | None = None, afi: int = 4) -> None:
        for other in self.mesh.neighbours(self):
            if (peer is None or other.address == peer) and other.exports:
                self.deliver(other.announcement(other.exports))

    async def events(self) -> AsyncIterator[SpeakerEvent]:
        while True:
            yield await self._queue.get()
