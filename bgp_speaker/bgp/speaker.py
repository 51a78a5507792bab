"""The BGP speaker as routing sees it: the seam between the routing controller (and route
reflection) and the ExaBGP adapter, which implements it (`exabgp.process.ExaBGPSpeaker`).

Two Protocols, by who needs what: reflection (`peering.Peering`) only sends learned routes
to chosen sessions; the controller also configures the sessions, announces the node's own
prefixes, asks for End-of-RIB and route refreshes, and reads what the speaker reports.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Protocol

from bgp_speaker.bgp.routes import IPAddr, IPNet, PathAttributes, SessionSpec, SpeakerEvent

__all__ = ["ReflectingSpeaker", "Speaker"]


class ReflectingSpeaker(Protocol):
    """What route reflection needs: the configured sessions, and sending to some of them."""

    @property
    def sessions(self) -> Sequence[SessionSpec]:
        """The sessions the speaker was last given (`Speaker.set_sessions`)."""
        ...

    async def withdraw(self, prefixes: Iterable[IPNet], *, peers: Sequence[IPAddr] = ()) -> None:
        """Stop advertising ``prefixes``: our exports (no peers) or what we reflect to peers."""
        ...

    async def reflect(
        self, peers: Sequence[IPAddr], prefixes: Iterable[IPNet], attributes: PathAttributes
    ) -> None:
        """Advertise learned routes to these sessions with their attributes unchanged."""
        ...


class Speaker(ReflectingSpeaker, Protocol):
    """What the routing controller needs of a BGP speaker."""

    async def set_sessions(self, sessions: Sequence[SessionSpec]) -> bool:
        """Make the speaker's neighbours exactly ``sessions``; False: nothing changed."""
        ...

    async def announce(self, prefixes: Iterable[IPNet], *, communities: Sequence[str] = ()) -> None:
        """Advertise ``prefixes`` (next hop self) to every session, now and later."""
        ...

    async def send_eor(self, peer: IPAddr | None = None, afi: int = 4) -> None:
        """End-of-RIB to ``peer`` (None: every established session)."""
        ...

    async def route_refresh(self, peer: IPAddr | None = None, afi: int = 4) -> None:
        """Ask ``peer`` (None: every established session) to send all its routes again."""
        ...

    def events(self) -> AsyncIterator[SpeakerEvent]:
        """What the speaker reports, in order, until it stops."""
        ...
