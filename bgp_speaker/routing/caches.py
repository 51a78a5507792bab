"""What routing reads, cached: one informer per kind, the objects parsed once per change.

Cluster-wide: Nodes, the BGPConfiguration, BGPPeers and IPPools. Scoped to this node by the
label IPAM writes (`model.NODE_LABEL`): its IPAMBlocks, its BlockAffinities and its
IPAMHandles. No agent lists or watches another node's blocks; the few it borrowed addresses
from (its handles name them) are read by name (`BorrowedBlocks`).

An event wakes the reconcile loop only when it changed what routing reads (`routing_view`):
a new resourceVersion alone, an annotation, a pod allocated in one of our blocks, a bookmark
wake nothing. The informers call `_on_event` from their own threads; the parsed caches are
guarded by one lock and copied out whole by `listings`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from netaddr import IPNetwork

from bgp_speaker.bgp.config import BGP_CONFIG_NAME, PasswordRef, parse_bgp_config
from bgp_speaker.bgp.passwords import resolve_password
from bgp_speaker.routing.desired import Listings
from ipam_blocks import block as blockmath
from ipam_blocks.errors import L3FabricError, NotFound
from ipam_blocks.model import (
    NODE_LABEL,
    Block,
    Handle,
    block_name,
    parse_affinity,
    parse_block,
    parse_handle,
    parse_node,
    parse_pool,
)
from ipam_blocks.selector import EVERYTHING, LabelSelector
from ipam_blocks.store.base import EventType, Resource, Store
from ipam_blocks.store.informer import Informer

__all__ = ["CLUSTER_KINDS", "NODE_KINDS", "BorrowedBlocks", "PasswordCache", "RoutingCaches"]

log = logging.getLogger("l3fabric.agent.routing")

CLUSTER_KINDS = ("Node", "BGPConfiguration", "BGPPeer", "IPPool")
NODE_KINDS = ("IPAMBlock", "BlockAffinity", "IPAMHandle")
"""Listed and watched with the selector `l3fabric.io/node=<this node>` only."""

_PARSERS: dict[str, Callable[[Resource], Any]] = {
    "Node": parse_node,
    "BGPConfiguration": lambda res: res,  # parse_bgp_config takes the resource as it is
    "BGPPeer": lambda res: res,  # read_peering parses (and logs) BGPPeers itself
    "IPPool": parse_pool,
    "IPAMBlock": parse_block,
    "BlockAffinity": parse_affinity,
    "IPAMHandle": parse_handle,
}


def routing_view(kind: str, parsed: Any, own_blocks: Collection[str] = ()) -> object:
    """What routing reads of a parsed object: two objects with the same view lead to the same
    desired state. A block's allocations are not in it (our own blocks are exported whole),
    nor a handle's addresses in our own blocks (`own_blocks`, by name)."""
    if kind == "Node":
        # Spelled out: netaddr compares networks by their range, so 10.0.0.1/24 would equal
        # 10.0.0.2/24 and a node's new address would go unnoticed.
        address = None if parsed.ipv4_address is None else str(parsed.ipv4_address)
        labels = tuple(sorted(parsed.labels.items()))
        return (labels, address, parsed.as_number, parsed.route_reflector_cluster_id)
    if kind in ("BGPConfiguration", "BGPPeer"):
        return (_frozen(parsed.spec), _frozen(parsed.labels))
    if kind == "IPAMBlock":
        return (str(parsed.cidr), parsed.affinity)
    if kind == "IPAMHandle":
        return tuple(
            sorted(
                (cidr, count)
                for cidr, count in parsed.blocks.items()
                if block_name(IPNetwork(cidr)) not in own_blocks
            )
        )
    return replace(parsed, revision=None)


