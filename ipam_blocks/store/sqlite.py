"""The embedded store: one SQLite file, WAL mode, safe across processes.

Revisions come from one global counter bumped by every write; each write also appends to a
change log that `watch` reads. A change records the object's state before it too
(`prev_revision`, `prev_body`): a selector-scoped watch needs it to see an object leave the
selector, and a paginated list rebuilds the state at its first page's revision from it.
Watchers sleep until a commit (`sqlite_commits.CommitNotifier`) instead of polling the log.

Writers take an advisory file lock before their transaction: waiting on `flock` wakes the
moment the holder is done, whereas SQLite's own busy handler sleeps in growing steps and
collapses throughput under contention (8 allocators).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import heapq
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
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
from ipam_blocks.store.base import (
    ALL_KINDS,
    EventType,
    Listing,
    Resource,
    WatchEvent,
    check_limit,
)
from ipam_blocks.store.sqlite_commits import CommitNotifier
from ipam_blocks.store.workloads import WorkloadRecordLiveness

_SCHEMA = """
CREATE TABLE IF NOT EXISTS objects (
    kind TEXT NOT NULL, name TEXT NOT NULL, revision INTEGER NOT NULL, body TEXT NOT NULL,
    PRIMARY KEY (kind, name));
CREATE TABLE IF NOT EXISTS changes (
    revision INTEGER PRIMARY KEY, kind TEXT NOT NULL, name TEXT NOT NULL,
    type TEXT NOT NULL, body TEXT NOT NULL, prev_revision INTEGER, prev_body TEXT);
CREATE TABLE IF NOT EXISTS counter (
    id INTEGER PRIMARY KEY CHECK (id = 0), revision INTEGER NOT NULL);
INSERT OR IGNORE INTO counter VALUES (0, 0);
CREATE TABLE IF NOT EXISTS compacted (
    id INTEGER PRIMARY KEY CHECK (id = 0), revision INTEGER NOT NULL);
