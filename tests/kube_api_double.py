"""TEST DOUBLE of the Kubernetes API server: the one stand-in this project allows (DESIGN §8).

It serves, over real HTTP on 127.0.0.1, exactly the part of the API that l3fabric's Kubernetes
store and pod-liveness check use, with the real server's semantics wherever the client could
tell the difference:

- `/apis/l3fabric.io/v1/{plural}[/{name}]` for every CRD in `charts/l3fabric/crds/`: list (with
  `labelSelector`, `limit` and `continue`), watch, create, get, replace, delete. Request bodies
  are pruned to the CRD's openAPIV3Schema (undeclared fields vanish, non-nullable nulls are
  dropped, defaults applied), then validated against it (types, int32/int64, enum, required,
  minimum/maximum, ...); a violation is a 422 `Invalid` Status whose causes name the field.
- `/api/v1/nodes[/{name}]`: list, watch, create, get, replace, patch (JSON patch and JSON merge
  patch, applied to the object as stored when the request arrives), delete.
- Finalizers: deleting an object whose `metadata.finalizers` is not empty only sets its
  `deletionTimestamp` (a MODIFIED event); it stays readable and writable (no new finalizers)
  until a write removes the last finalizer, which deletes it. deletionTimestamp is server-owned.
- Other writers: `node_controller` (a `NodeController`) simulates a controller beside l3fabric
  that writes annotations, labels, taints and a finalizer to every new Node shortly after its
  creation, through the same write path (new resourceVersion, a MODIFIED event).
- `/api/v1/pods` (list across namespaces) and `/api/v1/namespaces/{ns}/pods[/{name}[/status]]`
  (list, create, get, delete, replace status) so tests can make pods come and go.
- `/apis/coordination.k8s.io/v1/namespaces/{ns}/leases[/{name}]`: list, watch, create, get,
  replace (resourceVersion CAS), delete, for leader election. The spec is checked as the real
  server does (types, leaseDurationSeconds > 0, leaseTransitions >= 0, MicroTime timestamps).
- `/api/v1/namespaces/{ns}/secrets[/{name}]`: create, get, replace, delete (BGP passwords).
  `stringData` is merged into base64 `data` on write and never stored, as on the real server.
- resourceVersion is one global counter. Replace/patch with a stale metadata.resourceVersion and
  delete with a stale `preconditions.resourceVersion` answer 409 `Conflict`; replace without a
  resourceVersion is unconditional, as on the real server. A write that changes nothing keeps
  the object's resourceVersion and emits no event (etcd3 storage does the same).
- Watches stream chunked newline-delimited JSON events after `resourceVersion` from an in-memory
  event log (`compact()` forgets it: older watches then get a 410 `Expired` ERROR event), honour
  `timeoutSeconds` and send a BOOKMARK before closing when `allowWatchBookmarks` is set. With a
  `labelSelector` an object entering the selector is ADDED, one leaving it DELETED (its previous
  state at the new resourceVersion, as the watch cache does). `drop_watches()` ends every open
  watch at once, as an API server restart does (`expire=True`: its new watch cache also answers
  410 to resumes from before the restart).
- Paged lists: `limit` returns that many items and a `continue` token; the following pages are
  served at the first page's resourceVersion (rebuilt from the event log), and a token older
  than the last `compact()` is a 410 `Expired`, as on the real server.
- Every error is a real `Status` object. Requests need the bearer token from the kubeconfig the
  double writes. Query parameters that would change semantics but are not implemented
  (fieldSelector, dryRun, ...) are refused with 400 so nobody silently relies on them.

Every request is recorded in `requests` (method, path, query, JSON body, the bearer token, and
the bytes of its response once sent) so tests can derive the RBAC rules the code needs, see what
a write sends, and count what one client costs the server (`add_token` gives clients their own
token; `requests_of(token)`, `bytes_sent(token)`). `fail_next(code)` makes the next
request(s) fail with a server error.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import ipaddress
import json
import re
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import yaml

from ipam_blocks.errors import InvalidInput
from ipam_blocks.selector import LabelSelector, parse_selector_text

CRD_DIR = Path(__file__).parents[1] / "charts" / "l3fabric" / "crds"
DEFAULT_TOKEN = "l3fabric-test-double-token"

_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
# ObjectMeta fields a client may send; the real server drops anything else in metadata.
_OBJECT_META = frozenset(
    {
        "name",
        "generateName",
        "namespace",
        "uid",
        "resourceVersion",
        "generation",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "labels",
        "annotations",
        "ownerReferences",
        "finalizers",
        "managedFields",
        "selfLink",
    }
)
# ObjectMeta fields only a delete sets; clients cannot set or clear them.
_DELETION_META = ("deletionTimestamp", "deletionGracePeriodSeconds")
# Query parameters that change what the server does but that the double does not implement.
_REFUSED_PARAMS = frozenset(
    {"fieldSelector", "dryRun", "resourceVersionMatch", "sendInitialEvents", "propagationPolicy"}
)
_INT_RANGES = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}


# ---------------------------------------------------------------------------------------------
# Status objects and the error that carries them out of a handler


def status_body(code: int, reason: str, message: str, details: Mapping[str, Any] | None = None):
    body: dict[str, Any] = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    if details is not None:
        body["details"] = dict(details)
    return body


class ApiError(Exception):
    """Raised inside a handler; becomes a Status response."""

    def __init__(
        self, code: int, reason: str, message: str, details: Mapping[str, Any] | None = None
    ):
        super().__init__(message)
        self.body = status_body(code, reason, message, details)
        self.code = code


@dataclass(frozen=True)
class FieldError:
    field: str
    reason: str  # FieldValueInvalid | FieldValueNotSupported | FieldValueRequired | ...
    message: str  # without the field prefix, as in the Status causes

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


def _quote(value: Any) -> str:
    return json.dumps(value) if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def _type_name(value: Any) -> str:
    match value:
        case None:
            return "null"
        case bool():
            return "boolean"
        case int():
            return "integer"
        case float():
            return "number"
        case str():
            return "string"
        case list():
            return "array"
        case dict():
            return "object"
    return type(value).__name__


# ---------------------------------------------------------------------------------------------
# CRD schemas: structural checks at load, pruning, defaulting and validation per request


class SchemaError(Exception):
    """The CRD uses something that is not a structural schema, or that the double cannot enforce."""


_SCHEMA_KEYWORDS = frozenset(
    {
        "type",
        "properties",
        "additionalProperties",
        "items",
        "required",
        "enum",
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
        "minLength",
        "maxLength",
        "pattern",
        "minItems",
        "maxItems",
        "minProperties",
        "maxProperties",
        "nullable",
        "format",
        "description",
        "default",
        "example",
        "title",
        "x-kubernetes-preserve-unknown-fields",
        "x-kubernetes-int-or-string",
    }
)
_FORMATS = frozenset(
    {"int32", "int64", "float", "double", "ipv4", "ipv6", "cidr", "byte", "password"}
)


def check_structural(schema: Mapping[str, Any], path: str) -> None:
    """Reject what a real API server would reject, and what this double would not enforce."""
    unknown = set(schema) - _SCHEMA_KEYWORDS
    if unknown:
        raise SchemaError(f"{path}: keywords not supported by the test double: {sorted(unknown)}")
    if "type" not in schema and not (
        schema.get("x-kubernetes-int-or-string")
        or schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        raise SchemaError(f"{path}: structural schemas need a type")
    if schema.get("format") and schema["format"] not in _FORMATS:
        raise SchemaError(f"{path}: format {schema['format']!r} not supported by the test double")
    if schema.get("format") in _INT_RANGES and schema.get("type") != "integer":
        raise SchemaError(f"{path}: format {schema['format']} on a {schema.get('type')}")
    props = schema.get("properties") or {}
    extra = schema.get("additionalProperties")
    if props and extra is not None:
        raise SchemaError(f"{path}: properties and additionalProperties are mutually exclusive")
    if extra is False:
        raise SchemaError(
            f"{path}: additionalProperties: false is not allowed in structural schemas"
        )
    missing = set(schema.get("required") or ()) - set(props)
    if missing:
        # Such a field is pruned before validation, so every write would fail `required`.
        raise SchemaError(f"{path}: required fields not declared in properties: {sorted(missing)}")
    if schema.get("type") == "array" and "items" not in schema:
        raise SchemaError(f"{path}: arrays need items")
    for name, sub in props.items():
        check_structural(sub, f"{path}.{name}")
    if isinstance(extra, Mapping):
        check_structural(extra, f"{path}[*]")
    if "items" in schema:
        check_structural(schema["items"], f"{path}[]")
    if "default" in schema:
        errors = validate(schema["default"], schema, f"{path}.default")
        if errors:
            raise SchemaError(f"{path}: default does not validate: {errors[0]}")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def prune(value: Any, schema: Mapping[str, Any] | None, path: str, dropped: list[str]) -> Any:
    """Drop undeclared fields and non-nullable nulls, apply defaults; records dropped paths."""
    if schema is None:
        return value
    if isinstance(value, dict):
        keep_unknown = bool(schema.get("x-kubernetes-preserve-unknown-fields"))
        props: Mapping[str, Any] = schema.get("properties") or {}
        extra = schema.get("additionalProperties")
        out: dict[str, Any] = {}
        for key, item in value.items():
            sub = props.get(key) if key in props else extra if isinstance(extra, Mapping) else None
            if sub is None and not keep_unknown and extra is not True:
                dropped.append(_join(path, key))
                continue
            if (
                item is None
                and sub is not None
                and not sub.get("nullable")
                and "default" not in sub
            ):
                continue
            out[key] = prune(item, sub, _join(path, key), dropped)
        for key, sub in props.items():
            if "default" in sub and out.get(key) is None:
                out[key] = copy.deepcopy(sub["default"])
        return out
    if isinstance(value, list):
        items = schema.get("items")
        return [prune(v, items, f"{path}[{i}]", dropped) for i, v in enumerate(value)]
    return value


def validate(value: Any, schema: Mapping[str, Any], path: str) -> list[FieldError]:
    if value is None:
        if schema.get("nullable"):
            return []
        expected = schema.get("type", "object")
        return [FieldError(path, "FieldValueInvalid", _type_message(path, expected, value))]
    if schema.get("x-kubernetes-int-or-string"):
        if isinstance(value, bool) or not isinstance(value, int | str):
            return [
                FieldError(path, "FieldValueInvalid", _type_message(path, "int-or-string", value))
            ]
    elif "type" in schema and not _has_type(value, schema["type"]):
        return [FieldError(path, "FieldValueInvalid", _type_message(path, schema["type"], value))]
    errors: list[FieldError] = []
    if "enum" in schema and value not in schema["enum"]:
        supported = ", ".join(_quote(v) for v in schema["enum"])
        message = f"Unsupported value: {_quote(value)}: supported values: {supported}"
        errors.append(FieldError(path, "FieldValueNotSupported", message))
    if isinstance(value, int | float) and not isinstance(value, bool):
        errors += _check_number(value, schema, path)
    if isinstance(value, str):
        errors += _check_string(value, schema, path)
    if isinstance(value, list):
        errors += _check_count(len(value), schema, path, "minItems", "maxItems", "items")
        items = schema.get("items")
        if items is not None:
            for i, item in enumerate(value):
                errors += validate(item, items, f"{path}[{i}]")
    if isinstance(value, dict):
        errors += _check_count(
            len(value), schema, path, "minProperties", "maxProperties", "properties"
        )
        for key in schema.get("required") or ():
            if key not in value:
                errors.append(FieldError(_join(path, key), "FieldValueRequired", "Required value"))
        props = schema.get("properties") or {}
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            sub = props.get(key) if key in props else extra if isinstance(extra, Mapping) else None
            if sub is not None:
                errors += validate(item, sub, _join(path, key))
    return errors


def _has_type(value: Any, expected: str) -> bool:
    match expected:
        case "object":
            return isinstance(value, dict)
        case "array":
            return isinstance(value, list)
        case "string":
            return isinstance(value, str)
        case "boolean":
            return isinstance(value, bool)
        case "integer":
            return isinstance(value, int) and not isinstance(value, bool)
        case "number":
            return isinstance(value, int | float) and not isinstance(value, bool)
    raise SchemaError(f"unknown type {expected!r}")


def _type_message(path: str, expected: str, value: Any) -> str:
    actual = _type_name(value)
    return f'Invalid value: "{actual}": {path} in body must be of type {expected}: "{actual}"'


def _check_number(value: float, schema: Mapping[str, Any], path: str) -> list[FieldError]:
    errors = []

    def bad(text: str) -> None:
        errors.append(
            FieldError(path, "FieldValueInvalid", f"Invalid value: {value}: {path} {text}")
        )

    if "minimum" in schema:
        low, exclusive = schema["minimum"], schema.get("exclusiveMinimum")
        if value < low or (exclusive and value == low):
            bad(f"in body should be greater than {'' if exclusive else 'or equal to '}{low}")
    if "maximum" in schema:
        high, exclusive = schema["maximum"], schema.get("exclusiveMaximum")
        if value > high or (exclusive and value == high):
            bad(f"in body should be less than {'' if exclusive else 'or equal to '}{high}")
    fmt = schema.get("format")
    if fmt in _INT_RANGES and not _INT_RANGES[fmt][0] <= value <= _INT_RANGES[fmt][1]:
        bad(f"in body must be of type {fmt}")
    return errors


def _check_string(value: str, schema: Mapping[str, Any], path: str) -> list[FieldError]:
    errors = []
    if "minLength" in schema and len(value) < schema["minLength"]:
        msg = f"{path} in body should be at least {schema['minLength']} chars long"
        errors.append(
            FieldError(path, "FieldValueInvalid", f"Invalid value: {_quote(value)}: {msg}")
        )
    if "maxLength" in schema and len(value) > schema["maxLength"]:
        errors.append(
            FieldError(
                path, "FieldValueTooLong", f"Too long: may not be longer than {schema['maxLength']}"
            )
        )
    if "pattern" in schema and not re.search(schema["pattern"], value):
        msg = f"{path} in body should match '{schema['pattern']}'"
        errors.append(
            FieldError(path, "FieldValueInvalid", f"Invalid value: {_quote(value)}: {msg}")
        )
    fmt = schema.get("format")
    parse = {
        "ipv4": ipaddress.IPv4Address,
        "ipv6": ipaddress.IPv6Address,
        "cidr": ipaddress.ip_network,
    }
    if fmt in parse:
        try:
            parse[fmt](value)
        except ValueError:
            msg = f"{path} in body must be of type {fmt}: {_quote(value)}"
            errors.append(
                FieldError(path, "FieldValueInvalid", f"Invalid value: {_quote(value)}: {msg}")
            )
    return errors


def _check_count(n: int, schema: Mapping[str, Any], path: str, lo: str, hi: str, what: str):
    errors = []
    if lo in schema and n < schema[lo]:
        errors.append(
            FieldError(
                path,
                "FieldValueInvalid",
                f"Invalid value: {n}: {path} in body should have at least {schema[lo]} {what}",
            )
        )
    if hi in schema and n > schema[hi]:
        errors.append(
            FieldError(
                path, "FieldValueTooMany", f"Too many: {n}: must have at most {schema[hi]} {what}"
            )
        )
    return errors


# ---------------------------------------------------------------------------------------------
# Resource types


@dataclass(frozen=True)
class ResourceType:
    plural: str
    kind: str
    group: str  # "" for core
    version: str
    namespaced: bool
    schema: Mapping[str, Any] | None = None  # CRDs only
    fields: frozenset[str] = frozenset({"apiVersion", "kind", "spec", "status"})
    """Top-level fields of a core kind's Go struct: others vanish on decode."""

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def group_resource(self) -> str:
        """How the real server names the resource in messages: `ippools.l3fabric.io`, `nodes`."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def qualified_kind(self) -> str:
        return f"{self.kind}.{self.group}" if self.group else self.kind


NODES = ResourceType("nodes", "Node", "", "v1", namespaced=False)
PODS = ResourceType("pods", "Pod", "", "v1", namespaced=True)
LEASES = ResourceType("leases", "Lease", "coordination.k8s.io", "v1", namespaced=True)
SECRETS = ResourceType(
    "secrets",
    "Secret",
    "",
    "v1",
    namespaced=True,
    fields=frozenset({"apiVersion", "kind", "data", "stringData", "type", "immutable"}),
)


@lru_cache(maxsize=8)
def load_crds(crd_dir: Path = CRD_DIR) -> tuple[ResourceType, ...]:
    """Every CRD version served from `crd_dir`, structurally checked."""
    types = []
    for path in sorted(crd_dir.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            spec = doc["spec"]
            expected_name = f"{spec['names']['plural']}.{spec['group']}"
            if doc["metadata"]["name"] != expected_name:
                raise SchemaError(f"{path.name}: metadata.name must be {expected_name}")
            for version in spec["versions"]:
                if not version.get("served", True):
                    continue
                schema = version["schema"]["openAPIV3Schema"]
                try:
                    check_structural(schema, "openAPIV3Schema")
                    _check_root(schema)
                except SchemaError as e:
                    raise SchemaError(f"{path.name} ({version['name']}): {e}") from None
                types.append(
                    ResourceType(
                        spec["names"]["plural"],
                        spec["names"]["kind"],
                        spec["group"],
                        version["name"],
                        namespaced=spec["scope"] == "Namespaced",
                        schema=schema,
                    )
                )
    return tuple(types)


def _check_root(schema: Mapping[str, Any]) -> None:
    meta = (schema.get("properties") or {}).get("metadata")
    if meta and set(meta) - {"type", "description"}:
        raise SchemaError("openAPIV3Schema.metadata may only say type: object")


# ---------------------------------------------------------------------------------------------
# The server


@dataclass
class RecordedRequest:
    method: str
    path: str
    query: Mapping[str, str]
    body: Any = None  # the JSON-decoded request body (None: none, or not JSON)
    token: str = ""  # the bearer token it came with
    bytes_sent: int = 0  # response bytes (headers excluded), growing while a watch streams


@dataclass(frozen=True)
class NodeController:
    """A controller that writes Nodes beside l3fabric (a cloud node controller, a lifecycle
    manager): `delay` seconds after a Node is created it adds these labels, annotations and
    taints, and `finalizer` (so deleting the Node leaves it being deleted until someone removes
    the finalizer). `writes` counts the Nodes it has written."""

    delay: float = 0.2
    annotations: Mapping[str, str] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)
    taints: tuple[Mapping[str, str], ...] = ()
    finalizer: str | None = None
    writes: list[str] = field(default_factory=list, compare=False)

    def apply(self, node: dict[str, Any]) -> None:
        meta = node["metadata"]
        meta["annotations"] = {**(meta.get("annotations") or {}), **self.annotations}
        meta["labels"] = {**(meta.get("labels") or {}), **self.labels}
        if self.taints:
            spec = node.setdefault("spec", {})
            spec["taints"] = [*(spec.get("taints") or []), *map(dict, self.taints)]
        if self.finalizer and self.finalizer not in (meta.get("finalizers") or []):
            meta["finalizers"] = [*(meta.get("finalizers") or []), self.finalizer]


@dataclass
class _Event:
    revision: int
    resource: str  # plural
    type: str  # ADDED | MODIFIED | DELETED
    obj: dict[str, Any]
    old: dict[str, Any] | None = None


@dataclass
class _Request:
    method: str
    path: str
    query: dict[str, str]
    headers: Mapping[str, str]
    body: Any = None
    warnings: list[str] = field(default_factory=list)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _truthy(text: str | None) -> bool:
    return (text or "").lower() in ("true", "1")


class KubeApiDouble:
    """A TEST DOUBLE of the Kubernetes API server (see module docstring). Use as a context manager
    or with start()/stop(); `kubeconfig` is the path of a kubeconfig that points at it."""

    def __init__(
        self,
        crd_dir: Path = CRD_DIR,
        *,
        token: str = DEFAULT_TOKEN,
        kubeconfig: Path | None = None,
        default_watch_timeout: float = 1800.0,
        max_watch_seconds: float | None = None,
        node_controller: NodeController | None = None,
    ) -> None:
        self.token = token
        self.node_controller = node_controller
        self._timers: list[threading.Timer] = []
        self.types: dict[tuple[str, str], ResourceType] = {
            (t.api_version, t.plural): t
            for t in (*load_crds(Path(crd_dir)), NODES, PODS, LEASES, SECRETS)
        }
        self.requests: list[RecordedRequest] = []
        self.default_watch_timeout = default_watch_timeout
        # Real servers end watches early too (restarts, their own request timeout): setting this
        # makes every watch end after that long, so clients' resume logic gets exercised.
        self.max_watch_seconds = max_watch_seconds
        # Bookmarks are best effort on real servers too; False ignores allowWatchBookmarks.
        self.send_bookmarks = True
        self._objects: dict[str, dict[tuple[str, str], dict[str, Any]]] = {}
        self._events: list[_Event] = []
        self._revision = 1
        self._compacted = 0
        self._tokens = {token}
        self._watch_epoch = 0  # drop_watches() ends every stream started in an older epoch
        self._failures: list[tuple[int, str]] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._sockets: set[socket.socket] = set()
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._kubeconfig_path = kubeconfig

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> KubeApiDouble:
        double = self
        self._stopping = False

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def process_request(self, request, client_address):
                with double._cond:
                    double._sockets.add(request)
                super().process_request(request, client_address)

            def shutdown_request(self, request):
                with double._cond:
                    double._sockets.discard(request)
                super().shutdown_request(request)

        self._server = Server(("127.0.0.1", 0), _Handler)
        self._server.double = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )
        self._thread.start()
        if self._kubeconfig_path is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="kube-api-double-")
            self._kubeconfig_path = Path(self._tmp.name) / "kubeconfig"
        self.write_kubeconfig(self._kubeconfig_path)
        return self

    def stop(self) -> None:
        """Stop serving and cut open connections: afterwards the address refuses connections."""
        if self._server is None:
            return
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            sockets = list(self._sockets)
            timers, self._timers = self._timers, []
        for timer in timers:
            timer.cancel()
        self._server.shutdown()
        self._server.server_close()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._server = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> KubeApiDouble:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the API server double is not running")
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def kubeconfig(self) -> Path:
        if self._kubeconfig_path is None:
            raise RuntimeError("start() the API server double first")
        return self._kubeconfig_path

    def write_kubeconfig(self, path: Path) -> Path:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "double", "cluster": {"server": self.url}}],
            "users": [{"name": "double", "user": {"token": self.token}}],
            "contexts": [{"name": "double", "context": {"cluster": "double", "user": "double"}}],
            "current-context": "double",
        }
        path.write_text(yaml.safe_dump(config))
        return path

    # -- test controls -------------------------------------------------------------------------

    @property
    def resource_version(self) -> str:
        with self._cond:
            return str(self._revision)

    def compact(self) -> None:
        """Forget the event log, like etcd compaction: watches from older revisions get 410."""
        with self._cond:
            self._events.clear()
            self._compacted = self._revision

    def drop_watches(self, *, expire: bool = False) -> None:
        """End every open watch stream, as an API server restart does. `expire`: the restarted
        server's watch cache starts empty, so resuming from an older revision gets 410."""
        with self._cond:
            self._watch_epoch += 1
            if expire:
                self._events.clear()
                self._compacted = self._revision
            self._cond.notify_all()

    def add_token(self, token: str) -> None:
        """Accept `token` too, so one client's requests can be told from the others'."""
        with self._cond:
            self._tokens.add(token)

    def requests_of(self, token: str) -> list[RecordedRequest]:
        return [r for r in list(self.requests) if r.token == token]

    def bytes_sent(self, token: str) -> int:
        """Response bytes sent so far to requests carrying `token`."""
        return sum(r.bytes_sent for r in self.requests_of(token))

    def fail_next(
        self, code: int = 503, count: int = 1, reason: str = "ServiceUnavailable"
    ) -> None:
        """Answer the next `count` requests with a `code` Status instead of serving them."""
        with self._cond:
            self._failures.extend([(code, reason)] * count)

    def objects(self, plural: str) -> list[dict[str, Any]]:
        """Deep copies of the stored objects of one resource, by (namespace, name)."""
        with self._cond:
            stored = self._objects.get(plural, {})
            return [copy.deepcopy(stored[k]) for k in sorted(stored)]

    # -- request handling (called from handler threads) ----------------------------------------

    def _accepts(self, token: str) -> bool:
        with self._cond:
            return token in self._tokens

    def _next_failure(self) -> tuple[int, str] | None:
        with self._cond:
            return self._failures.pop(0) if self._failures else None

    def _route(self, req: _Request) -> tuple[ResourceType, str, str, str]:
        """-> (type, namespace, name, subresource) for the request path, or 404."""
        parts = [p for p in req.path.split("/") if p]
        match parts:
            case ["api", "v1", *rest]:
                api_version = "v1"
            case ["apis", group, version, *rest]:
                api_version = f"{group}/{version}"
            case _:
                raise _not_served()
        namespace = ""
        if rest[:1] == ["namespaces"] and len(rest) >= 3:
            namespace, rest = rest[1], rest[2:]
        if not rest or len(rest) > 3:
            raise _not_served()
        rtype = self.types.get((api_version, rest[0]))
        if rtype is None or (namespace and not rtype.namespaced):
            raise _not_served()
        name = rest[1] if len(rest) > 1 else ""
        sub = rest[2] if len(rest) > 2 else ""
        if sub and not (rtype is PODS and sub == "status"):
            raise _not_served()
        return rtype, namespace, name, sub

    def handle(self, req: _Request) -> tuple[int, Any] | Iterator[bytes]:
        """-> (status, body) or, for watches, an iterator of event lines."""
        refused = sorted(_REFUSED_PARAMS & set(req.query))
        if refused:
            raise ApiError(
                400, "BadRequest", f"query parameters not implemented by the test double: {refused}"
            )
        if req.query.get("fieldValidation", "Warn") not in ("", "Ignore", "Warn"):
            raise ApiError(
                400, "BadRequest", "fieldValidation=Strict is not implemented by the test double"
            )
        rtype, namespace, name, sub = self._route(req)
        if rtype.namespaced and not namespace and (name or req.method != "GET"):
            raise _not_served()
        match req.method, bool(name), sub:
            case "GET", False, "":
                if _truthy(req.query.get("watch")):
                    return self._watch(rtype, namespace, req.query)
                return 200, self._list(rtype, namespace, req.query)
            case "POST", False, "":
                return 201, self._create(rtype, namespace, req)
            case "GET", True, "":
                return 200, self._get(rtype, namespace, name)
            case "PUT", True, "" if rtype is not PODS:
                return 200, self._replace(rtype, namespace, name, req)
            case "PUT", True, "status":
                return 200, self._replace(rtype, namespace, name, req, status_only=True)
            case "PATCH", True, "" if rtype is NODES:
                return 200, self._patch(rtype, namespace, name, req)
            case "DELETE", True, "":
                return 200, self._delete(rtype, namespace, name, req.body)
        raise ApiError(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
        )

    def _list(
        self, rtype: ResourceType, namespace: str, query: Mapping[str, str]
    ) -> dict[str, Any]:
        selector = _selector(query)
        limit = _limit(query)
        after: tuple[str, str] | None = None
        with self._cond:
            if query.get("continue"):
                revision, after = _parse_continue(query["continue"])
                if revision < self._compacted:
                    raise ApiError(410, "Expired", _CONTINUE_EXPIRED)
                stored = self._state_at(rtype.plural, revision)
            else:
                revision, stored = self._revision, self._objects.get(rtype.plural, {})
            items: list[dict[str, Any]] = []
            last = more = None
            for key, obj in sorted(stored.items()):
                if after is not None and key <= after:
                    continue
                if (namespace and key[0] != namespace) or not selector.matches(_labels(obj)):
                    continue
                if limit is not None and len(items) == limit:
                    more = last
                    break
                items.append(copy.deepcopy(obj))
                last = key
        meta: dict[str, Any] = {"resourceVersion": str(revision)}
        if more is not None:
            meta["continue"] = _continue_token(revision, more)
        return {
            "apiVersion": rtype.api_version,
            "kind": f"{rtype.kind}List",
            "metadata": meta,
            "items": items,
        }

    def _state_at(self, plural: str, revision: int) -> dict[tuple[str, str], dict[str, Any]]:
        """The objects of `plural` as they were at `revision`: today's, with every logged
        change after it undone (the log reaches back to the last compaction). Lock held."""
        state = dict(self._objects.get(plural, {}))
        for event in reversed(self._events):
            if event.revision <= revision:
                break
            if event.resource != plural:
                continue
            meta = event.obj["metadata"]
            key = (meta.get("namespace", ""), meta["name"])
            if event.old is None:  # ADDED
                state.pop(key, None)
            else:
                state[key] = event.old
        return state

    def _get(self, rtype: ResourceType, namespace: str, name: str) -> dict[str, Any]:
        with self._cond:
            return copy.deepcopy(self._stored(rtype, namespace, name))

    def _stored(self, rtype: ResourceType, namespace: str, name: str) -> dict[str, Any]:
        obj = self._objects.get(rtype.plural, {}).get((namespace, name))
        if obj is None:
            raise ApiError(
                404, "NotFound", f'{rtype.group_resource} "{name}" not found', _details(rtype, name)
            )
        return obj

    def _create(self, rtype: ResourceType, namespace: str, req: _Request) -> dict[str, Any]:
        obj = self._admit(rtype, namespace, req)
        name = obj["metadata"]["name"]
        if obj["metadata"].get("resourceVersion"):
            raise ApiError(
                400, "BadRequest", "resourceVersion should not be set on objects to be created"
            )
        meta = obj["metadata"]
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=_now())
        for key in _DELETION_META:
            meta.pop(key, None)  # server-owned: set by a delete, never by a client
        if rtype.schema is not None:
            meta["generation"] = 1
        if rtype is PODS:
            obj["status"] = {"phase": "Pending"}  # status is a subresource; create ignores it
        with self._cond:
            stored = self._objects.setdefault(rtype.plural, {})
            if (namespace, name) in stored:
                raise ApiError(
                    409,
                    "AlreadyExists",
                    f'{rtype.group_resource} "{name}" already exists',
                    _details(rtype, name),
                )
            self._write(rtype, namespace, obj, "ADDED", None)
            if rtype is NODES and self.node_controller is not None:
                self._schedule_node_controller(name, meta["uid"])
            return copy.deepcopy(obj)

    def _schedule_node_controller(self, name: str, uid: str) -> None:
        """The simulated controller's write, `delay` after creation (lock held)."""
        controller = self.node_controller
        assert controller is not None

        def write() -> None:
            with self._cond:
                old = self._objects.get(NODES.plural, {}).get(("", name))
                if self._stopping or old is None or old["metadata"]["uid"] != uid:
                    return  # gone (or recreated) meanwhile
                if "deletionTimestamp" in old["metadata"]:
                    return  # being deleted: no new finalizers
                new = copy.deepcopy(old)
                controller.apply(new)
                self._update(NODES, "", old, new)
                controller.writes.append(name)

        timer = threading.Timer(controller.delay, write)
        timer.daemon = True
        self._timers.append(timer)
        timer.start()

    def _replace(
        self,
        rtype: ResourceType,
        namespace: str,
        name: str,
        req: _Request,
        *,
        status_only: bool = False,
    ) -> dict[str, Any]:
        new = self._admit(rtype, namespace, req)
        if new["metadata"]["name"] != name:
            raise ApiError(
                400,
                "BadRequest",
                f"the name of the object ({new['metadata']['name']}) does not match the name on "
                f"the URL ({name})",
            )
        with self._cond:
            old = self._stored(rtype, namespace, name)
            self._check_cas(rtype, name, old, new["metadata"].get("resourceVersion"))
            if status_only:
                merged = copy.deepcopy(old)
                merged["status"] = new.get("status", {})
                new = merged
            return self._update(rtype, namespace, old, new)

    def _patch(
        self, rtype: ResourceType, namespace: str, name: str, req: _Request
    ) -> dict[str, Any]:
        content_type = req.headers.get("Content-Type", "").split(";")[0].strip()
        if content_type == "application/json-patch+json":
            if not isinstance(req.body, list):
                raise ApiError(400, "BadRequest", "a JSON patch must be a list of operations")
            apply = _apply_json_patch
        elif content_type == "application/merge-patch+json":
            if not isinstance(req.body, dict):
                raise ApiError(400, "BadRequest", "a JSON merge patch must be a JSON object")
            apply = _apply_merge_patch
        else:
            raise ApiError(
                415,
                "UnsupportedMediaType",
                f"the body of the request was in an unknown format - accepted media types include: "
                "application/json-patch+json, application/merge-patch+json (test double: no "
                f"strategic merge or apply patch), got {content_type!r}",
            )
        with self._cond:
            old = self._stored(rtype, namespace, name)
            patched = apply(copy.deepcopy(old), req.body)
        # The patched object goes through the same admission as a PUT (and its CAS check).
        req.body = patched
        new = self._admit(rtype, namespace, req)
        if new["metadata"].get("name") != name:
            raise ApiError(422, "Invalid", "metadata.name: Invalid value: field is immutable")
        with self._cond:
            old = self._stored(rtype, namespace, name)
            self._check_cas(rtype, name, old, new["metadata"].get("resourceVersion"))
            return self._update(rtype, namespace, old, new)

    def _check_cas(
        self, rtype: ResourceType, name: str, old: dict[str, Any], revision: Any
    ) -> None:
        if revision and revision != old["metadata"]["resourceVersion"]:
            raise ApiError(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on {rtype.group_resource} "{name}": the object has '
                "been modified; please apply your changes to the latest version and try again",
                _details(rtype, name),
            )

    def _update(
        self, rtype: ResourceType, namespace: str, old: dict[str, Any], new: dict[str, Any]
    ) -> dict[str, Any]:
        """Store `new` over `old` (lock held). Server-owned metadata comes from `old`."""
        meta = new["metadata"]
        for key in ("uid", "creationTimestamp", "generation", "namespace", *_DELETION_META):
            meta.pop(key, None)
            if key in old["metadata"]:
                meta[key] = old["metadata"][key]
        deleting = "deletionTimestamp" in old["metadata"]
        if deleting and set(meta.get("finalizers") or ()) - set(
            old["metadata"].get("finalizers") or ()
        ):
            raise ApiError(
                422,
                "Invalid",
                f'{rtype.qualified_kind} "{meta["name"]}" is invalid: metadata.finalizers: '
                "Forbidden: no new finalizers can be added if the object is being deleted",
            )
        if rtype is NODES:
            new["status"] = copy.deepcopy(old.get("status", {}))  # status is a subresource
            if not new["status"]:
                del new["status"]
        meta["resourceVersion"] = old["metadata"]["resourceVersion"]
        if new == old:
            return copy.deepcopy(old)  # no-op writes keep the revision and emit no event
        if deleting and not meta.get("finalizers"):
            self._write(rtype, namespace, new, "DELETED", old)  # the last finalizer is gone
            return copy.deepcopy(new)
        if rtype.schema is not None and new.get("spec") != old.get("spec"):
            meta["generation"] = old["metadata"].get("generation", 1) + 1
        self._write(rtype, namespace, new, "MODIFIED", old)
        return copy.deepcopy(new)

    def _delete(
        self, rtype: ResourceType, namespace: str, name: str, options: Any
    ) -> dict[str, Any]:
        preconditions = (options.get("preconditions") if isinstance(options, dict) else None) or {}
        with self._cond:
            old = self._stored(rtype, namespace, name)
            want_rv = preconditions.get("resourceVersion")
            have_rv = old["metadata"]["resourceVersion"]
            want_uid = preconditions.get("uid")
            if want_rv is not None and want_rv != have_rv:
                raise _precondition_failed(rtype, name, "ResourceVersion", want_rv, have_rv)
            if want_uid is not None and want_uid != old["metadata"]["uid"]:
                raise _precondition_failed(rtype, name, "UID", want_uid, old["metadata"]["uid"])
            if old["metadata"].get("finalizers"):
                # Held by a finalizer: marked, still there, gone once the last one is removed.
                if "deletionTimestamp" not in old["metadata"]:
                    marked = copy.deepcopy(old)
                    marked["metadata"].update(
                        deletionTimestamp=_now(), deletionGracePeriodSeconds=0
                    )
                    self._write(rtype, namespace, marked, "MODIFIED", old)
                return copy.deepcopy(self._stored(rtype, namespace, name))
            gone = copy.deepcopy(old)
            self._write(rtype, namespace, gone, "DELETED", old)
        if rtype is PODS:
            return gone
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Success",
            "details": {**_details(rtype, name), "uid": gone["metadata"]["uid"]},
        }

    def _write(
        self, rtype: ResourceType, namespace: str, obj: dict[str, Any], kind: str, old: dict | None
    ) -> None:
        """Bump the global revision, store (or drop) `obj` and log the event. Lock held."""
        self._revision += 1
        obj["metadata"]["resourceVersion"] = str(self._revision)
        key = (namespace, obj["metadata"]["name"])
        stored = self._objects.setdefault(rtype.plural, {})
        if kind == "DELETED":
            del stored[key]
        else:
            stored[key] = obj
        self._events.append(_Event(self._revision, rtype.plural, kind, copy.deepcopy(obj), old))
        self._cond.notify_all()

    def _admit(self, rtype: ResourceType, namespace: str, req: _Request) -> dict[str, Any]:
        """Decode, prune and validate a request body into the object to store."""
        obj = req.body
        if not isinstance(obj, dict):
            raise ApiError(400, "BadRequest", "the request body must be a JSON object")
        if obj.get("apiVersion") != rtype.api_version or obj.get("kind") != rtype.kind:
            raise ApiError(
                400,
                "BadRequest",
                f"the API version/kind in the data ({obj.get('apiVersion')}/{obj.get('kind')}) "
                f"does not match the expected {rtype.api_version}/{rtype.kind}",
            )
        meta = obj.get("metadata")
        if not isinstance(meta, dict):
            raise ApiError(422, "Invalid", "metadata: Required value")
        dropped = [f"metadata.{k}" for k in meta if k not in _OBJECT_META]
        meta = {k: v for k, v in meta.items() if k in _OBJECT_META}
        for key in ("labels", "annotations"):
            value = meta.get(key)
            if value is not None and (
                not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values())
            ):
                raise ApiError(
                    400,
                    "BadRequest",
                    f"json: cannot unmarshal into Go struct field ObjectMeta.metadata.{key} of "
                    "type map[string]string",
                )
            if value == {}:
                del meta[key]  # the real server drops empty maps (omitempty)
        if rtype.namespaced:
            if meta.get("namespace", namespace) != namespace:
                raise ApiError(
                    400,
                    "BadRequest",
                    "the namespace of the object does not match the namespace on the URL",
                )
            meta["namespace"] = namespace
        body = {k: v for k, v in obj.items() if k != "metadata"}
        errors = _validate_meta(meta)
        if rtype.schema is not None:
            # apiVersion, kind and metadata are never pruned; metadata is ObjectMeta (above).
            root = {
                "apiVersion": {"type": "string"},
                "kind": {"type": "string"},
                **{k: v for k, v in rtype.schema.get("properties", {}).items() if k != "metadata"},
            }
            schema = {**rtype.schema, "properties": root}
            body = prune(body, schema, "", dropped)
            errors += validate(body, schema, "")
        else:
            # Core kinds decode into Go structs: unknown top-level fields vanish.
            dropped += [k for k in body if k not in rtype.fields]
            body = {k: v for k, v in body.items() if k in rtype.fields}
        body["metadata"] = meta
        req.warnings += [f'unknown field "{d}"' for d in dropped]
        if rtype is PODS:
            errors += _validate_pod(body)
        if rtype is LEASES:
            errors += _validate_lease(body)
        if rtype is SECRETS:
            errors += _admit_secret(body)
        if errors:
            name = meta.get("name", "")
            text = str(errors[0]) if len(errors) == 1 else "[" + ", ".join(map(str, errors)) + "]"
            causes = [{"reason": e.reason, "message": e.message, "field": e.field} for e in errors]
            raise ApiError(
                422,
                "Invalid",
                f'{rtype.qualified_kind} "{name}" is invalid: {text}',
                {"name": name, "group": rtype.group, "kind": rtype.kind, "causes": causes},
            )
        return copy.deepcopy(body)

    def _watch(
        self, rtype: ResourceType, namespace: str, query: Mapping[str, str]
    ) -> Iterator[bytes]:
        selector = _selector(query)
        timeout_text = query.get("timeoutSeconds")
        try:
            timeout = float(int(timeout_text)) if timeout_text else self.default_watch_timeout
        except ValueError:
            raise ApiError(400, "BadRequest", f"invalid timeoutSeconds {timeout_text!r}") from None
        if self.max_watch_seconds is not None:
            timeout = min(timeout, self.max_watch_seconds)
        bookmarks = self.send_bookmarks and _truthy(query.get("allowWatchBookmarks"))
        since_text = query.get("resourceVersion", "")
        with self._cond:
            if since_text in ("", "0"):
                # "Any"/"most recent": synthetic ADDED events for the current state first.
                since = self._revision
                initial = [
                    _event_line("ADDED", obj)
                    for (ns, _), obj in sorted(self._objects.get(rtype.plural, {}).items())
                    if (not namespace or ns == namespace) and selector.matches(_labels(obj))
                ]
            else:
                try:
                    since = int(since_text)
                except ValueError:
                    raise ApiError(
                        400, "BadRequest", f"invalid resource version {since_text!r}"
                    ) from None
                initial = []
                if since < self._compacted:
                    initial = [
                        _error_line(
                            410, "Expired", f"too old resource version: {since} ({self._compacted})"
                        )
                    ]
                    since = -1
                elif since > self._revision:
                    message = f"Too large resource version: {since}, current: {self._revision}"
                    initial = [_error_line(504, "Timeout", message)]
                    since = -1
        return self._stream(rtype, namespace, selector, since, initial, timeout, bookmarks)

    def _stream(
        self,
        rtype: ResourceType,
        namespace: str,
        selector: LabelSelector,
        since: int,
        initial: list[bytes],
        timeout: float,
        bookmarks: bool,
    ) -> Iterator[bytes]:
        yield from initial
        if since < 0:
            return
        deadline = time.monotonic() + timeout
        last = since
        with self._cond:
            epoch = self._watch_epoch
        while True:
            with self._cond:
                while True:
                    pending = [e for e in self._events if e.revision > last]
                    remaining = deadline - time.monotonic()
                    dropped = self._watch_epoch != epoch
                    if pending or self._stopping or dropped or remaining <= 0:
                        break
                    self._cond.wait(remaining)
                if self._stopping or dropped:
                    return
                # Everything up to here has been looked at: a bookmark may carry this revision.
                last = pending[-1].revision if pending else self._revision
            for event in pending:
                line = _filter_event(event, rtype, namespace, selector)
                if line is not None:
                    yield line
            if time.monotonic() >= deadline:
                if bookmarks:
                    mark = {
                        "kind": rtype.kind,
                        "apiVersion": rtype.api_version,
                        "metadata": {"resourceVersion": str(last)},
                    }
                    yield _event_line("BOOKMARK", mark)
                return


