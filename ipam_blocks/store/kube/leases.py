"""`LeaseClient` on `coordination.k8s.io/v1` Leases: get, create, compare-and-swap replace.

Requests go through the client's generic object calls with raw JSON bodies: the typed
`CoordinationV1Api` turns the body into a model first, which re-renders the timestamps
(dropping the fraction when it is zero, which the API server's MicroTime refuses).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import urllib3
from kubernetes.client.exceptions import ApiException

from ipam_blocks.errors import Conflict, L3FabricError, StoreUnavailable
from ipam_blocks.lease import LeaseRecord
from ipam_blocks.store.kube.api import KubeApi

_LEASE_GROUP, _LEASE_VERSION = "coordination.k8s.io", "v1"
LEASE_API_VERSION = f"{_LEASE_GROUP}/{_LEASE_VERSION}"
MICRO_TIME = "%Y-%m-%dT%H:%M:%S.%fZ"
# Shorter than the store's: a renewal that takes longer than this is late anyway.
_REQUEST_TIMEOUT = (5.0, 10.0)


def parse_lease(raw: dict[str, Any]) -> LeaseRecord:
    spec = raw.get("spec") or {}
    return LeaseRecord(
        holder=spec.get("holderIdentity") or "",
        duration=int(spec.get("leaseDurationSeconds") or 0),
        acquire_time=_parse_time(spec.get("acquireTime")),
        renew_time=_parse_time(spec.get("renewTime")),
        transitions=int(spec.get("leaseTransitions") or 0),
    )


def render_lease(name: str, record: LeaseRecord, revision: str | None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if revision is not None:
        meta["resourceVersion"] = revision
    spec: dict[str, Any] = {
        "holderIdentity": record.holder,
        "leaseDurationSeconds": record.duration,
        "leaseTransitions": record.transitions,
    }
    if record.acquire_time is not None:
        spec["acquireTime"] = record.acquire_time.strftime(MICRO_TIME)
    if record.renew_time is not None:
        spec["renewTime"] = record.renew_time.strftime(MICRO_TIME)
    return {"apiVersion": LEASE_API_VERSION, "kind": "Lease", "metadata": meta, "spec": spec}


def _parse_time(text: Any) -> datetime | None:
    if not isinstance(text, str) or not text:
        return None
    for fmt in (MICRO_TIME, "%Y-%m-%dT%H:%M:%SZ"):
        try:
            return datetime.strptime(text, fmt).replace(tzinfo=UTC)
        except ValueError:
            continue
    return None


class KubeLeaseClient:
    """One Lease, `namespace`/`name`."""

    def __init__(self, api: KubeApi, namespace: str, name: str) -> None:
        self._api = api
        self._where = (_LEASE_GROUP, _LEASE_VERSION, namespace, "leases")
        self.namespace = namespace
        self.name = name

    def get(self) -> tuple[LeaseRecord, str] | None:
        """(record, resourceVersion), or None when there is no such Lease."""
        try:
            raw = self._call(self._api.custom.get_namespaced_custom_object, *self._where, self.name)
        except ApiException as e:
            if e.status == 404:
                return None
            raise self._error(e) from e
        return parse_lease(raw), raw["metadata"]["resourceVersion"]

    def create(self, record: LeaseRecord) -> str:
        """The new resourceVersion; `Conflict` when the Lease exists already."""
        body = render_lease(self.name, record, None)
        return self._write(self._api.custom.create_namespaced_custom_object, *self._where, body)

    def replace(self, record: LeaseRecord, revision: str) -> str:
        """The new resourceVersion; `Conflict` unless the Lease is still at `revision`."""
        body = render_lease(self.name, record, revision)
        return self._write(
            self._api.custom.replace_namespaced_custom_object, *self._where, self.name, body
        )

    def _write(self, func: Callable[..., Any], *args: Any) -> str:
        try:
            raw = self._call(func, *args)
        except ApiException as e:
            raise self._error(e) from e
        revision: str = raw["metadata"]["resourceVersion"]
        return revision

    def _call(self, func: Callable[..., Any], *args: Any) -> dict[str, Any]:
        try:
            raw: dict[str, Any] = self._api.call(func, *args, timeout=_REQUEST_TIMEOUT)
        except urllib3.exceptions.HTTPError as e:
            raise self._api.unreachable(e) from e
        return raw

    def _error(self, e: ApiException) -> L3FabricError:
        # Unlike the store's translation, an existing Lease on create is a lost race too:
        # the elector treats every Conflict as "someone else wrote first".
        if e.status == 409:
            return Conflict("Lease", f"{self.namespace}/{self.name}")
        return StoreUnavailable(
            f"Lease {self.namespace}/{self.name}: API answered {e.status} {e.reason}"
        )
