"""A cache of one kind kept current by list+watch, on any store backend (the informer pattern).

One paginated list (after a jittered delay, so a thousand agents starting together do not list
together), then watches from the list's revision, each resumed from the last event or bookmark
when it ends: a server restart or a quiet period costs a new watch request, not a list. Only a
watch the store can no longer serve (`WatchExpired`, the API server's 410) leads to a list
again, exactly one, whose result is diffed against the cache: consumers get the ADDED,
MODIFIED and DELETED of what changed meanwhile, none lost and none twice. Other store errors
are retried with capped exponential backoff and jitter, from where the informer was.

The store is blocking, so the informer runs in a thread of its own and calls its handler from
there: `(event_type, old, new)`, old None for ADDED, new None for DELETED.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from ipam_blocks.errors import StoreError, WatchExpired
from ipam_blocks.retry import RetryBudget, backoff_delay
from ipam_blocks.selector import EVERYTHING, LabelSelector
from ipam_blocks.store.base import EventType, Resource, Store, WatchEvent

log = logging.getLogger("l3fabric.informer")

Handler = Callable[[EventType, Resource | None, Resource | None], None]

PAGE_SIZE = 500
# 1000 agents starting within 10 s: about 100 first lists a second per kind.
START_JITTER_SECONDS = 10.0
# How long a quiet watch lasts before it is resumed (with a bookmark: no list).
WATCH_TIMEOUT_SECONDS = 300.0
ERROR_BACKOFF = RetryBudget(attempts=0, base_delay=0.5, max_delay=30.0)  # attempts: unbounded


@dataclass(frozen=True)
class Change:
    type: EventType
    old: Resource | None
    new: Resource | None


def diff_listing(cache: Mapping[str, Resource], listed: Iterable[Resource]) -> list[Change]:
    """What happened between the cache and a fresh listing of the same kind: DELETED for what
    is gone, then ADDED and MODIFIED (another revision) by name. Same revision: no change."""
    fresh = {obj.name: obj for obj in listed}
    changes = [Change(EventType.DELETED, cache[n], None) for n in sorted(cache.keys() - fresh)]
    for name in sorted(fresh):
        old, new = cache.get(name), fresh[name]
        if old is None:
            changes.append(Change(EventType.ADDED, None, new))
        elif old.revision != new.revision:
            changes.append(Change(EventType.MODIFIED, old, new))
    return changes


def apply_event(cache: Mapping[str, Resource], event: WatchEvent) -> Change | None:
    """The change a watch event makes to the cache, or None when it changes nothing (an
    object already at that revision, the deletion of one never seen, a bookmark)."""
    obj = event.resource
    old = cache.get(obj.name)
    match event.type:
        case EventType.ADDED | EventType.MODIFIED:
            if old is not None and old.revision == obj.revision:
                return None
            return Change(EventType.ADDED if old is None else EventType.MODIFIED, old, obj)
        case EventType.DELETED if old is not None:
            return Change(EventType.DELETED, old, None)
    return None


class Informer:
    """The cache of one kind (objects `selector` selects), kept by a thread of its own.

    `synced` is set once the first list is in the cache. Counters: `relists` (lists after the
    first), `watch_restarts` (watches resumed after one ended, for any reason), `events`
    (changes handed to the handler). `start_jitter`: the first list waits a random 0..that many
    seconds."""

    def __init__(
        self,
        store: Store,
        kind: str,
        handler: Handler | None = None,
        *,
        selector: LabelSelector = EVERYTHING,
        page_size: int = PAGE_SIZE,
        start_jitter: float = START_JITTER_SECONDS,
        watch_timeout: float = WATCH_TIMEOUT_SECONDS,
        backoff: RetryBudget = ERROR_BACKOFF,
    ) -> None:
        self.kind = kind
        self.selector = selector
        self.synced = threading.Event()
        self.relists = 0
        self.watch_restarts = 0
        self.events = 0
        self._store = store
        self._handler = handler
        self._page_size = page_size
        self._start_jitter = start_jitter
        self._watch_timeout = watch_timeout
        self._backoff = backoff
        self._cache: dict[str, Resource] = {}
        self._revision: str | None = None
        self._lock = threading.Lock()  # the cache and revision
        self._dispatch = threading.RLock()  # held while the handler runs; stop() waits for it
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the cache -----------------------------------------------------------------------------

    def get(self, name: str) -> Resource | None:
        with self._lock:
            return self._cache.get(name)

    def items(self) -> list[Resource]:
        """The cached objects, by name."""
        with self._lock:
            return [self._cache[n] for n in sorted(self._cache)]

    @property
    def size(self) -> int:
        with self._lock:
            return len(self._cache)

    @property
    def revision(self) -> str | None:
        """The store revision the cache is current at (None before the first list)."""
        with self._lock:
            return self._revision

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> Informer:
        self._thread = threading.Thread(target=self._run, name=f"informer-{self.kind}", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 1.0) -> None:
        """No handler call starts after this returns. A thread blocked in the store (a watch
        waiting for its next event) is not waited for longer than `timeout`: it notices the
        stop when the store answers, and ends without touching the cache."""
        self._stopping.set()
        with self._dispatch:
            pass  # a handler call in progress has finished
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    # -- the thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        if self._stopping.wait(random.uniform(0, self._start_jitter)):
            return
        failures = 0
        while not self._stopping.is_set():
            try:
                if self.revision is None:
                    self._list()
                if self._stopping.is_set():  # stopped mid-list: no revision to watch from
                    return
                self._watch()
                failures = 0
            except WatchExpired as e:
                # The history to resume from is gone: list again, at once (not an outage).
                log.info(
                    "watch expired, listing again", extra={"kind": self.kind, "reason": str(e)}
                )
                with self._lock:
                    self._revision = None
            except StoreError as e:
                delay = backoff_delay(self._backoff, failures)
                failures += 1
                log.warning(
                    "store error, backing off",
                    extra={"kind": self.kind, "reason": str(e), "delay": round(delay, 3)},
                )
                self._stopping.wait(delay)
            if not self._stopping.is_set() and self.revision is not None:
                self.watch_restarts += 1

    def _list(self) -> None:
        """All pages at one revision; a page the store can no longer continue (WatchExpired)
        propagates, and the next attempt starts over."""
        listing = self._store.list(self.kind, self.selector, limit=self._page_size)
        items = list(listing.items)
        while listing.continue_token is not None and not self._stopping.is_set():
            listing = self._store.list(
                self.kind, self.selector, limit=self._page_size,
                continue_token=listing.continue_token,
            )  # fmt: skip
            items += listing.items
        if self._stopping.is_set():
            return
        with self._lock:
            changes = diff_listing(self._cache, items)
            self._cache = {obj.name: obj for obj in items}
            self._revision = listing.revision
        if self.synced.is_set():
            self.relists += 1
        self._hand_over(changes)
        self.synced.set()

    def _watch(self) -> None:
        since = self.revision
        assert since is not None
        for event in self._store.watch(
            self.kind, since, self._watch_timeout, selector=self.selector, bookmarks=True
        ):
            if self._stopping.is_set():
                return
            with self._lock:
                change = apply_event(self._cache, event)
                if change is not None and change.new is not None:
                    self._cache[change.new.name] = change.new
                elif change is not None and change.old is not None:
                    del self._cache[change.old.name]
                self._revision = event.resource.revision or self._revision
            if change is not None:
                self._hand_over([change])

    def _hand_over(self, changes: list[Change]) -> None:
        for change in changes:
            with self._dispatch:
                if self._stopping.is_set():
                    return
                self.events += 1
                if self._handler is not None:
                    try:
                        self._handler(change.type, change.old, change.new)
                    except Exception:
                        # One consumer's bug must not stop the cache: log it and go on.
                        log.exception("informer handler failed", extra={"kind": self.kind})