def _filter_event(event: _Event, rtype: ResourceType, namespace: str, selector: LabelSelector):
    """The event as this watcher sees it: label changes move objects in and out of its view."""
    if event.resource != rtype.plural:
        return None
    if namespace and event.obj["metadata"].get("namespace") != namespace:
        return None
    now = selector.matches(_labels(event.obj))
    before = event.old is not None and selector.matches(_labels(event.old))
    match event.type:
        case "ADDED" if now:
            return _event_line("ADDED", event.obj)
        case "DELETED" if before:
            return _event_line("DELETED", event.obj)
        case "MODIFIED" if now and before:
            return _event_line("MODIFIED", event.obj)
        case "MODIFIED" if now:
            return _event_line("ADDED", event.obj)
        case "MODIFIED" if before:
            # The watch cache sends the last state the watcher could see, at the new revision.
            assert event.old is not None
            gone = copy.deepcopy(event.old)
            gone["metadata"]["resourceVersion"] = event.obj["metadata"]["resourceVersion"]
            return _event_line("DELETED", gone)
    return None


_CONTINUE_EXPIRED = (
    "The provided continue parameter is too old to display a consistent list result. You can "
    "start a new list without the continue parameter."
)


def _limit(query: Mapping[str, str]) -> int | None:
    text = query.get("limit")
    if not text or text == "0":  # 0 and absent: no limit
        return None
    try:
        limit = int(text)
    except ValueError:
        raise ApiError(400, "BadRequest", f"invalid limit {text!r}") from None
    return limit if limit > 0 else None


