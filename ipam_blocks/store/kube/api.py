"""One connection to the Kubernetes API, shared by the kube backend's modules.

Requests ask for the raw body and decode the JSON here (`KubeApi.call`): the client's typed
models reject fields newer than themselves, and re-render some values (timestamps) on the way
out. API and HTTP failures become store errors in one place (`KubeApi.translate`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import urllib3
from kubernetes import client, config
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
from ipam_blocks.store.base import CRD_PLURALS

GROUP = "l3fabric.io"
VERSION = "v1"
API_VERSION = f"{GROUP}/{VERSION}"

CONNECT_TIMEOUT = 5.0
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


class KubeApi:
    """The client, its API groups, and how every request is made and its failures named."""

    def __init__(self, kubeconfig: str | None, request_timeout: float) -> None:
        self.api_client = _load_api_client(kubeconfig)
        self.core = client.CoreV1Api(self.api_client)
        self.custom = client.CustomObjectsApi(self.api_client)
        self.where: str = self.api_client.configuration.host
        self.timeout = (CONNECT_TIMEOUT, request_timeout)

    def call(
        self,
        func: Callable[..., Any],
        *args: Any,
        timeout: tuple[float, float] | None = None,
        **kwargs: Any,
    ) -> Any:
        """One request; the JSON-decoded body (`{}` when there is none)."""
        response = func(
            *args, _preload_content=False, _request_timeout=timeout or self.timeout, **kwargs
        )
        try:
            data = response.data
        finally:
            response.release_conn()
        return json.loads(data) if data else {}

    @contextmanager
    def translate(
        self,
        kind: str,
        name: str,
        *,
        creating: bool = False,
        watching: str | None = None,
        continuing: bool = False,
    ) -> Iterator[None]:
        """The one place where client and HTTP failures become store errors. `watching`: the
        revision a watch started from; `continuing`: the request continues a paged list."""
        try:
            yield
        except ApiException as e:
            raise _store_error(e, kind, name, self.where, creating, watching, continuing) from e
        except urllib3.exceptions.HTTPError as e:
            raise self.unreachable(e) from e

    def unreachable(self, e: urllib3.exceptions.HTTPError) -> StoreUnavailable:
        return StoreUnavailable(f"Kubernetes API at {self.where} unreachable: {_reason(e)}")

    def close(self) -> None:
        self.api_client.close()


def _status(e: ApiException) -> dict[str, Any]:
    try:
        body = json.loads(e.body or "")
    except (TypeError, ValueError):
        return {}
    return body if isinstance(body, dict) and body.get("kind") == "Status" else {}


def _store_error(
    e: ApiException,
    kind: str,
    name: str,
    where: str,
    creating: bool,
    watching: str | None,
    continuing: bool = False,
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
    if code == 410 and continuing:
        return WatchExpired(f"the continued list of {kind} expired: {message}; list again")
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