def _frozen(value: Any) -> object:
    """A hashable copy of decoded JSON, for comparing."""
    if isinstance(value, Mapping):
        return tuple(sorted((k, _frozen(v)) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return tuple(_frozen(v) for v in value)
    return value


@dataclass
class KindStats:
    """Per kind, for metrics: how many changes arrived and how many woke the reconcile loop."""

    changes: int = 0
    wakes: int = 0


class PasswordCache:
    """Resolved BGPPeer passwords, per (peer, resourceVersion): a Secret is read when a peer
    with a password appears or changes, not on every reconcile. `forget` drops them all (the
    periodic resync: a rotated Secret is picked up within one)."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._resolved: dict[tuple[str, str | None], str] = {}
        self.reads = 0

    def resolve(self, peer: Resource, ref: PasswordRef) -> str:
        key = (peer.name, peer.revision)
        if key not in self._resolved:
            self.reads += 1
            # A failure is not kept: the next reconcile tries again.
            self._resolved[key] = resolve_password(ref, self._store, f"BGPPeer/{peer.name}")
        return self._resolved[key]

    def retain(self, peers: Iterable[Resource]) -> None:
        """Forget the passwords of peers that are gone or changed."""
        live = {(p.name, p.revision) for p in peers}
        self._resolved = {k: v for k, v in self._resolved.items() if k in live}

    def forget(self) -> None:
        self._resolved.clear()


class BorrowedBlocks:
    """Other nodes' blocks holding addresses allocated for this node, read by name.

    This node's IPAMHandles (labelled with it) say in which blocks each handle holds how many
    addresses; the blocks not among our own are read with one GET each when the handles
    change. IPAM counts a handle up before it writes the block (and down after), so a block
    read just after a handle event may not show the address yet: `complete` is False then,
    and the controller reads again after `retry_delay` (doubling, capped by the caller)."""

    def __init__(self, store: Store, node: str) -> None:
        self._store = store
        self._node = node
        self.blocks: dict[str, Block] = {}
        self.complete = True
        self.reads = 0

    def refresh(self, handles: Iterable[Handle], own: Iterable[str]) -> None:
        """Blocking: one GET per foreign block the handles name."""
        own_names = set(own)
        wanted: dict[str, dict[str, int]] = {}  # block name -> handle id -> addresses held
        for handle in handles:
            for cidr, count in handle.blocks.items():
                name = block_name(IPNetwork(cidr))
                if name not in own_names and count > 0:
                    wanted.setdefault(name, {})[handle.handle_id] = count
        blocks: dict[str, Block] = {}
        complete = True
        for name, held in sorted(wanted.items()):
            self.reads += 1
            try:
                blk = parse_block(self._store.get("IPAMBlock", name))
            except NotFound:
                complete = False
                continue
            blocks[name] = blk
            found: dict[str, int] = {}
            for _ip, attr, _seq in blockmath.allocated(blk):
                if attr.node == self._node:
                    found[attr.handle_id] = found.get(attr.handle_id, 0) + 1
            complete = complete and all(found.get(h, 0) >= n for h, n in held.items())
        self.blocks = blocks
        self.complete = complete


class RoutingCaches:
    """The informers routing reads and their parsed objects.

    `on_change` (set by `start`) is called from an informer thread whenever an event changed
    what routing reads; `listings` copies the caches out (blocking only when the borrowed
    blocks must be read again)."""

    def __init__(self, store: Store, node: str, *, start_jitter: float = 0.0) -> None:
        mine = LabelSelector(match_labels={NODE_LABEL: node})
        self.informers = {
            kind: Informer(
                store,
                kind,
                self._handler(kind),
                selector=mine if kind in NODE_KINDS else EVERYTHING,
                start_jitter=start_jitter,
            )
            for kind in (*CLUSTER_KINDS, *NODE_KINDS)
        }
        self.stats = {kind: KindStats() for kind in self.informers}
        self.passwords = PasswordCache(store)
        self.borrowed = BorrowedBlocks(store, node)
        self._parsed: dict[str, dict[str, Any]] = {kind: {} for kind in self.informers}
        self._lock = threading.Lock()
        self._handles_changed = True
        self._on_change: Callable[[], None] = lambda: None

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self, on_change: Callable[[], None]) -> None:
        self._on_change = on_change
        for informer in self.informers.values():
            informer.start()

    def stop(self, timeout: float = 0.0) -> None:
        """No event is handled after this returns. Threads blocked in a watch end when the
        store next answers; each is waited for up to `timeout`, after all were told to stop."""
        for informer in self.informers.values():
            informer.stop(0.0)
        if timeout:
            for informer in self.informers.values():
                informer.stop(timeout)

    def wait_synced(self, timeout: float | None = None) -> bool:
        """Blocking: True once every informer has its first list."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for informer in self.informers.values():
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not informer.synced.wait(left):
                return False
        return True

    # --- events (informer threads) ------------------------------------------------------------

    def _handler(self, kind: str) -> Callable[[EventType, Resource | None, Resource | None], None]:
        def handle(_type: EventType, old: Resource | None, new: Resource | None) -> None:
            self._on_event(kind, old, new)

        return handle

    def _on_event(self, kind: str, old: Resource | None, new: Resource | None) -> None:
        with self._lock:
            cache = self._parsed[kind]
            name = new.name if new is not None else old.name if old is not None else ""
            before = cache.get(name)
            after = None
            if new is not None:
                try:
                    after = _PARSERS[kind](new)
                except (L3FabricError, KeyError, TypeError, ValueError) as err:
                    # One bad object must not stop everyone's routing: it counts as absent.
                    log.error(
                        "ignoring invalid object",
                        extra={"op": "routing", "kind": kind, "name": name, "reason": str(err)},
                    )
            if after is None:
                cache.pop(name, None)
            else:
                cache[name] = after
            stats = self.stats[kind]
            stats.changes += 1
            own = self._parsed["IPAMBlock"].keys()
            views = [routing_view(kind, x, own) for x in (before, after) if x is not None]
            if len(views) == 2:
                relevant = views[0] != views[1]
            else:  # appeared or gone; a handle of addresses in our own blocks only: no matter
                relevant = len(views) == 1 and not (kind == "IPAMHandle" and views[0] == ())
            if not relevant:
                return
            stats.wakes += 1
            if kind == "IPAMHandle" or kind == "IPAMBlock":
                self._handles_changed = True
        self._on_change()

    def borrow_again(self) -> None:
        """The next `listings` reads the borrowed blocks again."""
        with self._lock:
            self._handles_changed = True

    # --- reading ------------------------------------------------------------------------------

    def listings(self, *, reread_borrowed: bool = False) -> Listings:
        """The cached objects routing reads, as of now. Blocking only when the borrowed
        blocks are read again (handles changed, or `reread_borrowed`)."""
        with self._lock:
            parsed = {kind: list(cache.values()) for kind, cache in self._parsed.items()}
            own = {b.name for b in parsed["IPAMBlock"]}
            refresh = self._handles_changed or reread_borrowed
            self._handles_changed = False
        if refresh:
            self.borrowed.refresh(parsed["IPAMHandle"], own)
        configs = [r for r in parsed["BGPConfiguration"] if r.name == BGP_CONFIG_NAME]
        peers = sorted(parsed["BGPPeer"], key=lambda r: r.name)
        self.passwords.retain(peers)
        return Listings(
            nodes=tuple(sorted(parsed["Node"], key=lambda n: n.name)),
            bgp_config=parse_bgp_config(configs[0] if configs else None),
            peers=tuple(peers),
            pools=tuple(sorted(parsed["IPPool"], key=lambda p: p.name)),
            blocks=(*parsed["IPAMBlock"], *self.borrowed.blocks.values()),
            affinities=tuple(parsed["BlockAffinity"]),
        )

    def describe(self) -> dict[str, dict[str, int]]:
        """Per kind: cache size, relists, watch restarts, changes and the wakes among them."""
        return {
            kind: {
                "size": informer.size,
                "relists": informer.relists,
                "watch_restarts": informer.watch_restarts,
                "events": self.stats[kind].changes,
                "wakes": self.stats[kind].wakes,
            }
            for kind, informer in self.informers.items()
        }
