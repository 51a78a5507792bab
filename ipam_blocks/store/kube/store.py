"""The Kubernetes store: l3fabric.io/v1 custom resources and core Nodes (DESIGN §3).

Custom kinds (`CRD_PLURALS`) are cluster-scoped custom objects; revision = resourceVersion and
the API server's own compare-and-swap gives the store's: replace carries the revision it read
(409 → `Conflict`), delete carries it as a precondition. `Node` is the core Node: labels and
annotations as they are, with the l3fabric BGP attributes lifted from `l3fabric.io/`
annotations into `spec`. `Workload` has no cluster form; pods are the workloads there
(`pods.KubePodLiveness`). Beyond the stored kinds the store hands out the cluster's Secrets
(`secrets`) and Leases (`leases`); every request goes through one connection (`api.KubeApi`),
which also translates every API error.

A watch whose start revision the server has already compacted away (410 Gone) raises
`WatchExpired`, a `StoreUnavailable`: a caller's usual reaction to an unavailable store
(back off, list again, watch from the new revision) is exactly the recovery it needs. So does
a list continue token the server no longer honours (410 Expired).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import closing
from dataclasses import dataclass
from typing import Any

import urllib3
from kubernetes import client, watch

from ipam_blocks.errors import BeingDeleted, Conflict, InvalidInput
from ipam_blocks.selector import EVERYTHING, LabelSelector
from ipam_blocks.store.base import (
    CRD_PLURALS,
    EventType,
    Listing,
    Resource,
    WatchEvent,
    check_limit,
)
from ipam_blocks.store.kube.api import API_VERSION, CONNECT_TIMEOUT, GROUP, VERSION, KubeApi
from ipam_blocks.store.kube.leases import KubeLeaseClient
from ipam_blocks.store.kube.pods import KubePodLiveness
from ipam_blocks.store.kube.secrets import KubeSecretReader

# Node spec field -> (annotation key, type). The agent reads these as the node's BGP identity.
NODE_SPEC_ANNOTATIONS: Mapping[str, tuple[str, type]] = {
    "ipv4Address": ("l3fabric.io/ipv4-address", str),
    "asNumber": ("l3fabric.io/as-number", int),
    "routeReflectorClusterID": ("l3fabric.io/route-reflector-cluster-id", str),
}
# How long after its timeoutSeconds the client waits for the server to end a watch itself.
_SERVER_END_GRACE = 1.0
_SPEC_BY_ANNOTATION = {key: (name, kind) for name, (key, kind) in NODE_SPEC_ANNOTATIONS.items()}


@dataclass(frozen=True)
class _Api:
    """How one kind maps onto API calls. Calls return the raw JSON-decoded body."""

    kind: str
    get: Callable[..., Any]
    list: Callable[..., Any]
    create: Callable[..., Any]
    delete: Callable[..., Any]
    list_args: tuple[Any, ...] = ()


class KubeStore:
    """`Store` on the Kubernetes API. `scope` = (label key, value) confines the store to objects
    carrying that label (added on every write, required by every list and watch), so a test run
    against a shared cluster sees only its own objects. The scope label is not part of
    `Resource.labels`."""

    holds_workloads = False  # pods are the workloads

    def __init__(
        self,
        kubeconfig: str | None = None,
        scope: tuple[str, str] | None = None,
        *,
        request_timeout: float = 30.0,
    ) -> None:
        self._kube = KubeApi(kubeconfig, request_timeout)
        self.scope = scope
        # The raw client, for tests and tools that set up what the store does not write.
        self.api_client = self._kube.api_client
        self.core = self._kube.core

    # -- Store protocol ------------------------------------------------------------------------

    def get(self, kind: str, name: str) -> Resource:
        api = self._api(kind)
        with self._kube.translate(kind, name):
            raw = self._kube.call(api.get, name)
        return self._decode(kind, raw)

    def list(
        self,
        kind: str,
        selector: LabelSelector = EVERYTHING,
        *,
        limit: int | None = None,
        continue_token: str | None = None,
    ) -> Listing:
        """The server pages (`limit`, `continue`) and keeps the pages at one revision."""
        api = self._api(kind)
        check_limit(limit)
        paging: dict[str, Any] = {}
        if limit is not None:
            paging["limit"] = limit
        if continue_token is not None:
            paging["_continue"] = continue_token
        with self._kube.translate(kind, "", continuing=continue_token is not None):
            raw = self._kube.call(
                api.list, *api.list_args, label_selector=self._selector(selector), **paging
            )
        items = sorted((self._decode(kind, o) for o in raw.get("items") or ()), key=_name)
        meta = raw["metadata"]
        return Listing(items, meta["resourceVersion"], meta.get("continue") or None)

    def create(self, obj: Resource) -> Resource:
        api = self._api(obj.kind)
        body = self._encode(obj, with_revision=False)
        with self._kube.translate(obj.kind, obj.name, creating=True):
            raw = self._kube.call(api.create, *api.list_args, body)
        return self._decode(obj.kind, raw)

    def update(self, obj: Resource) -> Resource:
        self._api(obj.kind)  # rejects Workload and unknown kinds first
        if obj.revision is None:
            raise InvalidInput("revision", "update needs the revision the object was read at")
        body = self._encode(obj, with_revision=True)
        if obj.kind == "Node":
            return self._patch_node(obj, body["metadata"])
        with self._kube.translate(obj.kind, obj.name):
            raw = self._kube.call(
                self._kube.custom.replace_cluster_custom_object,
                GROUP, VERSION, CRD_PLURALS[obj.kind], obj.name, body,
            )  # fmt: skip
        return self._decode(obj.kind, raw)

    def _patch_node(self, obj: Resource, meta: Mapping[str, Any]) -> Resource:
        """Write only the labels and annotations `obj` changes, never the whole Node.

        Other controllers write Nodes too (the kubelet, cloud and lifecycle controllers): a
        JSON patch naming only the changed keys cannot overwrite their parts, and the
        resourceVersion in it keeps the store's compare-and-swap (a write in between is a 409,
        the caller re-reads and re-applies). A Node being deleted is not written at all.
        """
        with self._kube.translate("Node", obj.name):
            current = self._kube.call(self._kube.core.read_node, obj.name)
        current_meta = current.get("metadata") or {}
        if current_meta.get("deletionTimestamp"):
            raise BeingDeleted("Node", obj.name)
        if current_meta.get("resourceVersion") != obj.revision:
            raise Conflict("Node", obj.name)
        patch = [
            *_map_patch("labels", current_meta.get("labels"), meta["labels"]),
            *_map_patch("annotations", current_meta.get("annotations"), meta["annotations"]),
        ]
        if not patch:
            return self._decode("Node", current)  # nothing to change: no write
        patch.append({"op": "replace", "path": "/metadata/resourceVersion", "value": obj.revision})
        with self._kube.translate("Node", obj.name):
            raw = self._kube.call(self._kube.core.patch_node, obj.name, patch)
        return self._decode("Node", raw)

    def delete(self, kind: str, name: str, revision: str | None = None) -> None:
        api = self._api(kind)
        options = None
        if revision is not None:
            options = client.V1DeleteOptions(
                preconditions=client.V1Preconditions(resource_version=revision)
            )
        with self._kube.translate(kind, name):
            self._kube.call(api.delete, name, body=options)

    def watch(
        self,
        kind: str,
        since: str,
        timeout: float,
        *,
        selector: LabelSelector = EVERYTHING,
        bookmarks: bool = False,
    ) -> Iterator[WatchEvent]:
        """Every change after `since` that `selector` selects (the server filters, and turns
        objects entering or leaving the selector into ADDED and DELETED); ends once `timeout`
        seconds pass without one.

        Each watch request asks the server to end it when the quiet period is over
        (timeoutSeconds, whole seconds); the server then sends a bookmark, which moves the
        revision to resume from past changes the watch did not show. The client's read timeout,
        a little later, notices a server that does not end it. Either way the watch resumes
        from the last revision seen until the quiet period is over. With `bookmarks` the
        server's bookmarks are passed on, and the quiet end yields one with the last revision.
        """
        api = self._api(kind)
        last = since
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            stream = watch.Watch(return_type="object").stream(
                api.list,
                *api.list_args,
                label_selector=self._selector(selector),
                resource_version=last,
                timeout_seconds=max(1, math.ceil(remaining)),
                allow_watch_bookmarks=True,
                _request_timeout=(CONNECT_TIMEOUT, math.ceil(remaining) + _SERVER_END_GRACE),
            )
            with closing(stream):
                while True:
                    with self._kube.translate(kind, "", watching=since):
                        try:
                            event = next(stream)
                        except StopIteration:
                            break
                        except urllib3.exceptions.ReadTimeoutError:
                            break  # quiet for the rest of the period (checked by the loop)
                        except urllib3.exceptions.MaxRetryError as e:
                            if not isinstance(e.reason, urllib3.exceptions.ReadTimeoutError):
                                raise
                            break  # no response headers within the quiet period
                    raw, type_ = event["raw_object"], event["type"]
                    revision = (raw.get("metadata") or {}).get("resourceVersion") or last
                    last = revision
                    if type_ == "BOOKMARK":
                        continue  # progress without a change: resume from here
                    deadline = time.monotonic() + timeout
                    yield WatchEvent(EventType(type_), self._decode(kind, raw))
        if bookmarks:
            yield WatchEvent.bookmark(kind, last)

    def close(self) -> None:
        self._kube.close()

    # -- what a cluster offers beyond the stored kinds -----------------------------------------

    def owner_liveness(self) -> KubePodLiveness:
        return KubePodLiveness(self._kube, self._selector(EVERYTHING))

    def secrets(self) -> KubeSecretReader:
        return KubeSecretReader(self._kube)

    def lease(self, namespace: str, name: str) -> KubeLeaseClient:
        return KubeLeaseClient(self._kube, namespace, name)

    # -- plumbing ------------------------------------------------------------------------------

    def _api(self, kind: str) -> _Api:
        if kind in CRD_PLURALS:
            c, plural = self._kube.custom, CRD_PLURALS[kind]
            return _Api(
                kind,
                get=lambda name, **kw: c.get_cluster_custom_object(
                    GROUP, VERSION, plural, name, **kw
                ),
                list=c.list_cluster_custom_object,
                create=c.create_cluster_custom_object,
                delete=lambda name, **kw: c.delete_cluster_custom_object(
                    GROUP, VERSION, plural, name, **kw
                ),
                list_args=(GROUP, VERSION, plural),
            )
        if kind == "Node":
            return _Api(
                kind,
                get=self._kube.core.read_node,
                list=self._kube.core.list_node,
                create=self._kube.core.create_node,
                delete=self._kube.core.delete_node,
            )
        if kind == "Workload":
            raise InvalidInput(
                "kind",
                "Workload records exist only in the embedded store; in a cluster the pods are "
                "the workloads (see KubePodLiveness)",
            )
        raise InvalidInput("kind", f"unknown kind {kind!r}")

    def _selector(self, selector: LabelSelector) -> str | None:
        if self.scope is not None:
            key, value = self.scope
            selector = LabelSelector(
                {**selector.match_labels, key: value}, selector.match_expressions
            )
        return selector.to_text() or None

    # -- Resource <-> API object ---------------------------------------------------------------

    def _encode(self, obj: Resource, *, with_revision: bool) -> dict[str, Any]:
        labels = dict(obj.labels)
        if self.scope is not None:
            key, value = self.scope
            if labels.get(key, value) != value:
                raise InvalidInput("labels", f"label {key} is reserved for this store's scope")
            labels[key] = value
        meta: dict[str, Any] = {"name": obj.name, "labels": labels}
        if with_revision:
            meta["resourceVersion"] = obj.revision
        if obj.kind == "Node":
            meta["annotations"] = _node_annotations(obj)
            return {"apiVersion": "v1", "kind": "Node", "metadata": meta}
        meta["annotations"] = dict(obj.annotations)
        return {
            "apiVersion": API_VERSION,
            "kind": obj.kind,
            "metadata": meta,
            "spec": _plain(obj.spec),
        }

    def _decode(self, kind: str, raw: Mapping[str, Any]) -> Resource:
        meta = raw.get("metadata") or {}
        labels = dict(meta.get("labels") or {})
        if self.scope is not None:
            labels.pop(self.scope[0], None)
        annotations = dict(meta.get("annotations") or {})
        spec = _node_spec(annotations) if kind == "Node" else raw.get("spec") or {}
        return Resource(kind, meta["name"], spec, labels, annotations, meta.get("resourceVersion"))


# -- helpers ---------------------------------------------------------------------------------


def _name(obj: Resource) -> str:
    return obj.name


def _plain(value: Any) -> Any:
    """Mappings and sequences as JSON-ready dicts and lists."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _map_patch(
    field: str, current: Mapping[str, str] | None, wanted: Mapping[str, str]
) -> list[dict[str, Any]]:
    """JSON patch operations turning metadata.`field` from `current` into `wanted`, one key
    at a time (keys `wanted` keeps unchanged are not mentioned)."""
    if not current:
        return (
            [{"op": "add", "path": f"/metadata/{field}", "value": dict(wanted)}] if wanted else []
        )
    ops: list[dict[str, Any]] = []
    for key in sorted(current.keys() | wanted.keys()):
        path = f"/metadata/{field}/{_pointer(key)}"
        if key not in wanted:
            ops.append({"op": "remove", "path": path})
        elif current.get(key) != wanted[key]:
            ops.append({"op": "add", "path": path, "value": wanted[key]})
    return ops