def _continue_token(revision: int, last: tuple[str, str]) -> str:
    text = json.dumps({"v": "meta.k8s.io/v1", "rv": revision, "start": list(last)})
    return base64.urlsafe_b64encode(text.encode()).decode()


def _parse_continue(token: str) -> tuple[int, tuple[str, str]]:
    try:
        data = json.loads(base64.urlsafe_b64decode(token.encode()))
        namespace, name = data["start"]
        return int(data["rv"]), (str(namespace), str(name))
    except (ValueError, TypeError, KeyError):
        raise ApiError(400, "BadRequest", f"continue key is not valid: {token!r}") from None


def _event_line(kind: str, obj: Mapping[str, Any]) -> bytes:
    return json.dumps({"type": kind, "object": obj}, separators=(",", ":")).encode() + b"\n"


def _error_line(code: int, reason: str, message: str) -> bytes:
    return _event_line("ERROR", status_body(code, reason, message))


def _labels(obj: Mapping[str, Any]) -> Mapping[str, str]:
    return obj.get("metadata", {}).get("labels") or {}


def _selector(query: Mapping[str, str]) -> LabelSelector:
    try:
        return parse_selector_text(query.get("labelSelector"), "labelSelector")
    except InvalidInput as e:
        raise ApiError(400, "BadRequest", f"unable to parse requirement: {e.message}") from None


