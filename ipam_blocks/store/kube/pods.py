"""GC's owner check in a cluster: the Pod API."""

from __future__ import annotations

from ipam_blocks.liveness import PodRef
from ipam_blocks.store.kube.api import KubeApi

_PAGE_SIZE = 500


class KubePodLiveness:
    """Every pod that has not terminated, with its node. `label_selector` confines the listing
    (the store's scope)."""

    def __init__(self, api: KubeApi, label_selector: str | None) -> None:
        self._api = api
        self._selector = label_selector

    def live_pods(self) -> frozenset[PodRef]:
        pods: set[PodRef] = set()
        token: str | None = None
        while True:
            with self._api.translate("Pod", ""):
                page = self._api.call(
                    self._api.core.list_pod_for_all_namespaces,
                    label_selector=self._selector,
                    limit=_PAGE_SIZE,
                    _continue=token,
                )
            for pod in page.get("items") or ():
                if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
                    continue
                meta = pod.get("metadata") or {}
                node = (pod.get("spec") or {}).get("nodeName") or ""
                pods.add(PodRef(meta.get("namespace", ""), meta.get("name", ""), node))
            token = (page.get("metadata") or {}).get("continue")
            if not token:
                return frozenset(pods)
