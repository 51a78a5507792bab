"""Wakes the embedded store's watchers when the database has a new commit, from any process.

Each watch used to poll the change log every 50 ms: an idle agent with six watched kinds ran
120 queries a second (2 % of a core). Now one poller thread per store, running only while
somebody watches, looks every 100 ms whether the write-ahead log changed (one `stat`: every
commit writes to it) and wakes the watchers, which read the change log only then. Once a
second it also asks SQLite itself (`PRAGMA data_version`, costlier: a read transaction), in
case two commits left the log looking the same (same size, within one timestamp tick after a
checkpoint restarted it). Writes made through the same store wake the watchers at once.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator

POLL_SECONDS = 0.1
ASK_SQLITE_EVERY = 10  # polls


def _wal_stamp(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None  # no connection open: the next writer creates it
    return st.st_ino, st.st_size, st.st_mtime_ns


class CommitNotifier:
    """`generation` grows with every commit seen; `wait_after(g, t)` blocks until it passes g."""

    def __init__(
        self,
        db_path: str,
        connect: Callable[[], sqlite3.Connection],
        interval: float = POLL_SECONDS,
    ) -> None:
        self._wal = f"{db_path}-wal"
        self._connect = connect
        self._interval = interval
        self._cond = threading.Condition()
        self._generation = 0
        self._watchers = 0
        self._poller: threading.Thread | None = None

    @property
    def generation(self) -> int:
        with self._cond:
            return self._generation

    def committed(self) -> None:
        """A write through this store committed: wake the watchers now."""
        with self._cond:
            self._generation += 1
            self._cond.notify_all()

    def wait_after(self, generation: int, timeout: float) -> None:
        """Until a commit after `generation` was seen, or `timeout` seconds."""
        with self._cond:
            self._cond.wait_for(lambda: self._generation != generation, timeout)

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        """Keeps the poller running while the block runs."""
        with self._cond:
            self._watchers += 1
            if self._poller is None:
                self._poller = threading.Thread(
                    target=self._poll, name="sqlite-commit-poller", daemon=True
                )
                self._poller.start()
        try:
            yield
        finally:
            with self._cond:
                self._watchers -= 1
                self._cond.notify_all()

    def _poll(self) -> None:
        db = self._connect()
        try:
            stamp, version = _wal_stamp(self._wal), _data_version(db)
            for polls in itertools.count(1):
                with self._cond:
                    # Sleep one interval, or end the moment the last watcher leaves.
                    self._cond.wait_for(lambda: self._watchers == 0, self._interval)
                    if self._watchers == 0:
                        self._poller = None
                        return
                seen = (stamp, version)
                stamp = _wal_stamp(self._wal)
                if polls % ASK_SQLITE_EVERY == 0:
                    version = _data_version(db)
                if (stamp, version) != seen or version is None:
                    self.committed()
        finally:
            db.close()


def _data_version(db: sqlite3.Connection) -> int | None:
    """Changes whenever another connection commits; None (counted as a change) when SQLite
    cannot say: the watchers then find out what is wrong."""
    try:
        version: int = db.execute("PRAGMA data_version").fetchone()[0]
    except sqlite3.Error:
        return None
    return version