def _details(rtype: ResourceType, name: str) -> dict[str, str]:
    details = {"name": name, "kind": rtype.plural}
    if rtype.group:
        details["group"] = rtype.group
    return details


def _not_served() -> ApiError:
    return ApiError(404, "NotFound", "the server could not find the requested resource", {})


def _precondition_failed(
    rtype: ResourceType, name: str, what: str, want: str, have: str
) -> ApiError:
    return ApiError(
        409,
        "Conflict",
        f'Operation cannot be fulfilled on {rtype.group_resource} "{name}": Precondition failed: '
        f"{what} in precondition: {want}, {what} in object meta: {have}",
        _details(rtype, name),
    )


def _validate_meta(meta: Mapping[str, Any]) -> list[FieldError]:
    errors = []
    name = meta.get("name")
    if not name:
        errors.append(
            FieldError(
                "metadata.name",
                "FieldValueRequired",
                "Required value: name or generateName is required",
            )
        )
    elif not isinstance(name, str) or len(name) > 253 or not _DNS_SUBDOMAIN.match(name):
        errors.append(
            FieldError(
                "metadata.name",
                "FieldValueInvalid",
                f"Invalid value: {_quote(name)}: a lowercase RFC 1123 subdomain must consist of "
                "lower case alphanumeric characters, '-' or '.', and must start and end with an "
                "alphanumeric character (e.g. 'example.com')",
            )
        )
    for key, value in (meta.get("labels") or {}).items():
        if not _qualified_name(key):
            errors.append(_bad_key("metadata.labels", key))
        if len(value) > 63 or not _LABEL_VALUE.match(value):
            message = (
                f"Invalid value: {_quote(value)}: a valid label must be an empty string or consist "
                "of alphanumeric characters, '-', '_' or '.'"
            )
            errors.append(FieldError("metadata.labels", "FieldValueInvalid", message))
    for key in meta.get("annotations") or {}:
        if not _qualified_name(key):
            errors.append(_bad_key("metadata.annotations", key))
    return errors