INSERT OR IGNORE INTO compacted VALUES (0, 0);
"""
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


def _labels(body: str) -> dict[str, str]:
    labels: dict[str, str] = json.loads(body)["labels"]
    return labels


def _continue_token(kind: str, revision: int, after: str) -> str:
    text = json.dumps({"kind": kind, "revision": revision, "after": after})
    return base64.urlsafe_b64encode(text.encode()).decode()


def _parse_continue_token(kind: str, token: str) -> tuple[int, str]:
    """-> (revision of the first page, last name returned so far)."""
    try:
        data = json.loads(base64.urlsafe_b64decode(token.encode()))
        revision, after = int(data["revision"]), str(data["after"])
        token_kind = data["kind"]
    except (binascii.Error, ValueError, TypeError, KeyError, UnicodeDecodeError):
        raise InvalidInput("continue_token", "not a continue token of this store") from None
    if token_kind != kind:
        raise InvalidInput("continue_token", f"a token of a {token_kind} list, not of {kind}")
    return revision, after


def _check_not_compacted(db: sqlite3.Connection, revision: int, what: str) -> None:
    compacted = db.execute("SELECT revision FROM compacted").fetchone()[0]
    if revision < compacted:
        raise WatchExpired(
            f"{what} from revision {revision} expired: the change log keeps revisions after "
            f"{compacted}; list again"
        )


def _rows_at(
    db: sqlite3.Connection, kind: str, revision: int, after: str
) -> Iterator[tuple[str, int, str]]:
    """(name, revision, body) of every `kind` object named after `after`, by name, as they
    were at store revision `revision` (which must not be compacted).

    An object untouched since then is as stored now; for one changed since, its first change
    after `revision` tells its state at `revision`: absent if that change added it, else the
    state the change recorded as previous.
    """
    first_change: dict[str, tuple[str, int | None, str | None, str]] = {}
    for name, type_, prev_revision, prev_body, body in db.execute(
        "SELECT name, type, prev_revision, prev_body, body FROM changes "
        "WHERE kind=? AND revision>? AND name>? ORDER BY revision",
        (kind, revision, after),
    ):
        first_change.setdefault(name, (type_, prev_revision, prev_body, body))
    then: list[tuple[str, int, str]] = []
    for name, (type_, prev_revision, prev_body, body) in first_change.items():
        if type_ == EventType.ADDED.value:
            continue
        # A deletion records the object's last state as its body.
        state = body if type_ == EventType.DELETED.value else prev_body
        # Only history from before the migration lacks them, and it counts as compacted.
        assert prev_revision is not None and state is not None
        then.append((name, prev_revision, state))
    untouched = (
        row
        for row in db.execute(
            "SELECT name, revision, body FROM objects WHERE kind=? AND name>? ORDER BY name",
            (kind, after),
        )
        if row[0] not in first_change
    )
    yield from heapq.merge(untouched, sorted(then))


def _page(
    rows: Iterable[tuple[str, int, str]], kind: str, selector: LabelSelector, limit: int | None
) -> tuple[list[Resource], bool]:
    """The first `limit` selected objects of `rows`, and whether more remain."""
    items: list[Resource] = []
    for name, revision, body in rows:
        if not selector.is_empty and not selector.matches(_labels(body)):
            continue
        if limit is not None and len(items) == limit:
            return items, True
        items.append(_decode(kind, name, revision, body))
    return items, False


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
        self._commits = CommitNotifier(str(self.path), self._connect)
        with self._write() as db:
            for statement in filter(str.strip, _SCHEMA.split(";")):
                db.execute(statement)
            self._migrate(db)

    @staticmethod
    def _migrate(db: sqlite3.Connection) -> None:
        """A store written before changes recorded the previous state gets the columns; the
        history it has cannot rebuild old states, so it counts as compacted (watches from
        before it list again, once)."""
        columns = {row[1] for row in db.execute("PRAGMA table_info(changes)")}
        if "prev_body" in columns:
            return
        db.execute("ALTER TABLE changes ADD COLUMN prev_revision INTEGER")
        db.execute("ALTER TABLE changes ADD COLUMN prev_body TEXT")
        db.execute("UPDATE compacted SET revision = (SELECT revision FROM counter)")

    def _connect(self) -> sqlite3.Connection:
        try:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
        except sqlite3.Error as e:
            raise StoreUnavailable(f"sqlite store {self.path}: {e}") from e
        return db

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = self._local.db = self._connect()
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
        self._commits.committed()

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

    def list(
        self,
        kind: str,
        selector: LabelSelector = EVERYTHING,
        *,
        limit: int | None = None,
        continue_token: str | None = None,
    ) -> Listing:
        self._check_kind(kind)
        check_limit(limit)
        with self._read() as db:
            db.execute("BEGIN")  # one snapshot: the objects and the revision they are at
            try:
                if continue_token is None:
                    revision = db.execute("SELECT revision FROM counter").fetchone()[0]
                    rows: Iterable[tuple[str, int, str]] = db.execute(
                        "SELECT name, revision, body FROM objects WHERE kind=? ORDER BY name",
                        (kind,),
                    )
                else:
                    revision, after = _parse_continue_token(kind, continue_token)
                    _check_not_compacted(db, revision, f"the continued list of {kind}")
                    rows = _rows_at(db, kind, revision, after)
                items, more = _page(rows, kind, selector, limit)
            finally:
                db.execute("COMMIT")
        token = _continue_token(kind, revision, items[-1].name) if more else None
        return Listing(items, str(revision), token)

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
                "INSERT INTO changes VALUES (?,?,?,?,?,NULL,NULL)",
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
                "SELECT revision, body FROM objects WHERE kind=? AND name=?", (obj.kind, obj.name)
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
                "INSERT INTO changes VALUES (?,?,?,?,?,?,?)",
                (revision, obj.kind, obj.name, EventType.MODIFIED.value, body, row[0], row[1]),
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
            # The body of a deletion is the object's last state; prev_body would repeat it.
            db.execute(
                "INSERT INTO changes VALUES (?,?,?,?,?,?,NULL)",
                (new_revision, kind, name, EventType.DELETED.value, row[1], row[0]),
            )

    def watch(
        self,
        kind: str,
        since: str,
        timeout: float,
        *,
        selector: LabelSelector = EVERYTHING,
        bookmarks: bool = False,
    ) -> Iterator[WatchEvent]:
        """Reads the change log after each commit (any process's); sleeps in between."""
        self._check_kind(kind)
        last = int(since)
        deadline = time.monotonic() + timeout
        with self._commits.watching():
            while (remaining := deadline - time.monotonic()) > 0:
                generation = self._commits.generation
                with self._read() as db:
                    db.execute("BEGIN")
                    try:
                        _check_not_compacted(db, last, f"watch of {kind}")
                        rows = db.execute(
                            "SELECT revision, name, type, body, prev_body FROM changes "
                            "WHERE kind=? AND revision>? ORDER BY revision",
                            (kind, last),
                        ).fetchall()
                        # Every change up to here has been looked at, this kind's or not.
                        seen = db.execute("SELECT revision FROM counter").fetchone()[0]
                    finally:
                        db.execute("COMMIT")
                for revision, name, type_, body, prev_body in rows:
                    last = revision
                    event = _selected(kind, selector, revision, name, type_, body, prev_body)
                    if event is not None:
                        deadline = time.monotonic() + timeout
                        yield event
                last = max(last, seen)
                if not rows:
                    self._commits.wait_after(generation, remaining)
        if bookmarks:
            yield WatchEvent.bookmark(kind, str(last))

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


def _selected(
    kind: str,
    selector: LabelSelector,
    revision: int,
    name: str,
    type_: str,
    body: str,
    prev_body: str | None,
) -> WatchEvent | None:
    """The change as a watcher scoped by `selector` sees it, as the API server's watch cache
    shows it: an object entering the selector is ADDED, one leaving it is DELETED in its last
    matching state (at the change's revision), others' changes are not shown."""
    event = EventType(type_)
    if selector.is_empty:
        return WatchEvent(event, _decode(kind, name, revision, body))
    now = event is not EventType.DELETED and selector.matches(_labels(body))
    if event is EventType.DELETED:
        before = selector.matches(_labels(body))
    else:
        before = prev_body is not None and selector.matches(_labels(prev_body))
    if now:
        shown = EventType.MODIFIED if before else EventType.ADDED
        return WatchEvent(shown, _decode(kind, name, revision, body))
    if before:
        last_state = body if event is EventType.DELETED else prev_body
        assert last_state is not None  # `before` was read from it
        return WatchEvent(EventType.DELETED, _decode(kind, name, revision, last_state))
    return None
