"""In-process doubles for the routing controller's seams: a speaker, a route reflector and a
FIB that record what they are asked to do, and an overlay whose devices are whatever a test
says.

Each implements the Protocol it stands in for (`bgp_speaker.bgp.speaker.Speaker` and
`RouteReflector`, `bgp_speaker.kernel.fib.KernelFib`,
`bgp_speaker.overlay.dataplane.OverlayDataplane`): the controller's constructor is typed
against them."""

from __future__ import annotations

from collections.abc import AsyncIterator, Collection, Iterable, Mapping, Sequence
from typing import Any

from bgp_speaker.bgp.reflection import ReflectorDesired, ReflectorSessionState
from bgp_speaker.bgp.routes import (
    IPAddr,
    IPNet,
    KernelRoute,
    SessionSpec,
    SpeakerEvent,
)
from bgp_speaker.overlay.encap import Encap, EncapPolicy


class FakeFib:
    """The kernel table as a dict; ``ever`` keeps every prefix that was once installed."""

    def __init__(self) -> None:
        self.routes: dict[IPNet, KernelRoute] = {}
        self.ever: set[IPNet] = set()

    def dump(self) -> dict[IPNet, KernelRoute]:
        return dict(self.routes)

    def apply(self, add_or_replace: Iterable[KernelRoute], remove: Iterable[IPNet]) -> None:
        for route in add_or_replace:
            self.routes[route.prefix] = route
            self.ever.add(route.prefix)
        for prefix in remove:
            self.routes.pop(prefix, None)

    def reconcile(self, desired: Mapping[IPNet, KernelRoute]) -> tuple[int, int]:
        self.routes = dict(desired)
        return len(desired), 0


class FakeSpeaker:
    """Records every call as a tuple (kind, arguments as text); no peer ever hears of it."""

    def __init__(self) -> None:
        self.sessions: tuple[SessionSpec, ...] = ()
        self.calls: list[tuple[Any, ...]] = []

    async def set_sessions(
        self,
        sessions: Sequence[SessionSpec],
        *,
        handed_over: Collection[IPAddr] = (),
        listen: bool = True,
    ) -> bool:
        self.sessions = tuple(sessions)
        self.calls.append(("sessions", tuple(str(s.peer_ip) for s in sessions)))
        return True

    async def announce(self, prefixes: Iterable[IPNet], *, communities: Sequence[str] = ()) -> None:
        self.calls.append(("announce", tuple(map(str, prefixes)), communities))

    async def withdraw(self, prefixes: Iterable[IPNet]) -> None:
        self.calls.append(("withdraw", tuple(map(str, prefixes))))

    async def send_eor(self, peer: IPAddr | None = None, afi: int = 4) -> None:
        pass

    async def route_refresh(self, peer: IPAddr | None = None, afi: int = 4) -> None:
        self.calls.append(("route_refresh", str(peer)))

    async def events(self) -> AsyncIterator[SpeakerEvent]:
        reported: tuple[SpeakerEvent, ...] = ()  # the tests hand events to the parts directly
        for event in reported:
            yield event

    def take(self, kind: str) -> list[tuple[Any, ...]]:
        """The calls of one kind, in order; they are forgotten."""
        out = [c for c in self.calls if c[0] == kind]
        self.calls = [c for c in self.calls if c[0] != kind]
        return out


class FakeReflector:
    """Keeps what it was last given; reports the sessions a test sets."""

    def __init__(self) -> None:
        self.desired: ReflectorDesired | None = None
        self.reported: tuple[ReflectorSessionState, ...] = ()
        self.stopped = False

    def apply(self, desired: ReflectorDesired | None) -> None:
        self.desired = desired

    async def sessions(self) -> Sequence[ReflectorSessionState]:
        return self.reported

    @property
    def active(self) -> bool:
        return self.desired is not None

    def describe(self) -> dict[str, Any]:
        return {"running": self.active, "pid": 4242, "restarts": 0, "reloads": 0, "last_error": ""}

    async def stop(self) -> None:
        self.stopped = True


class FakeOverlay:
    """Tunnel devices that exist for the ``available`` encapsulations, never replaced."""

    def __init__(self, available: frozenset[Encap]) -> None:
        self.available = available
        self.healthy = True
        self.generation = 0
        self.seen: list[EncapPolicy] = []

    def reconcile(self, policy: EncapPolicy) -> frozenset[Encap]:
        self.seen.append(policy)
        return self.available & policy.wanted

    def pod_mtu(self) -> int | None:
        return 1480

    def status(self) -> dict[str, Any]:
        return {"available": sorted(self.available)}
