"""`ipam check` on a live cluster: writes in flight between the reads of one snapshot are
not problems. A store wrapper lets another allocator run exactly while the check reads, so
its first snapshot sees a handle counted before its block was written; only what a fresh
read confirms is reported, and the rest is counted as skipped."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from netaddr import IPNetwork

from ipam_blocks.allocator import IPAM, AssignRequest
from ipam_blocks.check import check
from ipam_blocks.model import IPPool, Node, Workload
from ipam_blocks.pools import add_node, add_pool, record_workload
from ipam_blocks.store.sqlite import SqliteStore
from l3fabric.cli import main
from l3fabric.commands import ipam as ipam_commands

NODE = "n1"


class InterleavingStore:
    """The real store, except that the first listing of `kind` first lets `then` run: a
    writer whose steps land between two reads of one snapshot."""

    def __init__(self, inner: SqliteStore, kind: str, then: Callable[[], object]) -> None:
        self.inner, self.kind, self.then, self.done = inner, kind, then, False

    def list(self, kind: str, *args: Any) -> Any:
        if kind == self.kind and not self.done:
            self.done = True
            self.then()
        return self.inner.list(kind, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "ipam.db"


@pytest.fixture
def store(db: Path) -> Iterator[SqliteStore]:
    s = SqliteStore(db)
    ipam = IPAM(s)
    add_pool(ipam, IPPool("pool-a", IPNetwork("10.0.0.0/24"), 28))
    add_node(ipam, Node(NODE))
    assign(s, "net.warm")  # the node owns a block with room: no claim in flight below
    yield s
    s.close()


def assign(store: SqliteStore, handle_id: str) -> None:
    record_workload(IPAM(store), Workload(handle_id, NODE, "ns", handle_id.replace(".", "-")))
    IPAM(store).auto_assign(
        AssignRequest(NODE, handle_id, pod=handle_id.replace(".", "-"), namespace="ns")
    )


def in_flight(store: SqliteStore) -> InterleavingStore:
    """The check's blocks are read before, its handles after another pod's assignment."""
    return InterleavingStore(store, "IPAMHandle", lambda: assign(store, "net.inflight"))


def test_an_assignment_in_flight_is_skipped_not_reported(store: SqliteStore) -> None:
    waits: list[float] = []
    report = check(IPAM(in_flight(store)), store.owner_liveness(), sleep=waits.append)  # type: ignore[arg-type]

    assert report.clean, report.to_dict()
    assert report.handle_mismatches == []
    assert report.skipped == 1
    assert waits == [1.0]  # the fresh read comes a moment later


def test_a_lasting_problem_is_still_reported_beside_a_skipped_one(store: SqliteStore) -> None:
    res = store.get("IPAMHandle", "net.warm")
    (cidr,) = res.spec["block"]
    store.update(res.with_spec({**res.spec, "block": {cidr: 5}}))  # overcounted for good

    report = check(IPAM(in_flight(store)), store.owner_liveness(), recheck_after=0)  # type: ignore[arg-type]

    assert [(m.handle, m.recorded, m.actual) for m in report.handle_mismatches] == [
        ("net.warm", {cidr: 5}, {cidr: 1})
    ]
    assert report.skipped == 1
    assert not report.clean


def test_the_cli_says_how_many_it_skipped_and_exits_0(
    store: SqliteStore, db: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(ipam_commands, "open_store", lambda _: in_flight(SqliteStore(db)))
    assert main(["ipam", "check", "--store", f"sqlite:{db}"]) == 0
    out = capsys.readouterr().out
    assert "handle mismatches: 0" in out and "ipam check: clean" in out, out
    assert "skipped: 1 finding(s) a fresh read did not confirm" in out, out

    monkeypatch.setattr(ipam_commands, "open_store", lambda _: in_flight(SqliteStore(db)))
    assert main(["ipam", "check", "-o", "json", "--store", f"sqlite:{db}"]) == 0
    as_json = json.loads(capsys.readouterr().out)
    assert as_json["clean"] is True and as_json["skipped"] == 1
