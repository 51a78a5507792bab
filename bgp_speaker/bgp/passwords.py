"""BGP (TCP MD5) passwords of BGPPeers: a key of a Kubernetes Secret, or a file.

- `password.secretKeyRef {name, key}`: the Secret lives in the agent's own namespace
  (`POD_NAMESPACE`, set by the chart; else the service account's namespace file), read
  through the store's `SecretReader`; the embedded store has no Secrets.
- `password.file`: a file on the node (embedded mode, labs, tests); one trailing newline is
  ignored, so `echo secret > file` works.

A password that cannot be read makes its peer's sessions wait (logged, never with the
password in it): a session configured without the password would only be refused by the
peer, or worse, come up unauthenticated against a peer that has none.
"""

from __future__ import annotations

import os
from pathlib import Path

from bgp_speaker.bgp.config import PasswordRef
from ipam_blocks.errors import L3FabricError, SecretUnreadable
from ipam_blocks.store.base import Store

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


def resolve_password(ref: PasswordRef, store: Store, where: str) -> str:
    """The password `ref` names. `store` is the agent's store (Secrets come from it)."""
    if ref.file:
        try:
            text = Path(ref.file).read_text()
        except OSError as err:
            raise PasswordUnavailable(
                f"{where}.password.file: cannot read {ref.file}: {err.strerror or err}"
            ) from None
        password = text.removesuffix("\n")
    elif ref.secret_name and ref.secret_key:
        password = _from_secret(ref.secret_name, ref.secret_key, store, where)
    else:
        raise PasswordUnavailable(f"{where}.password: set secretKeyRef or file")
    if not password:
        raise PasswordUnavailable(f"{where}.password: empty")
    if len(password.encode()) > MAX_BYTES:
        raise PasswordUnavailable(f"{where}.password: longer than {MAX_BYTES} bytes")
    return password


def _from_secret(name: str, key: str, store: Store, where: str) -> str:
    secrets = store.secrets()
    if secrets is None:
        raise PasswordUnavailable(
            f"{where}.password.secretKeyRef: the embedded store has no Secrets (use password.file)"
        )
    namespace = _namespace()
    try:
        data = secrets.read_secret(namespace, name)
    except SecretUnreadable as err:
        raise PasswordUnavailable(f"{where}.password.secretKeyRef: {err}") from None
    value = data.get(key)
    if value is None:
        raise PasswordUnavailable(
            f"{where}.password.secretKeyRef: Secret {namespace}/{name} has no key {key!r}"
        )
    return value.decode()