def _bad_key(where: str, key: str) -> FieldError:
    message = (
        f"Invalid value: {_quote(key)}: name part must consist of alphanumeric characters, "
        "'-', '_' or '.', and must start and end with an alphanumeric character"
    )
    return FieldError(where, "FieldValueInvalid", message)


def _qualified_name(key: str) -> bool:
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix)):
        return False
    return 0 < len(name) <= 63 and bool(_QUALIFIED_NAME.match(name))


def _validate_pod(pod: Mapping[str, Any]) -> list[FieldError]:
    containers = (pod.get("spec") or {}).get("containers")
    if not isinstance(containers, list) or not containers:
        return [FieldError("spec.containers", "FieldValueRequired", "Required value")]
    errors = []
    for i, c in enumerate(containers):
        if not isinstance(c, dict) or not _DNS_LABEL.match(str(c.get("name", ""))):
            errors.append(
                FieldError(f"spec.containers[{i}].name", "FieldValueRequired", "Required value")
            )
        elif not c.get("image"):
            errors.append(
                FieldError(f"spec.containers[{i}].image", "FieldValueRequired", "Required value")
            )
    return errors


# metav1.MicroTime parses RFC3339 with exactly six fractional digits.
_MICRO_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}(Z|[+-]\d{2}:\d{2})$")


