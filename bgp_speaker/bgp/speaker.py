"""The BGP speakers as routing sees them: the seams between the routing controller and the
ExaBGP adapter (`Speaker`, implemented by `exabgp.process.ExaBGPSpeaker`) and, on a
reflector node, the BIRD adapter (`RouteReflector`, implemented by
`bird.process.BirdReflector`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Collection, Iterable, Sequence
from typing import Any, Protocol

from bgp_speaker.bgp.reflection import ReflectorDesired, ReflectorSessionState
from bgp_speaker.bgp.routes import IPAddr, IPNet, SessionSpec, SpeakerEvent

__all__ = ["RouteReflector", "Speaker"]


class Speaker(Protocol):
    """What the routing controller needs of the node's BGP speaker."""

    @property
    def sessions(self) -> Sequence[SessionSpec]:
        """The sessions the speaker was last given (`set_sessions`)."""
        ...

    async def set_sessions(
        self,
        sessions: Sequence[SessionSpec],
        *,
        handed_over: Collection[IPAddr] = (),
        listen: bool = True,
    ) -> bool:
        """Make the speaker's neighbours exactly ``sessions``; False: nothing changed.
        Sessions removed whose peers are in ``handed_over`` (another speaker takes them) end
        without a NOTIFICATION, so the peers' graceful restart keeps our routes meanwhile.
        ``listen`` False: accept no connections (BIRD listens on a reflector node)."""
        ...

    async def announce(self, prefixes: Iterable[IPNet], *, communities: Sequence[str] = ()) -> None:
        """Advertise ``prefixes`` (next hop self) to every session, now and later."""
        ...

    async def withdraw(self, prefixes: Iterable[IPNet]) -> None:
        """Stop advertising ``prefixes``."""
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


class RouteReflector(Protocol):
    """What the routing controller needs of a reflector node's BIRD."""

    def apply(self, desired: ReflectorDesired | None) -> None:
        """Reflect as ``desired`` (None: this node does not reflect), soon."""
        ...

    async def sessions(self) -> Sequence[ReflectorSessionState]:
        """Its sessions as it reports them now (empty while it does not run)."""
        ...

    @property
    def active(self) -> bool:
        """Whether it has been asked to reflect (its last `apply` was not None)."""
        ...

    def describe(self) -> dict[str, Any]:
        """For `node status`: whether it runs, its restarts and reloads, its last error."""
        ...

    async def stop(self) -> None: ...
