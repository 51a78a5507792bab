"""Label a node's IPAM objects written before IPAM labelled them (`model.NODE_LABEL`).

An agent watches only its own node's IPAMBlocks, BlockAffinities and IPAMHandles, by that
label; objects from an older release lack it and would stay invisible. The agent calls
`label_node_objects` at startup: it lists only unlabelled objects (nothing, once a cluster
is labelled), and labels those of this node: blocks affine to it, its affinities, and the
handles whose addresses were allocated for it (which blocks' attributes tell).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace

from ipam_blocks.errors import NotFound
from ipam_blocks.model import NODE_LABEL, parse_block
from ipam_blocks.retry import retry_conflicts
from ipam_blocks.selector import LabelSelector, Operator, Requirement
from ipam_blocks.store.base import Resource, Store

log = logging.getLogger("l3fabric.ipam")

UNLABELLED = LabelSelector(match_expressions=(Requirement(NODE_LABEL, Operator.DOES_NOT_EXIST),))


def label_node_objects(store: Store, node: str) -> int:
    """Label `node`'s unlabelled IPAM objects; the number labelled. Idempotent; each label is
    a CAS write of the object as read, retried on conflict."""
    labelled = 0
    for res in store.list("IPAMBlock", UNLABELLED).items:
        if res.spec.get("affinity") == f"host:{node}":
            labelled += _label(store, res, node, lambda r: r.spec.get("affinity") == f"host:{node}")
    for res in store.list("BlockAffinity", UNLABELLED).items:
        if res.spec.get("node") == node:
            labelled += _label(store, res, node, lambda r: r.spec.get("node") == node)
    handles = store.list("IPAMHandle", UNLABELLED).items
    if handles:
        mine = _handles_allocated_for(store, node)
        for res in handles:
            if res.spec.get("handleID") in mine:
                labelled += _label(store, res, node, lambda r: True)
    if labelled:
        log.info("labelled node objects", extra={"op": "label", "node": node, "count": labelled})
    return labelled


def _handles_allocated_for(store: Store, node: str) -> set[str]:
    """Handle ids with addresses allocated for `node`, in any block (borrowed ones too)."""
    return {
        a.handle_id
        for blk in map(parse_block, store.list("IPAMBlock").items)
        for a in blk.attributes
        if a.node == node
    }


def _label(store: Store, res: Resource, node: str, still_mine: Callable[[Resource], bool]) -> int:
    """1 when this call labelled the object; 0 when it is gone, labelled meanwhile or no
    longer this node's (each retry re-reads it)."""

    def attempt() -> int:
        try:
            current = store.get(res.kind, res.name)
        except NotFound:
            return 0
        if NODE_LABEL in current.labels or not still_mine(current):
            return 0
        store.update(replace(current, labels={**current.labels, NODE_LABEL: node}))
        return 1

    return retry_conflicts(attempt, f"label {res.kind} {res.name}")
