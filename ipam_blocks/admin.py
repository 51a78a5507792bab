"""Operator actions on addresses and settings (the `ipam` verbs): assign an address with its
workload record, release by handle or by address, change the cluster-wide IPAMConfig.

Input arrives parsed (`ManualAssignment`, spec changes already validated); what is checked
here needs the store: the node exists, the pool exists and holds the address.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from netaddr import IPAddress

from ipam_blocks import pools as poolops
from ipam_blocks.allocator import IPAM, AssignRequest
from ipam_blocks.errors import AlreadyExists, Conflict, InvalidInput
from ipam_blocks.handles import find_by_handle
from ipam_blocks.model import (
    IPAM_CONFIG_NAME,
    AllocationType,
    IPAMConfig,
    Workload,
    parse_ipam_config,
    render_ipam_config,
)
from ipam_blocks.retry import retry_conflicts


@dataclass(frozen=True)
class ManualAssignment:
    """An address asked for by hand. `pod` empty: a manual allocation no pod owns."""

    node: str
    handle_id: str
    pod: str
    namespace: str
    ip: IPAddress | None
    """This exact address; None: the next free one."""
    pool: str | None
    """Only from the pool of this name; None: any pool the node may use."""
    version: int


def assign(ipam: IPAM, req: ManualAssignment) -> list[IPAddress]:
    """Allocate; an unknown node or pool is refused before anything is written."""
    ipam.node(req.node)
    _check_pool_choice(ipam, req)
    with _workload_recorded(ipam, req):
        return _allocate(ipam, req)


def _check_pool_choice(ipam: IPAM, req: ManualAssignment) -> None:
    if req.pool is None:
        return
    pool = next((p for p in ipam.pools() if p.name == req.pool), None)
    if pool is None:
        raise InvalidInput("pool", f"unknown pool {req.pool!r}")
    if req.ip is not None and req.ip not in pool.cidr:
        raise InvalidInput("ip", f"{req.ip} is not in pool {pool.name} ({pool.cidr})")


@contextmanager
def _workload_recorded(ipam: IPAM, req: ManualAssignment) -> Iterator[None]:
    """Record the pod as alive before allocating (embedded mode), so a GC running meanwhile
    never sees the new allocation as ownerless; forget it again if the allocation fails."""
    if not req.pod or not ipam.store.holds_workloads:
        yield
        return
    workload = Workload(req.handle_id, req.node, req.namespace, req.pod)
    # A repeated assign for a live workload leaves its record alone.
    created = find_by_handle(ipam.store, "Workload", req.handle_id) is None
    if created:
        poolops.record_workload(ipam, workload)
    try:
        yield
    except BaseException:
        if created:
            poolops.forget_workload(ipam, req.handle_id)
        raise


def _allocate(ipam: IPAM, req: ManualAssignment) -> list[IPAddress]:
    kind = AllocationType.POD if req.pod else AllocationType.MANUAL
    if req.ip is not None:
        ip = ipam.assign_ip(
            req.ip, req.node, req.handle_id, pod=req.pod, namespace=req.namespace, type=kind
        )
        return [ip]
    return ipam.auto_assign(
        AssignRequest(
            node=req.node,
            handle_id=req.handle_id,
            version=req.version,
            pod=req.pod,
            namespace=req.namespace,
            type=kind,
            pools=(req.pool,) if req.pool else (),
        )
    )


def release_handle(ipam: IPAM, handle_id: str) -> list[IPAddress]:
    """Release every address of a handle, and its workload record (embedded mode)."""
    if find_by_handle(ipam.store, "IPAMHandle", handle_id) is None:
        raise InvalidInput("handle", f"unknown handle {handle_id!r} (ids are case-sensitive)")
    released = ipam.release_handle(handle_id)
    if ipam.store.holds_workloads:
        poolops.forget_workload(ipam, handle_id)
    return released


def release_ip(ipam: IPAM, ip: IPAddress) -> list[IPAddress]:
    held = ipam.holder_of(ip)
    if held is None:
        raise InvalidInput("ip", f"{ip} is not allocated")
    _, holder, sequence = held
    # Released at the sequence number and handle just read: never frees an address that was
    # handed out again meanwhile (a recreated block restarts its sequence numbers).
    released = ipam.release_ips(
        {ip: sequence if sequence >= 0 else None}, handles={ip: holder.handle_id}
    )
    if not released:
        raise InvalidInput("ip", f"{ip} is not allocated (released concurrently)")
    return released


def apply_config(ipam: IPAM, changes: Mapping[str, Any]) -> IPAMConfig:
    """Create or CAS-update the `default` IPAMConfig with `changes` (IPAMConfig spec fields);
    an unchanged config is not rewritten."""

    def attempt() -> IPAMConfig:
        current = ipam.config()
        res = render_ipam_config(current)
        wanted = parse_ipam_config(res.with_spec({**res.spec, **changes}))
        if wanted == current and current.revision is not None:
            return current
        if current.revision is None:
            try:
                return parse_ipam_config(ipam.store.create(render_ipam_config(wanted)))
            except AlreadyExists:
                raise Conflict("IPAMConfig", IPAM_CONFIG_NAME) from None
        return parse_ipam_config(ipam.store.update(render_ipam_config(wanted)))

    return retry_conflicts(attempt, "ipam config")
