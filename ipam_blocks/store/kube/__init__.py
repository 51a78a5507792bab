"""The Kubernetes store backend: the only code that talks to the Kubernetes API.

`store.KubeStore` (custom resources and Nodes) is the entry point; it hands out the rest:
`pods.KubePodLiveness`, `secrets.KubeSecretReader`, `leases.KubeLeaseClient`. All of them
share one connection (`api.KubeApi`).
"""

from __future__ import annotations

from ipam_blocks.store.kube.pods import KubePodLiveness
from ipam_blocks.store.kube.store import KubeStore

__all__ = ["KubePodLiveness", "KubeStore"]
