from __future__ import annotations

from collections.abc import Iterator

import pytest

from ipam_blocks.store.sqlite import SqliteStore


@pytest.fixture
def store(tmp_path) -> Iterator[SqliteStore]:
    """An empty embedded store of this test's own (modules may override the fixture)."""
    s = SqliteStore(tmp_path / "ipam.db")
    yield s
    s.close()
