"""Whether the owner of an allocation still exists: the question IPAM GC asks.

Each store backend answers it (`Store.owner_liveness`): in a cluster the Pod API
(`store.kube.pods.KubePodLiveness`), in the embedded store the `Workload` records the node agent
keeps for the containers it attached, and that `ipam assign --pod` writes for manually declared
workloads (`store.workloads.WorkloadRecordLiveness`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class PodRef:
    namespace: str
    pod: str
    node: str


class OwnerLiveness(Protocol):
    def live_pods(self) -> frozenset[PodRef]:
        """Every pod that currently exists, with the node it runs on."""
        ...
