"""Errors of l3fabric, grouped by what the caller should do about them.

L3FabricError
├── InvalidInput          bad input; report it (CLI exit 2, CNI code 7). Names the field.
├── StoreError            the datastore said no
│   ├── NotFound
│   │   └── BeingDeleted  still there but going (a finalizer holds it): treat it as gone
│   ├── AlreadyExists
│   ├── Conflict          stale revision: re-read, re-apply, retry
│   ├── SecretUnreadable  a Secret the caller needs cannot be read (yet)
│   └── StoreUnavailable  transient: retry with backoff, then give up (CNI code 11)
└── IPAMError             IPAM cannot satisfy the request
    ├── PoolExhausted     no free address in any usable pool
    ├── NoUsablePool      no enabled pool selects this node
    ├── InUse             refused because addresses are still allocated
    └── ContentionBudgetExceeded   too many conflicts in a row
"""

from __future__ import annotations


class L3FabricError(Exception):
    """Base of every error l3fabric raises on purpose."""


class InvalidInput(L3FabricError):
    """Input that can never succeed as given. `field` names the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class StoreError(L3FabricError):
    """The datastore refused or failed an operation."""


class NotFound(StoreError):
    def __init__(self, kind: str, name: str) -> None:
        super().__init__(f"{kind} {name!r} not found")
        self.kind = kind
        self.name = name


class BeingDeleted(NotFound):
    """The object is being deleted (held only by a finalizer): it is not written any more, and
    whoever meant to change it treats it as leaving."""

    def __init__(self, kind: str, name: str) -> None:
        StoreError.__init__(self, f"{kind} {name!r} is being deleted")
        self.kind = kind
        self.name = name


class AlreadyExists(StoreError):
    def __init__(self, kind: str, name: str) -> None:
        super().__init__(f"{kind} {name!r} already exists")
        self.kind = kind
        self.name = name


class Conflict(StoreError):
    """The object changed since it was read (its revision is stale)."""

    def __init__(self, kind: str, name: str) -> None:
        super().__init__(f"{kind} {name!r} was modified concurrently (stale revision)")
        self.kind = kind
        self.name = name


class SecretUnreadable(StoreError):
    """Reading Secret `namespace`/`name` failed; `reason` says why in the backend's words."""

    def __init__(self, namespace: str, name: str, reason: str) -> None:
        super().__init__(f"Secret {namespace}/{name} not readable ({reason})")
        self.namespace = namespace
        self.name = name
        self.reason = reason


class StoreUnavailable(StoreError):
    """The datastore cannot be reached or is not answering; worth retrying later."""


class WatchExpired(StoreUnavailable):
    """A watch asked for changes older than the store still keeps (compacted)."""


class IPAMError(L3FabricError):
    """IPAM could not satisfy a request that was itself valid."""


class PoolExhausted(IPAMError):
    pass


class NoUsablePool(IPAMError):
    pass


class InUse(IPAMError):
    pass


class ContentionBudgetExceeded(IPAMError):
    pass
