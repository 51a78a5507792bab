"""The agent's routing half: desired state from the store, the RIB, exports and the FIB.

Two loops share one event loop:

- `_reconcile_loop` wakes on any store change, reads the whole desired state (nodes, BGP
  configuration and peers, pools, blocks, affinities), and levels the speaker's sessions,
  the exported prefixes, the import policy and the blackhole routes to it.
- `_event_loop` feeds the speaker's events into the RIB and pushes the affected prefixes to
  the kernel in batches (it drains whatever is queued before touching the FIB).

On start the kernel may still hold routes from before a restart: they are kept, not
flushed, until every session has sent End-of-RIB (or `initial_sync_timeout` passes, by
default our graceful-restart time); then one reconcile of the FIB against the RIB removes
what was not learned again. How long a lost peer's routes stay: `graceful.retention`.

Routes to pools with an encapsulation go through the overlay (`encap`, `overlay`): the
controller levels the tunnel devices and NAT rules with every desired state (and every
RESYNC seconds) and maps each selected route through `encap.encapsulate`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from ipaddress import ip_interface, ip_network
from typing import Any, Protocol

from bgp_speaker.bgp import graceful
from bgp_speaker.bgp.config import BGP_CONFIG_NAME, DEFAULT_HOLD, parse_bgp_config
from bgp_speaker.bgp.export import Exports, blackhole_routes, compute_exports
from bgp_speaker.bgp.peering import Peering, PeeringDesired, peer_policy, read_peering
from bgp_speaker.bgp.rib import ImportPolicy, Rib, kernel_route
from bgp_speaker.bgp.routes import (
    EndOfRib,
    IPAddr,
    IPNet,
    KernelRoute,
    PeerOpened,
    PeerStateChanged,
    RoutesAnnounced,
    RoutesWithdrawn,
    SessionSpec,
    SessionState,
    SpeakerEvent,
    SpeakerRestarted,
)
from bgp_speaker.bgp.sessions import node_address
from bgp_speaker.kernel.fib import FibError
from bgp_speaker.overlay.encap import (
    TUNNEL_DEVICES,
    Encap,
    EncapPolicy,
    VxlanSettings,
    encap_policy,
    encapsulate,
)
from bgp_speaker.routing.store_watch import StoreWatcher
from ipam_blocks.errors import L3FabricError, NotFound
from ipam_blocks.model import parse_affinity, parse_block, parse_node, parse_pool
from ipam_blocks.store.base import Store

log = logging.getLogger("l3fabric.agent.routing")

WATCHED_KINDS = ("Node", "BGPConfiguration", "BGPPeer", "IPPool", "IPAMBlock", "BlockAffinity")
DEBOUNCE = 0.05
FIB_BATCH = 5000
FIB_RETRY = 1.0
HANDOVER_TICK = 0.5
RESYNC = 30.0  # seconds between level reconciles without a store change
# A peer with a prefix limit: its initial table stays out of the kernel until its End-of-RIB,
# so a flood is cut off whole even when it arrives in several UPDATEs; a peer that sends no
# End-of-RIB has its routes installed this long after the session came up.
INITIAL_TABLE_WAIT = 5.0
HOLD_TICK = 0.1  # seconds between looks at the hold timers
OVERLAY_RETRY = 2.0


class Speaker(Protocol):
    """What the controller needs of a BGP speaker (ExaBGPSpeaker implements it)."""

    async def set_sessions(self, sessions: Sequence[SessionSpec]) -> bool: ...
    async def announce(self, prefixes: Iterable[IPNet]) -> None: ...
    async def withdraw(self, prefixes: Iterable[IPNet]) -> None: ...
    async def send_eor(self, peer: IPAddr | None = None, afi: int = 4) -> None: ...
    def events(self) -> Any: ...


class KernelFib(Protocol):
    def dump(self) -> dict[IPNet, KernelRoute]: ...
    def apply(self, add_or_replace: Iterable[KernelRoute], remove: Iterable[IPNet]) -> None: ...
    def reconcile(self, desired: dict[IPNet, KernelRoute]) -> tuple[int, int]: ...


class OverlayDataplane(Protocol):
    """Tunnel devices and NAT rules (bgp_speaker.overlay.Overlay implements it)."""

    healthy: bool

    def reconcile(self, policy: EncapPolicy) -> frozenset[Encap]: ...
    def pod_mtu(self) -> int | None: ...
    def status(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class DesiredState:
    sessions: tuple[SessionSpec, ...]
    exports: Exports
    policy: ImportPolicy
    peering: PeeringDesired = field(default_factory=PeeringDesired)
    encap: EncapPolicy = field(default_factory=EncapPolicy)


@dataclass(frozen=True)
class PeerStatus:
    address: str
    type: str
    state: str
    since: float
    received: int
    accepted: int
    advertised: int
    reason: str = ""


class RoutingController:
    def __init__(
        self,
        node: str,
        store: Store,
        speaker: Speaker,
        fib: KernelFib,
        *,
        initial_sync_timeout: float | None = None,
        overlay: OverlayDataplane | None = None,
    ) -> None:
        self.node = node
        self.store = store
        self.speaker = speaker
        self.fib = fib
        self.rib = Rib()
        self.desired: DesiredState | None = None
        self.announced: frozenset[IPNet] = frozenset()
        self.installed: dict[IPNet, KernelRoute] = {}
        self.peer_state: dict[IPAddr, tuple[SessionState, float, str]] = {}
        self.eor_seen: set[IPAddr] = set()
        self.speaker_restarts = 0
        self._stale_episode: dict[IPAddr, int] = {}
        self._sessions_up: dict[IPAddr, int] = {}  # per peer: sessions seen up, for timers
        self._fib_lock = asyncio.Lock()  # a Fib is used from one thread at a time
        self.peering = Peering(self.rib, speaker)  # sessions to configure, reflection
        self._handover_ticking = False
        self._initial_sync_timeout = initial_sync_timeout
        self.overlay = overlay
        self._encap: tuple[EncapPolicy, frozenset[Encap]] = (EncapPolicy(), frozenset())
        self._peer_restart: dict[IPAddr, int | None] = {}  # from each peer's last OPEN
        self._overlay_generation = 0
        self.hold_timers = graceful.HoldTimers()
        self._synced = asyncio.Event()
        self._changed = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()

    # --- desired state ------------------------------------------------------------------------

    def read_desired(self) -> DesiredState | None:
        """One consistent-enough read of everything routing depends on (blocking I/O)."""
        nodes = [parse_node(r) for r in self.store.list("Node").items]
        me = next((n for n in nodes if n.name == self.node), None)
        if me is None or node_address(me) is None:
            return None
        try:
            cfg = parse_bgp_config(self.store.get("BGPConfiguration", BGP_CONFIG_NAME))
        except NotFound:
            cfg = parse_bgp_config(None)
        sessions, peering = read_peering(
            self.store, me, nodes, cfg, self.store.list("BGPPeer").items
        )
        pools = [parse_pool(r) for r in self.store.list("IPPool").items]
        blocks = [parse_block(r) for r in self.store.list("IPAMBlock").items]
        affinities = [parse_affinity(r) for r in self.store.list("BlockAffinity").items]
        exports = compute_exports(self.node, blocks, affinities)
        router_id = node_address(me)
        assert router_id is not None
        policy = ImportPolicy(
            pools=tuple((ip_network(str(p.cidr)), p.block_size) for p in pools if not p.disabled),
            own_blocks=exports.blocks,
            router_id=router_id,
            local_as=me.as_number or cfg.as_number,
        )
        encap = encap_policy(
            None if me.ipv4_address is None else ip_interface(str(me.ipv4_address)),
            pools,
            VxlanSettings(cfg.vxlan_vni, cfg.vxlan_port),
        )
        return DesiredState(tuple(sessions), exports, peer_policy(policy, peering), peering, encap)

    async def reconcile_desired(self) -> None:
        desired = await asyncio.to_thread(self.read_desired)
        if desired is None:
            log.warning("node has no IPv4 address yet", extra={"op": "routing", "node": self.node})
            return
        self.peering.set_desired(desired.peering)
        configured = self._plan_sessions(desired)
        affected = self.rib.set_sessions(configured)
        affected |= self.rib.set_policy(desired.policy)
        wanted = desired.exports.prefixes
        # Exports before sessions: the speaker replays exports to sessions it adds, while a
        # session change can wait on ExaBGP for a long while (it defers reloads while an
        # unreachable neighbour has routes queued) and must not hold up a new block.
        for communities, prefixes in self.peering.export_changes(wanted).items():
            await self.speaker.announce(sorted(prefixes, key=_sort_key), communities=communities)
        if self.announced - wanted:
            await self.speaker.withdraw(sorted(self.announced - wanted, key=_sort_key))
        previous_blocks = self.desired.exports.blocks if self.desired else frozenset()
        self.announced = wanted
        self.desired = desired
        affected |= previous_blocks | desired.exports.blocks
        affected |= await self._reconcile_overlay(desired.encap)
        await self._program(affected)
        await self.speaker.set_sessions(configured)
        await self.peering.reflect(affected)  # everything, if the neighbours changed

    def _plan_sessions(self, desired: DesiredState) -> tuple[SessionSpec, ...]:
        """Desired sessions minus those cut off for too many prefixes, plus those retiring
        until their replacements carry their routes (see `handover`)."""
        established = {p for p, (state, _, _) in self.peer_state.items()
                       if state is SessionState.UP}  # fmt: skip
        configured = self.peering.plan_sessions(desired.sessions, established, self.eor_seen)
        if self.peering.handover.busy and not self._handover_ticking:
            self._handover_ticking = True
            self._spawn(self._handover_tick())
        return configured

    async def _handover_tick(self) -> None:
        """While sessions retire, look again every HANDOVER_TICK (no store read needed)."""
        try:
            while self.peering.handover.busy and self.desired is not None:
                await asyncio.sleep(HANDOVER_TICK)
                before = self.peering.configured
                configured = self._plan_sessions(self.desired)
                if configured != before:
                    affected = self.rib.set_sessions(configured)
                    await self._program(affected)
                    await self.speaker.set_sessions(configured)
                    await self.peering.reflect(affected)
        finally:
            self._handover_ticking = False

    # --- kernel -------------------------------------------------------------------------------

    def _wanted_route(self, prefix: IPNet) -> KernelRoute | None:
        if self.desired and prefix in self.desired.exports.blocks:
            return blackhole_routes(Exports(frozenset({prefix})))[prefix]
        selection = self.rib.select(prefix)
        if selection is None:
            return None
        policy, available = self._encap
        return encapsulate(kernel_route(prefix, selection), policy, available)

    async def _reconcile_overlay(self, policy: EncapPolicy) -> set[IPNet]:
        """Level tunnel devices and NAT rules; every prefix when what routes may use changed
        (a mode switched, a device came or went), so each is re-encapsulated."""
        if self.overlay is None:
            available = frozenset(Encap)  # nothing to set up: tests, or a plain fabric
        else:
            available = await asyncio.to_thread(self.overlay.reconcile, policy)
            if not self.overlay.healthy:
                self._spawn(self._look_again(OVERLAY_RETRY))
            generation = getattr(self.overlay, "generation", 0)
            if generation != self._overlay_generation:
                # A tunnel device was replaced and the kernel dropped the routes through it:
                # forget them (after any FIB change in flight), so they are installed again.
                async with self._fib_lock:
                    self._overlay_generation = generation
                    for prefix, route in list(self.installed.items()):
                        if any(hop.device in TUNNEL_DEVICES for hop in route.nexthops):
                            del self.installed[prefix]
                self._encap = (policy, available)
                return set(self.rib.prefixes())
        if (policy, available) == self._encap:
            return set()
        self._encap = (policy, available)
        return set(self.rib.prefixes())

    async def _look_again(self, delay: float) -> None:
        await asyncio.sleep(delay)
        self._changed.set()

    def pod_mtu(self) -> int | None:
        """The MTU pods get when their CNI config names none (None: not known yet)."""
        return self.overlay.pod_mtu() if self.overlay is not None else None

    async def _program(self, prefixes: set[IPNet]) -> None:
        """Bring the kernel in line with the RIB for these prefixes."""
        async with self._fib_lock:
            await self._program_locked(prefixes)

    async def _program_locked(self, prefixes: set[IPNet]) -> None:
        upserts: list[KernelRoute] = []
        removes: list[IPNet] = []
        for prefix in prefixes:
            route = self._wanted_route(prefix)
            if route is None:
                if prefix in self.installed:
                    removes.append(prefix)
            elif self.installed.get(prefix) != route:
                upserts.append(route)
        if not upserts and not removes:
            return
        failed: set[IPNet] = set()
        try:
            await asyncio.to_thread(self.fib.apply, upserts, removes)
        except FibError as err:
            # Everything not listed was applied; a FIB unusable as a whole lists nothing.
            failed = set(err.failures) or {r.prefix for r in upserts} | set(removes)
            log.error("kernel update failed", extra={"op": "fib", "reason": str(err)})
        for route in upserts:
            if route.prefix not in failed:
                self.installed[route.prefix] = route
        for prefix in removes:
            if prefix not in failed:
                self.installed.pop(prefix, None)
        if failed:
            self._spawn(self._retry_later(failed))

    async def _retry_later(self, prefixes: set[IPNet]) -> None:
        """Failures are mostly transient (a gateway not resolvable yet): try again."""
        await asyncio.sleep(FIB_RETRY)
        await self._program(prefixes)

    async def _full_sync(self) -> None:
        async with self._fib_lock:
            desired = {p: r for p in self.rib.prefixes() if (r := self._wanted_route(p))}
            if self.desired:
                desired.update(blackhole_routes(self.desired.exports))
            changed, removed = await asyncio.to_thread(self.fib.reconcile, desired)
            self.installed = desired
        self._synced.set()
        log.info("kernel reconciled", extra={"op": "fib", "changed": changed, "removed": removed})

    async def _initial_sync(self) -> None:
        """Sweep routes left from before a start once every session has sent End-of-RIB, or
        when our graceful-restart time (the peers keep our routes that long) has passed."""
        started = time.monotonic()
        while self.desired is None and time.monotonic() - started < graceful.NO_RESTART_SYNC_WAIT:
            await asyncio.sleep(0.1)
        wait = self._initial_sync_timeout
        if wait is None:
            wait = graceful.initial_sync_wait(self.desired.sessions if self.desired else ())
        deadline = started + wait
        while time.monotonic() < deadline:
            wanted = {s.peer_ip for s in self.desired.sessions} if self.desired else set()
            if self.desired is not None and wanted <= self.eor_seen:
                break
            await asyncio.sleep(0.1)
        await self._full_sync()

    # --- speaker events -----------------------------------------------------------------------

    def _handle(self, event: SpeakerEvent) -> set[IPNet]:
        self._track_hold(event)
        if self.peering.ignores(event):  # OPENs; anything from a peer being cut off
            return set()
        match event:
            case RoutesAnnounced(peer, prefixes, attributes):
                affected = self.rib.announce(peer, prefixes, attributes)
                if (cut := self.peering.over_limit(event)) is not None:
                    # Before this batch reaches the kernel: nothing of it is installed.
                    affected |= self.rib.drop_peer(peer)
                    self.peer_state[peer] = (
                        SessionState.DOWN, time.time(), self.peering.limits.reason(peer)
                    )  # fmt: skip
                    self.eor_seen.discard(cut.peer_ip)
                    self._changed.set()  # reconcile: the speaker drops the session
                return affected
            case RoutesWithdrawn(peer, prefixes):
                return self.rib.withdraw(peer, prefixes)
            case EndOfRib(peer):
                self.eor_seen.add(peer)
                return self.rib.sweep_stale(peer) | self.rib.release(peer)
            case PeerStateChanged(peer, state, reason):
                self.peer_state[peer] = (state, time.time(), reason)
                if state is SessionState.DOWN:
                    self.eor_seen.discard(peer)
                    if self.rib.is_held(peer):  # never installed: nothing to keep forwarding
                        return self.rib.drop_peer(peer)
                    return self._session_lost(peer, reason)
                if state is SessionState.UP:
                    self._hold_initial_table(peer)
                    self._spawn(self._after_session_up(peer))
            case SpeakerRestarted(reason):
                self.speaker_restarts += 1
                log.warning("speaker restarted", extra={"op": "bgp", "reason": reason})
                affected: set[IPNet] = set()
                for peer in list(self.peer_state):
                    self.peer_state[peer] = (SessionState.DOWN, time.time(), "speaker restart")
                    affected |= self._session_lost(peer, "speaker restart")
                self.eor_seen.clear()
                return affected
        return set()

    # --- hold timers and graceful restart (see graceful) ------------------------------------

    def _track_hold(self, event: SpeakerEvent) -> None:
        match event:
            case PeerOpened(peer, _, restart, hold):
                self._peer_restart[peer] = restart
                self.hold_timers.opened(peer, hold)
            case PeerStateChanged(peer, SessionState.UP, _):
                spec = self._session_spec(peer)
                hold = spec.hold_time if spec is not None else DEFAULT_HOLD
                self.hold_timers.up(peer, hold, time.monotonic())
            case PeerStateChanged(peer, SessionState.DOWN, _):
                self.hold_timers.down(peer)
            case SpeakerRestarted():
                for peer in list(self.peer_state):
                    self.hold_timers.down(peer)

    def _heard(self, event: SpeakerEvent) -> None:
        peer = getattr(event, "peer", None)
        if peer is None or isinstance(event, PeerStateChanged):
            return
        if self.hold_timers.heard(peer, time.monotonic()):
            # We called it dead, ExaBGP kept the session: its routes are gone here, ask for
            # them again.
            log.warning("peer alive after all, refreshing its routes",
                        extra={"op": "bgp", "peer": str(peer)})  # fmt: skip
            self.peer_state[peer] = (SessionState.UP, time.time(), "")
            refresh = getattr(self.speaker, "route_refresh", None)
            if refresh is not None:
                self._spawn(self._quietly(refresh(peer), "route refresh", peer))

    async def _quietly(self, coro: Any, what: str, peer: IPAddr) -> None:
        try:
            await coro
        except Exception as err:  # the session may be gone meanwhile: log, go on
            log.warning(f"{what} failed", extra={"op": "bgp", "peer": str(peer),
                                                 "reason": str(err)})  # fmt: skip

    async def _hold_watch(self) -> None:
        """Our own hold timer (ExaBGP's counts whole seconds, up to a second late)."""
        while True:
            await asyncio.sleep(HOLD_TICK)
            for peer in self.hold_timers.expired(time.monotonic()):
                log.warning("hold timer expired", extra={"op": "bgp", "peer": str(peer)})
                self.peer_state[peer] = (SessionState.DOWN, time.time(), graceful.HOLD_EXPIRED)
                self.eor_seen.discard(peer)
                affected = self._session_lost(peer, graceful.HOLD_EXPIRED)
                if affected:
                    await self._program(affected)

    def _session_spec(self, peer: IPAddr) -> SessionSpec | None:
        sessions = self.desired.sessions if self.desired else ()
        return next((s for s in sessions if s.peer_ip == peer), None)

    def _session_lost(self, peer: IPAddr, reason: str) -> set[IPNet]:
        """A session is gone. With graceful restart (DESIGN §5) the peer's routes stay, stale,
        until it is back and sends End-of-RIB, or its restart time runs out; a peer that
        closed the session with a NOTIFICATION (a Cease: it is leaving) is dropped at once."""
        spec = next(
            (s for s in self.desired.sessions if s.peer_ip == peer), None
        ) if self.desired else None  # fmt: skip
        advertised = self._peer_restart.get(peer, graceful.UNKNOWN)
        restart = graceful.retention(spec, advertised, reason)
        if not restart:
            self._stale_episode.pop(peer, None)
            return self.rib.drop_peer(peer)
        self.rib.mark_stale(peer)
        episode = self._stale_episode[peer] = self._stale_episode.get(peer, 0) + 1
        self._spawn(self._stale_timer(peer, episode, restart))
        return set()

    async def _stale_timer(self, peer: IPAddr, episode: int, restart: float) -> None:
        await asyncio.sleep(restart)
        if self._stale_episode.get(peer) == episode:
            affected = self.rib.sweep_stale(peer)
            if affected:
                log.warning("stale routes swept", extra={"op": "bgp", "peer": str(peer),
                                                         "count": len(affected)})  # fmt: skip
                await self._program(affected)

    def _hold_initial_table(self, peer: IPAddr) -> None:
        session = self._sessions_up[peer] = self._sessions_up.get(peer, 0) + 1
        spec = self._session_spec(peer)
        # Not while graceful restart keeps its stale routes: those forward meanwhile.
        if spec is None or spec.max_prefixes is None or self.rib.stale(peer):
            return
        self.rib.hold(peer)
        self._spawn(self._release_initial_table(peer, session))

    async def _release_initial_table(self, peer: IPAddr, session: int) -> None:
        await asyncio.sleep(INITIAL_TABLE_WAIT)
        if self._sessions_up.get(peer) == session and self.rib.is_held(peer):
            log.warning("no end-of-rib: installing the initial table",
                        extra={"op": "bgp", "peer": str(peer)})  # fmt: skip
            affected = self.rib.release(peer)
            await self._program(affected)
            await self.peering.reflect(affected)

    async def _after_session_up(self, peer: IPAddr) -> None:
        # manual-eor: ExaBGP sends End-of-RIB only when told, after our exports are queued.
        try:
            await self.speaker.send_eor(peer)
        except Exception as err:  # the session may already be gone again: log, go on
            log.warning(
                "end-of-rib not sent", extra={"op": "bgp", "peer": str(peer), "reason": str(err)}
            )

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _event_loop(self) -> None:
        events = self.speaker.events()
        queue: asyncio.Queue[SpeakerEvent] = asyncio.Queue()

        async def pump() -> None:
            async for event in events:
                self._heard(event)  # as it arrives: a busy FIB must not fake silence
                await queue.put(event)

        self._spawn(pump())
        while True:
            affected = self._handle(await queue.get())
            while not queue.empty() and len(affected) < FIB_BATCH:
                affected |= self._handle(queue.get_nowait())
            if affected:
                await self._program(affected)
                await self.peering.reflect(affected)

    async def _reconcile_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):  # level-based: look again now and then
                await asyncio.wait_for(self._changed.wait(), RESYNC)
            await asyncio.sleep(DEBOUNCE)
            self._changed.clear()
            try:
                await self.reconcile_desired()
            except L3FabricError as err:
                log.error("reconcile failed", extra={"op": "routing", "reason": str(err)})
                await asyncio.sleep(1)
                self._changed.set()

    async def run(self, stop: asyncio.Event) -> None:
        self.installed = await asyncio.to_thread(self.fib.dump)
        watcher = StoreWatcher(self.store, WATCHED_KINDS, self._changed)
        watcher.start()
        for coro in (
            self._event_loop(),
            self._reconcile_loop(),
            self._initial_sync(),
            self._hold_watch(),
        ):
            self._spawn(coro)
        try:
            await stop.wait()
        finally:
            watcher.stop()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # --- status -------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """For `node status` and metrics; runs on the event loop (see RoutingHolder.status)."""
        sessions = self.desired.sessions if self.desired else ()
        sessions = (*sessions, *self.peering.retiring())  # kept until replaced (handover)
        advertised = len(self.announced)
        peers = []
        for s in sessions:
            state, since, reason = self.peer_state.get(s.peer_ip, (SessionState.DOWN, 0.0, ""))
            reason = self.peering.note(s.peer_ip) or reason
            peers.append(
                PeerStatus(
                    str(s.peer_ip), s.peer_type.value,
                    "established" if state is SessionState.UP else state.value,
                    since, self.rib.received(s.peer_ip), self.rib.accepted(s.peer_ip),
                    advertised + self.peering.advertised(s.peer_ip), reason,
                ).__dict__
            )  # fmt: skip
        return {
            "node": self.node,
            "router_id": str(self.desired.policy.router_id) if self.desired else None,
            "peers": peers,
            "exported": sorted(str(p) for p in self.announced),
            "routes_installed": len(self.installed),
            "dropped_by_policy": self.rib.dropped_total(),
            "speaker_restarts": self.speaker_restarts,
            "synced": self._synced.is_set(),
            "overlay": self.overlay.status() if self.overlay is not None else None,
        }


def _sort_key(prefix: IPNet) -> tuple[int, int, int]:
    return (prefix.version, int(prefix.network_address), prefix.prefixlen)
