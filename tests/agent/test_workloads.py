"""Where the workload records live, and what they hold."""

from __future__ import annotations

from pathlib import Path

from bgp_speaker.pods.records import RECORDS_FILE, WorkloadRecords, open_records_store
from ipam_blocks.model import Workload
from ipam_blocks.store.sqlite import SqliteStore


def test_embedded_mode_keeps_records_in_the_ipam_store(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "store.db")
    assert open_records_store(store, tmp_path / "state") is store
    store.close()


def test_other_stores_get_a_node_local_file(tmp_path: Path) -> None:
    class ClusterStore:  # stands in for the Kubernetes store: the Pod API is liveness there
        holds_workloads = False

    local = open_records_store(ClusterStore(), tmp_path / "state")  # type: ignore[arg-type]
    assert isinstance(local, SqliteStore) and local.path == tmp_path / "state" / RECORDS_FILE
    local.close()


def test_records_round_trip_and_stay_per_node(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "store.db")
    mine, theirs = WorkloadRecords(store, "a"), WorkloadRecords(store, "b")
    w = mine.create(Workload("Net.C1", "a", "ns", "p", "C1", "eth0", "/run/netns/x"))
    theirs.create(Workload("net.c2", "b"))
    w = mine.set_addresses(w, ("10.0.0.1",))
    assert mine.get("Net.C1") == w
    assert mine.get("net.c1") is None  # ids are compared exactly, never case-folded
    assert [r.handle_id for r in mine.on_node()] == ["Net.C1"]
    mine.forget("Net.C1")
    mine.forget("Net.C1")
    assert mine.get("Net.C1") is None
    store.close()