def _pointer(key: str) -> str:
    """`key` as one JSON pointer token (RFC 6901): label keys hold '/'."""
    return key.replace("~", "~0").replace("/", "~1")


def _node_annotations(obj: Resource) -> dict[str, str]:
    annotations = dict(obj.annotations)
    for key in annotations:
        if key in _SPEC_BY_ANNOTATION:
            field = _SPEC_BY_ANNOTATION[key][0]
            raise InvalidInput(
                "annotations", f"{key} is written through spec.{field}, not directly"
            )
    for field, value in obj.spec.items():
        if field not in NODE_SPEC_ANNOTATIONS:
            known = ", ".join(NODE_SPEC_ANNOTATIONS)
            raise InvalidInput(f"spec.{field}", f"a Node's spec holds only {known}")
        if value is None:
            continue
        key, expected = NODE_SPEC_ANNOTATIONS[field]
        if isinstance(value, bool) or not isinstance(value, expected):
            raise InvalidInput(f"spec.{field}", f"must be {expected.__name__}, got {value!r}")
        annotations[key] = str(value)
    return annotations


def _node_spec(annotations: dict[str, str]) -> dict[str, Any]:
    """Lift the l3fabric annotations out of `annotations` (in place) into a spec."""
    spec: dict[str, Any] = {}
    for key, (field, expected) in _SPEC_BY_ANNOTATION.items():
        if key not in annotations:
            continue
        text = annotations.pop(key)
        try:
            spec[field] = expected(text)
        except ValueError:
            # Somebody wrote a malformed annotation by hand: pass it on as it is, so the
            # consumer's validation can name the field, rather than failing every read.
            spec[field] = text
    return spec


__all__ = ["NODE_SPEC_ANNOTATIONS", "KubeStore"]
