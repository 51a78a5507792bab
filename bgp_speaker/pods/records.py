"""Durable records of the containers this node's agent attached (`Workload` resources).

One record per CNI attachment, named by its IPAM handle (`model.handle_name`) and read
back only when its spec names exactly that handle. It is what lets DEL, CHECK and GC
work after an agent restart, and in embedded mode it is also the liveness source IPAM GC
reads (`ipam_blocks.store.workloads.WorkloadRecordLiveness`): the agent writes a record
before it allocates and removes it only after releasing, so GC never sees an allocation
without an owner. With the Kubernetes store the Pod API is the liveness source and the
records live in a node-local SQLite file instead (`open_records_store`).
"""

from __future__ import annotations

import contextlib
from dataclasses import replace
from pathlib import Path

from ipam_blocks.errors import AlreadyExists, NotFound
from ipam_blocks.handles import find_by_handle, name_taken
from ipam_blocks.model import Workload, parse_workload, render_workload
from ipam_blocks.store import Store
from ipam_blocks.store.sqlite import SqliteStore

RECORDS_FILE = "workloads.db"


def open_records_store(ipam_store: Store, state_dir: Path) -> Store:
    """Embedded mode: the IPAM store itself (GC reads the records there); else node-local."""
    if ipam_store.holds_workloads:
        return ipam_store
    return SqliteStore(state_dir / RECORDS_FILE)


class WorkloadRecords:
    def __init__(self, store: Store, node: str) -> None:
        self.store = store
        self.node = node

    def get(self, handle_id: str) -> Workload | None:
        """The record of exactly this handle (never one whose id differs only in case)."""
        res = find_by_handle(self.store, "Workload", handle_id)
        return None if res is None else parse_workload(res)

    def create(self, workload: Workload) -> Workload:
        """Store a new record; AlreadyExists if the handle has one, InvalidInput if another
        handle holds its name."""
        try:
            return parse_workload(self.store.create(render_workload(workload)))
        except AlreadyExists:
            if self.get(workload.handle_id) is None:
                raise name_taken(self.store, "Workload", workload.handle_id) from None
            raise

    def set_addresses(self, workload: Workload, addresses: tuple[str, ...]) -> Workload:
        """Update at the revision read: the record is ours (the handle is locked) so a
        Conflict means someone else wrote it, which the caller should hear about."""
        return parse_workload(
            self.store.update(render_workload(replace(workload, addresses=addresses)))
        )

    def forget(self, handle_id: str) -> None:
        record = self.get(handle_id)
        if record is not None:
            with contextlib.suppress(NotFound):
                self.store.delete("Workload", record.name)

    def on_node(self) -> list[Workload]:
        return [
            w for w in map(parse_workload, self.store.list("Workload").items) if w.node == self.node
        ]
