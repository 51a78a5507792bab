"""The store contract every backend keeps (DESIGN §3).

Optimistic concurrency: every stored object carries an opaque `revision`.

- `create` fails with `AlreadyExists` if the name is taken.
- `update` writes only if the stored revision still equals `obj.revision`, else `Conflict`.
- `delete` with a revision deletes only at that revision, else `Conflict`; `NotFound` if gone.
- `list` returns the items and the store revision they were read at; `watch(kind, since)`
  yields every change after that revision, so list-then-watch misses nothing.
- `list(..., limit=n)` returns at most n items and a `continue_token` while more remain;
  `list(..., continue_token=t)` returns the next page. Every page of one list is read at the
  first page's revision (`Listing.revision` is the same on each). A token whose revision the
  store has compacted away raises `WatchExpired`: list again from the start.
- `watch(..., selector=s)` yields only changes of objects `s` selects, as the Kubernetes API
  server does: an object that starts matching arrives as ADDED, one that stops matching as
  DELETED (its last matching state), and nothing more is sent about it after that.
- `watch(..., bookmarks=True)` also yields BOOKMARK events carrying only a revision (the
  resource has an empty name): everything of the kind up to it has been seen, so a watch
  resumed from it misses nothing. Every backend sends one at least when a watch ends quietly,
  so a resumed watch starts from a recent revision even after a long quiet period.
- A watch (or continue token) from a revision older than the store keeps raises
  `WatchExpired` (the API server's 410 Gone): list again, watch from the new revision.
- A backend that cannot be reached raises `StoreUnavailable`.

Beyond the stored kinds a backend answers what differs between embedded mode and a cluster, so
callers ask the store instead of testing which backend it is: whether it holds the Workload
records, where GC learns which owners are alive, and the cluster's Secrets and Leases (None
where there are none).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any, Protocol

from ipam_blocks.errors import InvalidInput
from ipam_blocks.lease import LeaseClient
from ipam_blocks.liveness import OwnerLiveness
from ipam_blocks.selector import EVERYTHING, LabelSelector

# Kinds stored as l3fabric.io/v1 custom resources (plural = URL segment, also the CRD name).
CRD_PLURALS: Mapping[str, str] = {
    "IPPool": "ippools",
    "IPAMBlock": "ipamblocks",
    "BlockAffinity": "blockaffinities",
    "IPAMHandle": "ipamhandles",
    "IPAMConfig": "ipamconfigs",
    "BGPConfiguration": "bgpconfigurations",
    "BGPPeer": "bgppeers",
}
# Kinds that in a cluster are core Kubernetes objects, and in the embedded store records of
# their own: Node (labels + l3fabric.io/ annotations) and Workload (a pod the agent attached,
# the embedded stand-in for the Pod API when GC asks whether an owner is alive).
EMBEDDED_ONLY_KINDS = ("Node", "Workload")
ALL_KINDS = (*CRD_PLURALS, *EMBEDDED_ONLY_KINDS)


@dataclass(frozen=True)
class Resource:
    """One stored object. `spec` uses the CRD field names; `revision` is None until stored."""

    kind: str
    name: str
    spec: Mapping[str, Any] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    revision: str | None = None

    def with_spec(self, spec: Mapping[str, Any]) -> Resource:
        return replace(self, spec=spec)


@dataclass(frozen=True)
class Listing:
    items: list[Resource]
    revision: str
    continue_token: str | None = None
    """Set while more items remain: pass it to `list` for the next page."""


class EventType(StrEnum):
    ADDED = "ADDED"
    MODIFIED = "MODIFIED"
    DELETED = "DELETED"
    BOOKMARK = "BOOKMARK"  # progress only: `resource` carries nothing but the revision


@dataclass(frozen=True)
class WatchEvent:
    type: EventType
    resource: Resource

    @staticmethod
    def bookmark(kind: str, revision: str) -> WatchEvent:
        return WatchEvent(EventType.BOOKMARK, Resource(kind, "", revision=revision))


def check_limit(limit: int | None) -> None:
    """A page size is a positive number of items."""
    if limit is not None and (isinstance(limit, bool) or limit < 1):
        raise InvalidInput("limit", f"a page holds at least 1 item, got {limit!r}")


class SecretReader(Protocol):
    def read_secret(self, namespace: str, name: str) -> Mapping[str, bytes]:
        """The Secret's data, decoded; `SecretUnreadable` when it cannot be read."""
        ...


class Store(Protocol):
    """Backend-neutral datastore with compare-and-swap writes."""

    def get(self, kind: str, name: str) -> Resource: ...

    def list(
        self,
        kind: str,
        selector: LabelSelector = EVERYTHING,
        *,
        limit: int | None = None,
        continue_token: str | None = None,
    ) -> Listing:
        """Objects of `kind` that `selector` selects, by name; a page of at most `limit` when
        set, the page after `continue_token` when given (same kind and selector)."""
        ...

    def create(self, obj: Resource) -> Resource: ...

    def update(self, obj: Resource) -> Resource: ...

    def delete(self, kind: str, name: str, revision: str | None = None) -> None: ...

    def watch(
        self,
        kind: str,
        since: str,
        timeout: float,
        *,
        selector: LabelSelector = EVERYTHING,
        bookmarks: bool = False,
    ) -> Iterator[WatchEvent]:
        """Changes of `kind` after revision `since` that `selector` selects, until `timeout`
        seconds pass without one; BOOKMARK events too when `bookmarks` is set."""
        ...

    def close(self) -> None: ...

    @property
    def holds_workloads(self) -> bool:
        """True when Workload records are stored here (embedded mode); a cluster's store has
        none, its pods are the workloads."""
        ...

    def owner_liveness(self) -> OwnerLiveness:
        """Which owners of allocations are alive: the Pod API, or the Workload records."""
        ...

    def secrets(self) -> SecretReader | None:
        """The cluster's Secrets; None in embedded mode."""
        ...

    def lease(self, namespace: str, name: str) -> LeaseClient | None:
        """Lease `namespace`/`name`, for leader election; None in embedded mode."""
        ...