def _admit_secret(secret: dict[str, Any]) -> list[FieldError]:
    """Checks `data` (base64 values) and folds `stringData` into it, in place."""
    errors = []
    data = secret.get("data") or {}
    for key, value in data.items():
        try:
            base64.b64decode(value, validate=True)
        except (TypeError, ValueError):
            errors.append(FieldError(f"data[{key}]", "FieldValueInvalid", "illegal base64 data"))
    for key, value in (secret.pop("stringData", None) or {}).items():
        data[key] = base64.b64encode(str(value).encode()).decode()
    if data:
        secret["data"] = data
    return errors


def _validate_lease(lease: Mapping[str, Any]) -> list[FieldError]:
    """What apiserver's Lease validation and JSON decoding reject in a spec."""
    spec = lease.get("spec") or {}
    if not isinstance(spec, dict):
        return [FieldError("spec", "FieldValueInvalid", _type_message("spec", "object", spec))]
    errors = []
    checks = {
        "holderIdentity": str,
        "leaseDurationSeconds": int,
        "leaseTransitions": int,
        "acquireTime": str,
        "renewTime": str,
    }
    for key, expected in checks.items():
        value = spec.get(key)
        path = f"spec.{key}"
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, expected):
            name = "string" if expected is str else "integer"
            errors.append(FieldError(path, "FieldValueInvalid", _type_message(path, name, value)))
        elif key == "leaseDurationSeconds" and value <= 0:
            errors.append(FieldError(path, "FieldValueInvalid", "must be greater than 0"))
        elif key == "leaseTransitions" and value < 0:
            message = "must be greater than or equal to 0"
            errors.append(FieldError(path, "FieldValueInvalid", message))
        elif key.endswith("Time") and not _MICRO_TIME.match(value):
            errors.append(
                FieldError(path, "FieldValueInvalid", f"Invalid value: {_quote(value)}: not a time")
            )
    return errors


