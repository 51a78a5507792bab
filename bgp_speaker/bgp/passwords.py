"""BGP (TCP MD5) passwords of BGPPeers: a key of a Kubernetes Secret, or a file.

- `password.secretKeyRef {name, key}`: the Secret lives in the agent's own namespace
  (`POD_NAMESPACE`, set by the chart; else the service account's namespace file). Only the
  Kubernetes store can read Secrets; the embedded store has none.
- `password.file`: a file on the node (embedded mode, labs, tests); one trailing newline is
  ignored, so `echo secret > file` works.

A password that cannot be read makes its peer's sessions wait (logged, never with the
password in it): a session configured without the password would only be refused by the
peer, or worse, come up unauthenticated against a peer that has none.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any

from bgp_speaker.bgp.config import PasswordRef
from ipam_blocks.errors import L3FabricError

__all__ = ["PasswordUnavailable", "resolve_password"]

SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
MAX_BYTES = 80  # RFC 2385 / Linux TCP_MD5SIG_MAXKEYLEN


class PasswordUnavailable(L3FabricError):
    """The password of a BGPPeer cannot be read (yet)."""


def _namespace() -> str:
    namespace = os.environ.get("POD_NAMESPACE")
    if namespace:
        return namespace
    try:
        return SERVICE_ACCOUNT_NAMESPACE.read_text().strip()
    except OSError:
        raise PasswordUnavailable(
            "secretKeyRef: POD_NAMESPACE is not set and there is no service account namespace"
        ) from None


def resolve_password(ref: PasswordRef, store: Any, where: str) -> str:
    """The password `ref` names. `store` is the agent's store (a KubeStore reads Secrets)."""
    if ref.file:
        try:
            text = Path(ref.file).read_text()
        except OSError as err:
            raise PasswordUnavailable(
                f"{where}.password.file: cannot read {ref.file}: {err.strerror or err}"
            ) from None
        password = text.removesuffix("\n")
    elif ref.secret_name and ref.secret_key:
        core = getattr(store, "core", None)
        if core is None:
            raise PasswordUnavailable(
                f"{where}.password.secretKeyRef: the embedded store has no Secrets "
                "(use password.file)"
            )
        namespace = _namespace()
        try:
            secret = core.read_namespaced_secret(ref.secret_name, namespace)
        except Exception as err:  # ApiException, connection errors: all mean "not now"
            status = getattr(err, "status", None)
            raise PasswordUnavailable(
                f"{where}.password.secretKeyRef: Secret {namespace}/{ref.secret_name} "
                f"not readable ({status or type(err).__name__})"
            ) from None
        data = (secret.data or {}).get(ref.secret_key)
        if data is None:
            raise PasswordUnavailable(
                f"{where}.password.secretKeyRef: Secret {namespace}/{ref.secret_name} "
                f"has no key {ref.secret_key!r}"
            )
        password = base64.b64decode(data).decode()
    else:
        raise PasswordUnavailable(f"{where}.password: set secretKeyRef or file")
    if not password:
        raise PasswordUnavailable(f"{where}.password: empty")
    if len(password.encode()) > MAX_BYTES:
        raise PasswordUnavailable(f"{where}.password: longer than {MAX_BYTES} bytes")
    return password
