"""A lock per key (per CNI attachment), so calls for one container run one at a time while
different containers proceed in parallel, and GC can skip attachments that are in flight."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class KeyedLock:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._held: set[str] = set()

    @contextmanager
    def hold(self, key: str) -> Iterator[None]:
        """Wait until no one holds `key`, then hold it for the block."""
        with self._cond:
            while key in self._held:
                self._cond.wait()
            self._held.add(key)
        try:
            yield
        finally:
            self._release(key)

    @contextmanager
    def hold_if_free(self, key: str) -> Iterator[bool]:
        """Hold `key` for the block if no one does; yields whether it was free."""
        with self._cond:
            free = key not in self._held
            if free:
                self._held.add(key)
        try:
            yield free
        finally:
            if free:
                self._release(key)

    def held(self) -> int:
        with self._cond:
            return len(self._held)

    def _release(self, key: str) -> None:
        with self._cond:
            self._held.discard(key)
            self._cond.notify_all()