def _apply_json_patch(doc: dict[str, Any], ops: list[Any]) -> dict[str, Any]:
    """RFC 6902 add/replace/remove/test on object members and array elements, as the real
    server applies it: to the object as stored, all or nothing, a missing parent is an error."""
    for op in ops:
        if not isinstance(op, dict) or "path" not in op or "op" not in op:
            raise ApiError(400, "BadRequest", f"invalid JSON patch operation {op!r}")
        path = op["path"]
        tokens = [t.replace("~1", "/").replace("~0", "~") for t in path.split("/")[1:]]
        if not tokens:
            raise ApiError(422, "Invalid", "JSON patch on the whole document is not supported")
        parent: Any = doc
        for token in tokens[:-1]:
            parent = _child(parent, token, path)
        last = tokens[-1]
        match op["op"]:
            case "add" if isinstance(parent, list):
                index = len(parent) if last == "-" else _index(parent, last, path, end=True)
                parent.insert(index, copy.deepcopy(op.get("value")))
            case "add":
                _container(parent, path)[last] = copy.deepcopy(op.get("value"))
            case "replace" if isinstance(parent, list):
                parent[_index(parent, last, path)] = copy.deepcopy(op.get("value"))
            case "replace":
                _child(parent, last, path)
                parent[last] = copy.deepcopy(op.get("value"))
            case "remove" if isinstance(parent, list):
                del parent[_index(parent, last, path)]
            case "remove":
                _child(parent, last, path)
                del parent[last]
            case "test":
                if _child(parent, last, path) != op.get("value"):
                    raise ApiError(422, "Invalid", f"testing value {path} failed: test failed")
            case _:
                raise ApiError(
                    400,
                    "BadRequest",
                    f"JSON patch op {op['op']!r} not supported by the test double",
                )
    return doc


