"""The Kubernetes store: l3fabric.io/v1 custom resources and core Nodes (DESIGN §3).

Custom kinds (`CRD_PLURALS`) are cluster-scoped custom objects; revision = resourceVersion and
the API server's own compare-and-swap gives the store's: replace carries the revision it read
(409 → `Conflict`), delete carries it as a precondition. `Node` is the core Node: labels and
annotations as they are, with the l3fabric BGP attributes lifted from `l3fabric.io/`
annotations into `spec`. `Workload` has no cluster form; pods are the workloads there
(`KubePodLiveness`).

All API errors are translated in one place (`_translate`).

A watch whose start revision the server has already compacted away (410 Gone) raises
`WatchExpired`, a `StoreUnavailable`: a caller's usual reaction to an unavailable store
(back off, list again, watch from the new revision) is exactly the recovery it needs.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import closing, contextmanager
from dataclasses import dataclass
from typing import Any

import urllib3
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException

from ipam_blocks.errors import (
    AlreadyExists,
    Conflict,
    InvalidInput,
    NotFound,
    StoreError,
    StoreUnavailable,
    WatchExpired,
)
from ipam_blocks.liveness import PodRef
from ipam_blocks.selector import EVERYTHING, LabelSelector
from ipam_blocks.store.base import CRD_PLURALS, EventType, Listing, Resource, WatchEvent

GROUP = "l3fabric.io"
VERSION = "v1"
API_VERSION = f"{GROUP}/{VERSION}"

# Node spec field -> (annotation key, type). The agent reads these as the node's BGP identity.
NODE_SPEC_ANNOTATIONS: Mapping[str, tuple[str, type]] = {
    "ipv4Address": ("l3fabric.io/ipv4-address", str),
    "asNumber": ("l3fabric.io/as-number", int),
    "routeReflectorClusterID": ("l3fabric.io/route-reflector-cluster-id", str),
}
_SPEC_BY_ANNOTATION = {key: (name, kind) for name, (key, kind) in NODE_SPEC_ANNOTATIONS.items()}

_CONNECT_TIMEOUT = 5.0
_PAGE_SIZE = 500
# Only connection attempts are retried: a write whose response was lost must surface as
# StoreUnavailable, not be replayed (a replayed CAS write answers Conflict for a write that
# actually landed, and the caller would apply its change twice).
_RETRIES = urllib3.Retry(
    total=2, connect=2, read=0, status=0, other=0, redirect=0, backoff_factor=0.1
)


def _load_api_client(kubeconfig: str | None) -> client.ApiClient:
    """kubeconfig path, else in-cluster service account, else KUBECONFIG / ~/.kube/config."""
    cfg = client.Configuration()
    try:
        if kubeconfig:
            config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
        else:
            try:
                config.load_incluster_config(client_configuration=cfg)
            except ConfigException:
                config.load_kube_config(client_configuration=cfg)
    except (ConfigException, OSError, TypeError, ValueError) as e:
        where = kubeconfig or "in-cluster service account or ~/.kube/config"
        raise InvalidInput(
            "kubeconfig", f"cannot load Kubernetes configuration ({where}): {e}"
        ) from e
    cfg.retries = _RETRIES
    return client.ApiClient(cfg)


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

    def __init__(
        self,
        kubeconfig: str | None = None,
        scope: tuple[str, str] | None = None,
        *,
        request_timeout: float = 30.0,
    ) -> None:
        self.api_client = _load_api_client(kubeconfig)
        self.scope = scope
        self._timeout = (_CONNECT_TIMEOUT, request_timeout)
        self._custom = client.CustomObjectsApi(self.api_client)
        self.core = client.CoreV1Api(self.api_client)
        self._where = self.api_client.configuration.host

    # -- Store protocol ------------------------------------------------------------------------

    def get(self, kind: str, name: str) -> Resource:
        api = self._api(kind)
        with self._translate(kind, name):
            raw = self._call(api.get, name)
        return self._decode(kind, raw)

    def list(self, kind: str, selector: LabelSelector = EVERYTHING) -> Listing:
        api = self._api(kind)
        with self._translate(kind, ""):
            raw = self._call(api.list, *api.list_args, label_selector=self._selector(selector))
        items = sorted((self._decode(kind, o) for o in raw.get("items") or ()), key=_name)
        return Listing(items, raw["metadata"]["resourceVersion"])

    def create(self, obj: Resource) -> Resource:
        api = self._api(obj.kind)
        body = self._encode(obj, with_revision=False)
        with self._translate(obj.kind, obj.name, creating=True):
            raw = self._call(api.create, *api.list_args, body)
        return self._decode(obj.kind, raw)

    def update(self, obj: Resource) -> Resource:
        self._api(obj.kind)  # rejects Workload and unknown kinds first
        if obj.revision is None:
            raise InvalidInput("revision", "update needs the revision the object was read at")
        body = self._encode(obj, with_revision=True)
        with self._translate(obj.kind, obj.name):
            if obj.kind == "Node":
                # A JSON patch of labels and annotations only: replacing the whole Node would
                # need a full, current copy of everything else the kubelet and others own.
                # The resourceVersion in the patch makes it a compare-and-swap like a replace.
                meta = body["metadata"]
                patch = [
                    {"op": "add", "path": f"/metadata/{key}", "value": meta.get(key) or {}}
                    for key in ("labels", "annotations")
                ]
                patch.append(
                    {"op": "add", "path": "/metadata/resourceVersion", "value": obj.revision}
                )
                raw = self._call(self.core.patch_node, obj.name, patch)
            else:
                raw = self._call(
                    self._custom.replace_cluster_custom_object,
                    GROUP, VERSION, CRD_PLURALS[obj.kind], obj.name, body,
                )  # fmt: skip
        return self._decode(obj.kind, raw)

    def delete(self, kind: str, name: str, revision: str | None = None) -> None:
        api = self._api(kind)
        options = None
        if revision is not None:
            options = client.V1DeleteOptions(
                preconditions=client.V1Preconditions(resource_version=revision)
            )
        with self._translate(kind, name):
            self._call(api.delete, name, body=options)

    def watch(self, kind: str, since: str, timeout: float) -> Iterator[WatchEvent]:
        """Every change after `since`; ends once `timeout` seconds pass without one.

        The server bounds each watch request (timeoutSeconds); the client's read timeout is
        what notices a quiet stream. Either way the watch resumes from the last revision seen
        until the quiet period is over.
        """
        api = self._api(kind)
        last = since
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            stream = watch.Watch(return_type="object").stream(
                api.list,
                *api.list_args,
                label_selector=self._selector(EVERYTHING),
                resource_version=last,
                timeout_seconds=max(1, math.ceil(remaining)),
                allow_watch_bookmarks=True,
                _request_timeout=(_CONNECT_TIMEOUT, max(remaining, 0.05)),
            )
            with closing(stream):
                while True:
                    with self._translate(kind, "", watching=since):
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
                    if type_ == "BOOKMARK":
                        last = revision  # progress without a change: resume from here
                        continue
                    last = revision
                    deadline = time.monotonic() + timeout
                    yield WatchEvent(EventType(type_), self._decode(kind, raw))

    def close(self) -> None:
        self.api_client.close()

    # -- plumbing ------------------------------------------------------------------------------

    def _api(self, kind: str) -> _Api:
        if kind in CRD_PLURALS:
            c, plural = self._custom, CRD_PLURALS[kind]
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
                get=self.core.read_node,
                list=self.core.list_node,
                create=self.core.create_node,
                delete=self.core.delete_node,
            )
        if kind == "Workload":
            raise InvalidInput(
                "kind",
                "Workload records exist only in the embedded store; in a cluster the pods are "
                "the workloads (see KubePodLiveness)",
            )
        raise InvalidInput("kind", f"unknown kind {kind!r}")

    def _call(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """One request; the body is decoded here, not by the client's typed models, which reject
        fields newer than themselves."""
        response = func(*args, _preload_content=False, _request_timeout=self._timeout, **kwargs)
        try:
            data = response.data
        finally:
            response.release_conn()
        return json.loads(data) if data else {}

    def _selector(self, selector: LabelSelector) -> str | None:
        if self.scope is not None:
            key, value = self.scope
            selector = LabelSelector(
                {**selector.match_labels, key: value}, selector.match_expressions
            )
        return selector.to_text() or None

    @contextmanager
    def _translate(
        self, kind: str, name: str, *, creating: bool = False, watching: str | None = None
    ) -> Iterator[None]:
        """The one place where client and HTTP failures become store errors."""
        try:
            yield
        except ApiException as e:
            raise _store_error(e, kind, name, self._where, creating, watching) from e
        except urllib3.exceptions.HTTPError as e:
            raise StoreUnavailable(
                f"Kubernetes API at {self._where} unreachable: {_reason(e)}"
            ) from e

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


class KubePodLiveness:
    """GC's owner check in a cluster: every pod that has not terminated, with its node."""

    def __init__(self, store: KubeStore) -> None:
        self._store = store

    def live_pods(self) -> frozenset[PodRef]:
        store = self._store
        selector = store._selector(EVERYTHING)
        pods: set[PodRef] = set()
        token: str | None = None
        while True:
            with store._translate("Pod", ""):
                page = store._call(
                    store.core.list_pod_for_all_namespaces,
                    label_selector=selector,
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


def _status(e: ApiException) -> dict[str, Any]:
    try:
        body = json.loads(e.body or "")
    except (TypeError, ValueError):
        return {}
    return body if isinstance(body, dict) and body.get("kind") == "Status" else {}


def _store_error(
    e: ApiException, kind: str, name: str, where: str, creating: bool, watching: str | None
) -> StoreError | InvalidInput:
    status = _status(e)
    code = e.status or status.get("code") or 0
    reason = status.get("reason", "")
    message = status.get("message") or e.reason or "no message"
    details = status.get("details") or {}
    what = f"{kind} {name!r}" if name else kind
    if code == 404 and name and reason == "NotFound" and details.get("name") == name:
        return NotFound(kind, name)
    if code == 404:
        served = f"{CRD_PLURALS[kind]}.{GROUP}/{VERSION}" if kind in CRD_PLURALS else kind
        return StoreUnavailable(
            f"Kubernetes API at {where} does not serve {served} (CRDs not installed?): {message}"
        )
    if code == 409 and creating:
        return AlreadyExists(kind, name)
    if code == 409:
        return Conflict(kind, name)
    if code == 410 and watching is not None:
        return WatchExpired(f"watch of {kind} from revision {watching} expired: {message}")
    if code in (400, 422):
        causes = details.get("causes") or []
        field = next((c["field"] for c in causes if c.get("field")), "") or "request"
        detail = "; ".join(c.get("message", "") for c in causes if c.get("message")) or message
        return InvalidInput(field, f"{what} rejected by the API server: {detail}")
    if code in (401, 403):
        return StoreError(f"Kubernetes API at {where} refused access to {what} ({code}): {message}")
    if code == 0:
        return StoreUnavailable(f"Kubernetes API at {where} unreachable: {e.reason}")
    return StoreUnavailable(f"Kubernetes API at {where} failed on {what} ({code}): {message}")


def _reason(e: urllib3.exceptions.HTTPError) -> str:
    """The innermost cause, without urllib3's object reprs."""
    inner = getattr(e, "reason", None) or e
    text = str(inner)
    # "<urllib3.connection.HTTPConnection object at 0x..>: Failed to establish ..." -> the tail
    return text.split(">: ", 1)[-1]


__all__ = [
    "API_VERSION",
    "GROUP",
    "NODE_SPEC_ANNOTATIONS",
    "VERSION",
    "KubePodLiveness",
    "KubeStore",
    "WatchExpired",
]
