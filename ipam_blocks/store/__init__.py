"""Store backends behind one contract (see `base`). `open_store` parses a store URL once."""

from __future__ import annotations

import os

from ipam_blocks.errors import InvalidInput
from ipam_blocks.store.base import (
    ALL_KINDS,
    CRD_PLURALS,
    EMBEDDED_ONLY_KINDS,
    EventType,
    Listing,
    Resource,
    Store,
    WatchEvent,
)

DEFAULT_STORE_URL = "sqlite:/var/lib/l3fabric/store.db"
STORE_ENV = "L3FABRIC_STORE"


def default_store_url() -> str:
    return os.environ.get(STORE_ENV) or DEFAULT_STORE_URL


def open_store(url: str | None = None) -> Store:
    """`sqlite:PATH` (embedded), `kube` (in-cluster or ~/.kube/config) or `kube:KUBECONFIG`."""
    url = url or default_store_url()
    scheme, _, rest = url.partition(":")
    if scheme == "sqlite":
        if not rest:
            raise InvalidInput("store", "sqlite store needs a path: sqlite:PATH")
        from ipam_blocks.store.sqlite import SqliteStore

        return SqliteStore(rest)
    if scheme == "kube":
        from ipam_blocks.store.kube import KubeStore

        return KubeStore(kubeconfig=rest or None)
    raise InvalidInput(
        "store", f"unknown store {url!r}; expected sqlite:PATH, kube or kube:KUBECONFIG"
    )


__all__ = [
    "ALL_KINDS",
    "CRD_PLURALS",
    "DEFAULT_STORE_URL",
    "EMBEDDED_ONLY_KINDS",
    "STORE_ENV",
    "EventType",
    "Listing",
    "Resource",
    "Store",
    "WatchEvent",
    "default_store_url",
    "open_store",
]
