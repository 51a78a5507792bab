"""The embedded store holds every allocation and pod name: its files are the owner's alone
(0600, with the -wal, -shm and lock files beside it) and directories it creates are 0700,
whatever the umask of the process that creates them."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ipam_blocks.store.base import Resource
from ipam_blocks.store.sqlite import SqliteStore

REPO = Path(__file__).resolve().parents[2]
SUFFIXES = ("", "-wal", "-shm", ".lock")


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def test_the_cli_creates_a_private_store_and_directories(tmp_path: Path) -> None:
    shared = tmp_path / "var"
    shared.mkdir(mode=0o755)
    os.chmod(shared, 0o755)
    db = shared / "state" / "l3fabric" / "ipam.db"
    run = subprocess.run(
        [sys.executable, "-m", "l3fabric.cli", "pool", "add", "p", "--cidr", "10.9.0.0/16",
         "--store", f"sqlite:{db}"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
        preexec_fn=lambda: os.umask(0o022),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert mode(shared) == 0o755  # a directory it did not create is left alone
    assert mode(shared / "state") == 0o700
    assert mode(db.parent) == 0o700
    for suffix in SUFFIXES:
        path = Path(f"{db}{suffix}")
        if path.exists():  # -wal and -shm go away with the last connection
            assert mode(path) == 0o600, path


def test_wal_and_shm_files_are_private_while_open(tmp_path: Path) -> None:
    db = tmp_path / "d" / "ipam.db"
    with umask(0o000):
        store = SqliteStore(db)
        try:
            store.create(Resource("IPPool", "p", {"cidr": "10.9.0.0/16"}))
            assert {s: mode(Path(f"{db}{s}")) for s in SUFFIXES} == dict.fromkeys(SUFFIXES, 0o600)
            assert mode(db.parent) == 0o700
        finally:
            store.close()


def test_a_store_left_readable_by_an_older_version_is_tightened(tmp_path: Path) -> None:
    db = tmp_path / "ipam.db"
    SqliteStore(db).close()
    os.chmod(db, 0o644)

    store = SqliteStore(db)
    try:
        assert mode(db) == 0o600
        assert store.list("IPPool").items == []
    finally:
        store.close()
