"""Turns store changes into a wake-up call for the reconciler (events only say "look again").

One thread per watched kind runs the store's blocking watch from the revision of a fresh
list, and on any event (or error, after a pause) sets an asyncio event on the agent's loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterable

from ipam_blocks.errors import L3FabricError
from ipam_blocks.store.base import Store

log = logging.getLogger("l3fabric.agent.watch")

WATCH_TIMEOUT = 5.0
ERROR_PAUSE = 1.0


class StoreWatcher:
    def __init__(self, store: Store, kinds: Iterable[str], changed: asyncio.Event) -> None:
        self._store = store
        self._kinds = tuple(kinds)
        self._changed = changed
        self._loop = asyncio.get_running_loop()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for kind in self._kinds:
            thread = threading.Thread(
                target=self._watch, args=(kind,), name=f"watch-{kind}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()

    def _notify(self) -> None:
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._changed.set)

    def _watch(self, kind: str) -> None:
        while not self._stop.is_set():
            try:
                revision = self._store.list(kind).revision
                self._notify()  # whatever happened before this list counts as a change
                while not self._stop.is_set():
                    for event in self._store.watch(kind, revision, WATCH_TIMEOUT):
                        revision = event.resource.revision or revision
                        self._notify()
                        if self._stop.is_set():
                            return
            except L3FabricError as err:
                log.warning("watch failed", extra={"op": "watch", "kind": kind, "reason": str(err)})
                self._stop.wait(ERROR_PAUSE)