def _child(parent: Any, token: str, path: str) -> Any:
    if isinstance(parent, list):
        return parent[_index(parent, token, path)]
    if not isinstance(parent, dict) or token not in parent:
        raise ApiError(422, "Invalid", f"doc is missing path: {path}: missing value")
    return parent[token]


def _container(parent: Any, path: str) -> dict[str, Any]:
    if not isinstance(parent, dict):
        raise ApiError(422, "Invalid", f"doc is missing path: {path}: missing value")
    return parent


def _index(array: list[Any], token: str, path: str, *, end: bool = False) -> int:
    if not token.isdigit() or int(token) > len(array) - (0 if end else 1):
        raise ApiError(422, "Invalid", f"doc is missing path: {path}: invalid index {token!r}")
    return int(token)


def _apply_merge_patch(doc: Any, patch: Any) -> Any:
    """RFC 7386: objects merge key by key, null removes a key, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(doc) if isinstance(doc, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = _apply_merge_patch(out.get(key), value)
    return out


def _json_or_none(raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "kube-api-double/1"
    # Headers and body go out in separate writes: with Nagle on, every response would wait
    # for the client's delayed ACK (~40 ms).
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep test output clean

    def do_GET(self) -> None:
        self._serve()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

    def _serve(self) -> None:
        double: KubeApiDouble = self.server.double  # type: ignore[attr-defined]
        split = urlsplit(self.path)
        query = dict(parse_qsl(split.query, keep_blank_values=True))
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        authorization = self.headers.get("Authorization") or ""
        token = authorization.removeprefix("Bearer ") if authorization.startswith("Bearer ") else ""
        self.record = RecordedRequest(self.command, split.path, query, _json_or_none(raw), token)
        double.requests.append(self.record)
        req = _Request(self.command, split.path, query, self.headers)
        try:
            if not double._accepts(token):
                raise ApiError(401, "Unauthorized", "Unauthorized")
            failure = double._next_failure()
            if failure is not None:
                raise ApiError(
                    failure[0], failure[1], f"injected failure ({failure[0]} {failure[1]})"
                )
            if raw:
                try:
                    req.body = json.loads(raw)
                except ValueError as e:
                    raise ApiError(
                        400, "BadRequest", f"invalid JSON in request body: {e}"
                    ) from None
            result = double.handle(req)
        except ApiError as e:
            self._send_json(e.code, e.body, req.warnings)
            return
        if isinstance(result, tuple):
            self._send_json(*result, req.warnings)
        else:
            self._send_stream(result)

    def _send_json(self, code: int, body: Any, warnings: list[str]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code, HTTPStatus(code).phrase)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for warning in warnings:
            self.send_header("Warning", f'299 - "{warning}"')
        self.end_headers()
        self.wfile.write(data)
        self.record.bytes_sent += len(data)

    def _send_stream(self, lines: Iterator[bytes]) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        try:
            self.end_headers()
            self.wfile.flush()
            for line in lines:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                self.wfile.flush()
                self.record.bytes_sent += len(line)
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except OSError:
            self.close_connection = True  # the client went away mid-watch
