"""The embedded store: one SQLite file, WAL mode, safe across processes.

Revisions come from one global counter bumped by every write; each write also appends to a
change log that `watch` reads. Writers take an advisory file lock before their transaction:
waiting on `flock` wakes the moment the holder is done, whereas SQLite's own busy handler
sleeps in growing steps and collapses throughput under contention (8 allocators).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ipam_blocks.errors import (
    AlreadyExists,
    Conflict,
    InvalidInput,
    NotFound,
    StoreUnavailable,
    WatchExpired,
)
from ipam_blocks.selector import EVERYTHING, LabelSelector
from ipam_blocks.store.base import ALL_KINDS, EventType, Listing, Resource, WatchEvent
from ipam_blocks.store.workloads import WorkloadRecordLiveness

_SCHEMA = """
CREATE TABLE IF NOT EXISTS objects (
    kind TEXT NOT NULL, name TEXT NOT NULL, revision INTEGER NOT NULL, body TEXT NOT NULL,
    PRIMARY KEY (kind, name));
CREATE TABLE IF NOT EXISTS changes (
    revision INTEGER PRIMARY KEY, kind TEXT NOT NULL, name TEXT NOT NULL,
    type TEXT NOT NULL, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS counter (
    id INTEGER PRIMARY KEY CHECK (id = 0), revision INTEGER NOT NULL);
INSERT OR IGNORE INTO counter VALUES (0, 0);
CREATE TABLE IF NOT EXISTS compacted (
    id INTEGER PRIMARY KEY CHECK (id = 0), revision INTEGER NOT NULL);
INSERT OR IGNORE INTO compacted VALUES (0, 0);
"""
_WATCH_POLL_SECONDS = 0.05
CHANGES_KEPT = 100_000
COMPACT_EVERY = 1_000


def _make_private_dirs(directory: Path) -> None:
    """Create the missing directories, each 0700 (whatever the umask); existing ones are
    left as they are (a shared /var/lib is not ours to change)."""
    missing = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for each in reversed(missing):
        with contextlib.suppress(FileExistsError):  # another process made it meanwhile
            each.mkdir(mode=0o700)
            os.chmod(each, 0o700)


def _make_private_file(path: Path) -> None:
    """The store holds every allocation and pod name: owner-only (0600), and so are the
    -wal and -shm files, which SQLite creates with the database file's mode. Files left
    readable by an older version are tightened."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        _tighten(fd)
    finally:
        os.close(fd)
    for suffix in ("-wal", "-shm"):
        try:
            fd = os.open(f"{path}{suffix}", os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            _tighten(fd)
        finally:
            os.close(fd)


def _tighten(fd: int) -> None:
    st = os.fstat(fd)
    if st.st_mode & 0o077 and st.st_uid == os.geteuid():
        os.fchmod(fd, 0o600)


def _encode(obj: Resource) -> str:
    return json.dumps(
        {"spec": obj.spec, "labels": obj.labels, "annotations": obj.annotations},
        separators=(",", ":"),
        sort_keys=True,
    )


def _decode(kind: str, name: str, revision: int, body: str) -> Resource:
    data = json.loads(body)
    return Resource(kind, name, data["spec"], data["labels"], data["annotations"], str(revision))


class SqliteStore:
    # Embedded mode has no Pod API: the agent's Workload records, kept here, are the owners.
    holds_workloads = True

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            _make_private_dirs(self.path.parent)
            _make_private_file(self.path)
            self._lock_fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise StoreUnavailable(f"sqlite store {self.path}: {e.strerror}") from e
        self._local = threading.local()
        self._thread_lock = threading.Lock()
        with self._write() as db:
            for statement in filter(str.strip, _SCHEMA.split(";")):
                db.execute(statement)

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            try:
                db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")
            except sqlite3.Error as e:
                raise StoreUnavailable(f"sqlite store {self.path}: {e}") from e
            self._local.db = db
        return db

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        try:
            yield self._db()
        except sqlite3.Error as e:
            raise StoreUnavailable(f"sqlite store {self.path}: {e}") from e

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        db = self._db()
        # flock excludes other processes only: threads share this descriptor's lock.
        self._thread_lock.acquire()
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        except sqlite3.OperationalError as e:
            raise StoreUnavailable(f"sqlite store {self.path}: {e}") from e
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            self._thread_lock.release()

    @staticmethod
    def _bump(db: sqlite3.Connection) -> int:
        revision = db.execute(
            "UPDATE counter SET revision = revision + 1 RETURNING revision"
        ).fetchone()[0]
        if revision % COMPACT_EVERY == 0:
            # The change log holds every write's body: keep a window of it, as etcd does,
            # and make watchers that fell behind it list again (WatchExpired).
            horizon = revision - CHANGES_KEPT
            db.execute("DELETE FROM changes WHERE revision <= ?", (horizon,))
            db.execute("UPDATE compacted SET revision = MAX(revision, ?)", (horizon,))
        return revision

    @staticmethod
    def _check_kind(kind: str) -> None:
        if kind not in ALL_KINDS:
            raise InvalidInput("kind", f"unknown kind {kind!r}")

    def get(self, kind: str, name: str) -> Resource:
        self._check_kind(kind)
        with self._read() as db:
            row = db.execute(
                "SELECT revision, body FROM objects WHERE kind=? AND name=?", (kind, name)
            ).fetchone()
        if row is None:
            raise NotFound(kind, name)
        return _decode(kind, name, row[0], row[1])

    def list(self, kind: str, selector: LabelSelector = EVERYTHING) -> Listing:
        self._check_kind(kind)
        with self._read() as db:
            db.execute("BEGIN")
            try:
                rows = db.execute(
                    "SELECT name, revision, body FROM objects WHERE kind=? ORDER BY name", (kind,)
                ).fetchall()
                revision = db.execute("SELECT revision FROM counter").fetchone()[0]
            finally:
                db.execute("COMMIT")
        items = [_decode(kind, n, r, b) for n, r, b in rows]
        return Listing([o for o in items if selector.matches(o.labels)], str(revision))

    def create(self, obj: Resource) -> Resource:
        self._check_kind(obj.kind)
        body = _encode(obj)
        with self._write() as db:
            if db.execute(
                "SELECT 1 FROM objects WHERE kind=? AND name=?", (obj.kind, obj.name)
            ).fetchone():
                raise AlreadyExists(obj.kind, obj.name)
            revision = self._bump(db)
            db.execute("INSERT INTO objects VALUES (?,?,?,?)", (obj.kind, obj.name, revision, body))
            db.execute(
                "INSERT INTO changes VALUES (?,?,?,?,?)",
                (revision, obj.kind, obj.name, EventType.ADDED.value, body),
            )
        return _decode(obj.kind, obj.name, revision, body)

    def update(self, obj: Resource) -> Resource:
        self._check_kind(obj.kind)
        if obj.revision is None:
            raise InvalidInput("revision", "update needs the revision the object was read at")
        body = _encode(obj)
        with self._write() as db:
            row = db.execute(
                "SELECT revision FROM objects WHERE kind=? AND name=?", (obj.kind, obj.name)
            ).fetchone()
            if row is None:
                raise NotFound(obj.kind, obj.name)
            if str(row[0]) != obj.revision:
                raise Conflict(obj.kind, obj.name)
            revision = self._bump(db)
            db.execute(
                "UPDATE objects SET revision=?, body=? WHERE kind=? AND name=?",
                (revision, body, obj.kind, obj.name),
            )
            db.execute(
                "INSERT INTO changes VALUES (?,?,?,?,?)",
                (revision, obj.kind, obj.name, EventType.MODIFIED.value, body),
            )
        return _decode(obj.kind, obj.name, revision, body)

    def delete(self, kind: str, name: str, revision: str | None = None) -> None:
        self._check_kind(kind)
        with self._write() as db:
            row = db.execute(
                "SELECT revision, body FROM objects WHERE kind=? AND name=?", (kind, name)
            ).fetchone()
            if row is None:
                raise NotFound(kind, name)
            if revision is not None and str(row[0]) != revision:
                raise Conflict(kind, name)
            new_revision = self._bump(db)
            db.execute("DELETE FROM objects WHERE kind=? AND name=?", (kind, name))
            db.execute(
                "INSERT INTO changes VALUES (?,?,?,?,?)",
                (new_revision, kind, name, EventType.DELETED.value, row[1]),
            )

    def watch(self, kind: str, since: str, timeout: float) -> Iterator[WatchEvent]:
        self._check_kind(kind)
        last = int(since)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._read() as db:
                compacted = db.execute("SELECT revision FROM compacted").fetchone()[0]
                if last < compacted:
                    raise WatchExpired(
                        f"watch of {kind} from revision {last} expired: the change log "
                        f"keeps revisions after {compacted}; list again"
                    )
                rows = db.execute(
                    "SELECT revision, name, type, body FROM changes WHERE kind=? AND revision>? "
                    "ORDER BY revision",
                    (kind, last),
                ).fetchall()
            for revision, name, type_, body in rows:
                last = revision
                deadline = time.monotonic() + timeout
                yield WatchEvent(EventType(type_), _decode(kind, name, revision, body))
            if not rows:
                time.sleep(_WATCH_POLL_SECONDS)

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    # -- what a cluster would offer beyond the stored kinds --------------------------------------

    def owner_liveness(self) -> WorkloadRecordLiveness:
        return WorkloadRecordLiveness(self)

    def secrets(self) -> None:
        return None

    def lease(self, namespace: str, name: str) -> None:
        return None
