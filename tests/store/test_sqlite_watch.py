"""The embedded store's watches sleep until a commit (ipam_blocks/store/sqlite_commits.py):
an idle agent's six watches cost no change-log reads, and a commit from another connection
(another process's) still wakes them."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest

from ipam_blocks.store import Resource
from ipam_blocks.store.sqlite import SqliteStore

KINDS = ("Node", "BGPConfiguration", "BGPPeer", "IPPool", "IPAMBlock", "BlockAffinity")


@pytest.fixture
def change_log_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every statement reading the change log, from any connection a store opens."""
    reads: list[str] = []
    connect = SqliteStore._connect

    def traced(self: SqliteStore) -> sqlite3.Connection:
        db = connect(self)
        db.set_trace_callback(lambda sql: reads.append(sql) if "FROM changes" in sql else None)
        return db

    monkeypatch.setattr(SqliteStore, "_connect", traced)
    return reads


def test_idle_watches_read_the_change_log_only_after_a_commit(
    tmp_path: Path, change_log_reads: list[str]
) -> None:
    store = SqliteStore(tmp_path / "store.db")
    writer = SqliteStore(tmp_path / "store.db")  # another connection, as another process
    seen: list[str] = []

    def watch(kind: str) -> None:
        revision = store.list(kind).revision
        seen.extend(e.resource.name for e in store.watch(kind, revision, timeout=3.0))

    threads = [threading.Thread(target=watch, args=(k,)) for k in KINDS]
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    # One read each when the watch starts; a 50 ms poll would have made 120.
    assert len(change_log_reads) <= 2 * len(KINDS)
    writer.create(Resource("IPPool", "woken", {"cidr": "10.0.0.0/16"}))
    deadline = time.monotonic() + 2
    while not seen and time.monotonic() < deadline:
        time.sleep(0.02)
    assert seen == ["woken"]
    for thread in threads:
        thread.join()
    store.close()
    writer.close()
