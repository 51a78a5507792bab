"""`SecretReader` on core Secrets (the BGP passwords of BGPPeers)."""

from __future__ import annotations

import base64
from collections.abc import Mapping

import urllib3
from kubernetes.client.exceptions import ApiException

from ipam_blocks.errors import SecretUnreadable
from ipam_blocks.store.kube.api import KubeApi


class KubeSecretReader:
    def __init__(self, api: KubeApi) -> None:
        self._api = api

    def read_secret(self, namespace: str, name: str) -> Mapping[str, bytes]:
        """The Secret's data, decoded; `SecretUnreadable` names the HTTP status, else the
        kind of connection failure."""
        try:
            raw = self._api.call(self._api.core.read_namespaced_secret, name, namespace)
        except ApiException as e:
            raise SecretUnreadable(namespace, name, str(e.status or type(e).__name__)) from e
        except urllib3.exceptions.HTTPError as e:
            raise SecretUnreadable(namespace, name, type(e).__name__) from e
        data = raw.get("data") or {}
        return {key: base64.b64decode(value) for key, value in data.items()}
