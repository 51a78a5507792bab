"""Finding the stored object of one exact handle id.

IPAMHandles and Workload records are named after their handle (`model.handle_name`), but a
name is only where to look: the object belongs to the handle its spec's `handleID` names,
compared exactly. So an id that differs only in case, or that spells another handle's
derived name, never reads, counts on or releases another attachment's object.
"""

from __future__ import annotations

from ipam_blocks.errors import InvalidInput, NotFound
from ipam_blocks.model import handle_name, handle_names
from ipam_blocks.store.base import Resource, Store


def find_by_handle(store: Store, kind: str, handle_id: str) -> Resource | None:
    """The `kind` object (IPAMHandle or Workload) of exactly `handle_id`, or None."""
    for name in handle_names(handle_id):
        try:
            res = store.get(kind, name)
        except NotFound:
            continue
        if res.spec.get("handleID") == handle_id:
            return res
    return None


def name_taken(store: Store, kind: str, handle_id: str) -> InvalidInput:
    """The error for a create of `handle_id`'s object whose name another handle holds."""
    name = handle_name(handle_id)
    try:
        holder = store.get(kind, name).spec.get("handleID")
    except NotFound:
        holder = "another handle"
    return InvalidInput(
        "handle",
        f"{handle_id!r}: the {kind} name {name!r} is held by handle {holder!r}; "
        "handles are never shared",
    )
