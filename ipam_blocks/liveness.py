"""Whether the owner of an allocation still exists: the question IPAM GC asks.

In a cluster the answer is the Pod API (`KubePodLiveness`, in `store.kube`); in embedded mode
it is the `Workload` records the node agent keeps for the containers it attached (and that
`ipam assign --pod` writes for manually declared workloads).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from ipam_blocks.store.base import Store


@dataclass(frozen=True)
class PodRef:
    namespace: str
    pod: str
    node: str


class OwnerLiveness(Protocol):
    def live_pods(self) -> frozenset[PodRef]:
        """Every pod that currently exists, with the node it runs on."""
        ...


class WorkloadRecordLiveness:
    """Embedded mode: a pod is alive while a Workload record names it."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def live_pods(self) -> frozenset[PodRef]:
        return frozenset(
            PodRef(w.spec.get("namespace", ""), w.spec.get("pod", ""), w.spec.get("node", ""))
            for w in self._store.list("Workload").items
        )


def liveness_for(store: Store) -> OwnerLiveness:
    """The liveness source that matches the store's mode."""
    from ipam_blocks.store.sqlite import SqliteStore

    if isinstance(store, SqliteStore):
        return WorkloadRecordLiveness(store)
    from ipam_blocks.store.kube import KubePodLiveness, KubeStore

    if isinstance(store, KubeStore):
        return KubePodLiveness(store)
    raise TypeError(f"no liveness source for {type(store).__name__}")
