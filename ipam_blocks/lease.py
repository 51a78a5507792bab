"""A coordination Lease as leader election (`leader`) reads and writes it.

`LeaseClient` is the seam: the Kubernetes store backend implements it
(`store.kube.leases.KubeLeaseClient`, reached through `Store.lease`); the election logic
never sees the API.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Protocol


@dataclass(frozen=True)
class LeaseRecord:
    """The Lease's spec, parsed."""

    holder: str = ""
    duration: int = 0
    acquire_time: datetime | None = None
    renew_time: datetime | None = None
    transitions: int = 0


class LeaseClient(Protocol):
    """Get, create and compare-and-swap replace one Lease. Errors: `Conflict` when a write
    lost the race, `StoreUnavailable` for everything else."""

    def get(self) -> tuple[LeaseRecord, str] | None:
        """(record, resourceVersion), or None when there is no such Lease."""
        ...

    def create(self, record: LeaseRecord) -> str:
        """The new resourceVersion; `Conflict` when the Lease exists already."""
        ...

    def replace(self, record: LeaseRecord, revision: str) -> str:
        """The new resourceVersion; `Conflict` unless the Lease is still at `revision`."""
        ...
