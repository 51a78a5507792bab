"""The embedded store's owner liveness: the `Workload` records themselves."""

from __future__ import annotations

from ipam_blocks.liveness import PodRef
from ipam_blocks.store.base import Store


class WorkloadRecordLiveness:
    """A pod is alive while a Workload record names it."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def live_pods(self) -> frozenset[PodRef]:
        return frozenset(
            PodRef(w.spec.get("namespace", ""), w.spec.get("pod", ""), w.spec.get("node", ""))
            for w in self._store.list("Workload").items
        )
