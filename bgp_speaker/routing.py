"""The agent's routing half: desired state from the store, the RIB, exports and the FIB.

Two loops share one event loop:

- `_reconcile_loop` wakes on any store change, reads the whole desired state (nodes, BGP
  configuration and peers, pools, blocks, affinities), and levels the speaker's sessions,
  the exported prefixes, the import policy and the blackhole routes to it.
- `_event_loop` feeds the speaker's events into the RIB and pushes the affected prefixes to
  the kernel in batches (it drains whatever is queued before touching the FIB).

On start the kernel may still hold routes from before a restart: they are kept, not
flushed, until every session has sent End-of-RIB (or `initial_sync_timeout` passes); then
one reconcile of the FIB against the RIB removes what was not learned again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from ipaddress import ip_network
from typing import Any, Protocol

from bgp_speaker.config import BGP_CONFIG_NAME, parse_bgp_config, parse_bgp_peer
from bgp_speaker.export import Exports, blackhole_routes, compute_exports
from bgp_speaker.fib import FibError
from bgp_speaker.peers import desired_sessions, node_address
from bgp_speaker.rib import ImportPolicy, Rib, kernel_route
from bgp_speaker.routes import (
    EndOfRib,
    IPAddr,
    IPNet,
    KernelRoute,
    PeerStateChanged,
    RoutesAnnounced,
    RoutesWithdrawn,
    SessionSpec,
    SessionState,
    SpeakerEvent,
    SpeakerRestarted,
)
from bgp_speaker.store_watch import StoreWatcher
from ipam_blocks.errors import L3FabricError, NotFound
from ipam_blocks.model import parse_affinity, parse_block, parse_node, parse_pool
from ipam_blocks.store.base import Store

log = logging.getLogger("l3fabric.agent.routing")

WATCHED_KINDS = ("Node", "BGPConfiguration", "BGPPeer", "IPPool", "IPAMBlock", "BlockAffinity")
DEBOUNCE = 0.05
FIB_BATCH = 5000
FIB_RETRY = 1.0


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


@dataclass(frozen=True)
class DesiredState:
    sessions: tuple[SessionSpec, ...]
    exports: Exports
    policy: ImportPolicy


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
        initial_sync_timeout: float = 10.0,
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
        self._fib_lock = asyncio.Lock()  # a Fib is used from one thread at a time
        self._initial_sync_timeout = initial_sync_timeout
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
        peers = []
        for res in self.store.list("BGPPeer").items:
            try:
                peers.append(parse_bgp_peer(res))
            except L3FabricError as err:
                log.error("ignoring invalid BGPPeer", extra={"op": "peers", "reason": str(err)})
        sessions = desired_sessions(me, nodes, cfg, peers)
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
        return DesiredState(tuple(sessions), exports, policy)

    async def reconcile_desired(self) -> None:
        desired = await asyncio.to_thread(self.read_desired)
        if desired is None:
            log.warning("node has no IPv4 address yet", extra={"op": "routing", "node": self.node})
            return
        affected = self.rib.set_sessions(desired.sessions)
        affected |= self.rib.set_policy(desired.policy)
        wanted = desired.exports.prefixes
        # Exports before sessions: the speaker replays exports to sessions it adds, while a
        # session change can wait on ExaBGP for a long while (it defers reloads while an
        # unreachable neighbour has routes queued) and must not hold up a new block.
        if wanted - self.announced:
            await self.speaker.announce(sorted(wanted - self.announced, key=_sort_key))
        if self.announced - wanted:
            await self.speaker.withdraw(sorted(self.announced - wanted, key=_sort_key))
        previous_blocks = self.desired.exports.blocks if self.desired else frozenset()
        self.announced = wanted
        self.desired = desired
        affected |= previous_blocks | desired.exports.blocks
        await self._program(affected)
        await self.speaker.set_sessions(desired.sessions)

    # --- kernel -------------------------------------------------------------------------------

    def _wanted_route(self, prefix: IPNet) -> KernelRoute | None:
        if self.desired and prefix in self.desired.exports.blocks:
            return blackhole_routes(Exports(frozenset({prefix})))[prefix]
        selection = self.rib.select(prefix)
        return kernel_route(prefix, selection) if selection else None

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
        """Sweep routes left from before a start once every session has sent End-of-RIB."""
        deadline = time.monotonic() + self._initial_sync_timeout
        while time.monotonic() < deadline:
            wanted = {s.peer_ip for s in self.desired.sessions} if self.desired else set()
            if self.desired is not None and wanted <= self.eor_seen:
                break
            await asyncio.sleep(0.1)
        await self._full_sync()

    # --- speaker events -----------------------------------------------------------------------

    def _handle(self, event: SpeakerEvent) -> set[IPNet]:
        match event:
            case RoutesAnnounced(peer, prefixes, attributes):
                return self.rib.announce(peer, prefixes, attributes)
            case RoutesWithdrawn(peer, prefixes):
                return self.rib.withdraw(peer, prefixes)
            case EndOfRib(peer):
                self.eor_seen.add(peer)
                return self.rib.sweep_stale(peer)
            case PeerStateChanged(peer, state, reason):
                self.peer_state[peer] = (state, time.time(), reason)
                if state is SessionState.DOWN:
                    self.eor_seen.discard(peer)
                    return self._session_lost(peer, reason)
                if state is SessionState.UP:
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

    def _session_lost(self, peer: IPAddr, reason: str) -> set[IPNet]:
        """A session is gone. With graceful restart (DESIGN §5) the peer's routes stay, stale,
        until it is back and sends End-of-RIB, or its restart time runs out; a peer that
        closed the session with a NOTIFICATION (a Cease: it is leaving) is dropped at once."""
        spec = next(
            (s for s in self.desired.sessions if s.peer_ip == peer), None
        ) if self.desired else None  # fmt: skip
        restart = spec.graceful_restart_time if spec is not None else None
        if not restart or reason.startswith("notification received"):
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
                await queue.put(event)

        self._spawn(pump())
        while True:
            affected = self._handle(await queue.get())
            while not queue.empty() and len(affected) < FIB_BATCH:
                affected |= self._handle(queue.get_nowait())
            if affected:
                await self._program(affected)

    async def _reconcile_loop(self) -> None:
        while True:
            await self._changed.wait()
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
        for coro in (self._event_loop(), self._reconcile_loop(), self._initial_sync()):
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
        advertised = len(self.announced)
        peers = []
        for s in sessions:
            state, since, reason = self.peer_state.get(s.peer_ip, (SessionState.DOWN, 0.0, ""))
            peers.append(
                PeerStatus(
                    str(s.peer_ip), s.peer_type.value,
                    "established" if state is SessionState.UP else state.value,
                    since, self.rib.received(s.peer_ip), self.rib.accepted(s.peer_ip),
                    advertised, reason,
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
        }


def _sort_key(prefix: IPNet) -> tuple[int, int, int]:
    return (prefix.version, int(prefix.network_address), prefix.prefixlen)
