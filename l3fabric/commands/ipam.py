"""The `pool`, `node` and `ipam` verbs of the l3fabric CLI (DESIGN §2, §4).

Flags are turned into the Resource a CRD would be and parsed by `model`, so CLI and CRD input
share one validator and errors name the CRD field (`cidr`, `blockSize`, `nodeSelector`).
Input is parsed before the store is opened: bad input never writes anything.

The renderers (`render_*`, `describe_ip`) are pure functions of model values, public for other
front ends; `l3fabric.lab.demo` runs these verbs in-process and so prints through them as well.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any

from netaddr import IPAddress
from rich.console import RenderableType
from rich.table import Table

from ipam_blocks import block as blockmath
from ipam_blocks import pools as poolops
from ipam_blocks.allocator import IPAM, AssignRequest
from ipam_blocks.check import CheckReport, HandleMismatch, Leak, check
from ipam_blocks.errors import AlreadyExists, Conflict, InvalidInput, NotFound
from ipam_blocks.gc import GCResult, collect_garbage
from ipam_blocks.liveness import WorkloadRecordLiveness, liveness_for
from ipam_blocks.model import (
    IPAM_CONFIG_NAME,
    AllocationType,
    Block,
    IPAMConfig,
    IPPool,
    Node,
    Workload,
    check_object_name,
    handle_name,
    parse_handle,
    parse_ip,
    parse_ipam_config,
    parse_node,
    parse_pool,
    render_ipam_config,
)
from ipam_blocks.retry import retry_conflicts
from ipam_blocks.selector import parse_labels, parse_selector_text
from ipam_blocks.store import Resource, open_store
from l3fabric.console import EXIT_FAILED, EXIT_OK, make_console, verb_group

DEFAULT_GC_GRACE = 900.0
DEFAULT_GC_INTERVAL = 60.0
DEFAULT_GC_LEASE = "l3fabric-ipam-gc"
DEFAULT_NAMESPACE = "default"


# --- wiring ----------------------------------------------------------------------------------


def register(subparsers: argparse._SubParsersAction) -> None:
    _register_pool(verb_group(subparsers, "pool", "IP pools that pod addresses come from"))
    _register_node(verb_group(subparsers, "node", "nodes of the fabric"))
    _register_ipam(verb_group(subparsers, "ipam", "block IPAM: addresses, usage, repair"))


def _register_pool(verbs: argparse._SubParsersAction) -> None:
    add = verbs.add_parser("add", help="create a pool", description="Create an IP pool.")
    add.add_argument("name")
    add.add_argument("--cidr", required=True, help="e.g. 10.244.0.0/16")
    add.add_argument("--block-size", metavar="N", help="prefix length of blocks (26 / 122)")
    add.add_argument("--ipip-mode", metavar="M", help="Never | Always | CrossSubnet")
    add.add_argument("--vxlan-mode", metavar="M", help="Never | Always | CrossSubnet")
    add.add_argument("--nat-outgoing", action="store_true", help="masquerade pod egress")
    add.add_argument(
        "--node-selector", metavar="EXPR", help="nodes that use the pool, e.g. 'rack in (r1,r2)'"
    )
    add.add_argument("--disabled", action="store_true", help="no new addresses from this pool")
    add.set_defaults(handler=_pool_add)

    lst = verbs.add_parser("list", help="list pools")
    lst.set_defaults(handler=_pool_list)

    delete = verbs.add_parser("delete", help="delete a pool (refused while addresses are used)")
    delete.add_argument("name")
    delete.set_defaults(handler=_pool_delete)


def _register_node(verbs: argparse._SubParsersAction) -> None:
    add = verbs.add_parser("add", help="record a node (embedded store)")
    add.add_argument("name")
    add.add_argument("--label", action="append", metavar="K=V", help="repeatable")
    add.add_argument("--ipv4", metavar="A.B.C.D/NN", help="node address with prefix length")
    add.add_argument("--asn", metavar="N", help="the node's BGP AS number")
    add.set_defaults(handler=_node_add)

    lst = verbs.add_parser("list", help="list nodes")
    lst.set_defaults(handler=_node_list)


def _register_ipam(verbs: argparse._SubParsersAction) -> None:
    assign = verbs.add_parser("assign", help="allocate an address and print it")
    assign.add_argument("--node", required=True)
    assign.add_argument("--handle", required=True, help="allocation handle id")
    assign.add_argument("--pod", help="owning pod (its liveness decides GC)")
    assign.add_argument("--namespace", help=f"the pod's namespace (default: {DEFAULT_NAMESPACE})")
    assign.add_argument("--ip", help="this exact address")
    assign.add_argument("--pool", metavar="NAME", help="only from this pool")
    assign.add_argument("--ipv6", action="store_true", help="an IPv6 address")
    assign.set_defaults(handler=_ipam_assign)

    release = verbs.add_parser("release", help="release by handle or by address")
    which = release.add_mutually_exclusive_group(required=True)
    which.add_argument("--handle")
    which.add_argument("--ip")
    release.set_defaults(handler=_ipam_release)

    show = verbs.add_parser("show", help="pool usage, blocks, borrowed addresses, one address")
    show.add_argument("--show-blocks", action="store_true", help="usage per block")
    show.add_argument("--show-borrowed", action="store_true", help="addresses used off-node")
    show.add_argument("--ip", help="who holds this address")
    show.set_defaults(handler=_ipam_show)

    chk = verbs.add_parser("check", help="report leaks and inconsistencies (exit 1 if any)")
    chk.add_argument("-o", "--output", choices=("text", "json"), default="text")
    chk.set_defaults(handler=_ipam_check)

    gc = verbs.add_parser("gc", help="release leaked addresses and settle leftovers")
    gc.add_argument(
        "--grace",
        metavar="SECONDS",
        default=str(DEFAULT_GC_GRACE),
        help=f"only touch leaks older than this (default: {DEFAULT_GC_GRACE:g})",
    )
    _register_gc_controller_options(gc)
    gc.set_defaults(handler=_ipam_gc)

    cfg = verbs.add_parser("config", help="show or set cluster-wide IPAM settings")
    cfg.add_argument("--strict-affinity", metavar="true|false", help="forbid borrowing")
    cfg.add_argument("--max-blocks-per-host", metavar="N", help="0 = unlimited")
    cfg.set_defaults(handler=_ipam_config)


@contextmanager
def _opened(args: argparse.Namespace) -> Iterator[IPAM]:
    store = open_store(args.store)
    try:
        yield IPAM(store)
    finally:
        store.close()


def _is_embedded(ipam: IPAM) -> bool:
    """True when Workload records, not the Pod API, tell GC which owners are alive."""
    return isinstance(liveness_for(ipam.store), WorkloadRecordLiveness)


# --- turning flag text into spec values --------------------------------------------------------


def _int_or_text(text: str | None) -> int | str | None:
    """Digits become an int; anything else is passed on for `model` to reject by field name."""
    try:
        return None if text is None else int(text)
    except ValueError:
        return text


def _bool_or_text(text: str | None) -> bool | str | None:
    return {"true": True, "false": False}.get(text.lower(), text) if text is not None else None


def _without_none(spec: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in spec.items() if v is not None}


# --- pool ------------------------------------------------------------------------------------


def parse_pool_args(args: argparse.Namespace) -> IPPool:
    """`pool add` flags -> the IPPool spec a CRD would hold -> `model.parse_pool`."""
    spec = _without_none(
        {
            "cidr": args.cidr,
            "blockSize": _int_or_text(args.block_size),
            "ipipMode": args.ipip_mode,
            "vxlanMode": args.vxlan_mode,
            "natOutgoing": args.nat_outgoing or None,
            "disabled": args.disabled or None,
        }
    )
    if args.node_selector is not None:
        selector = parse_selector_text(args.node_selector, "nodeSelector")
        spec["nodeSelector"] = selector.to_dict()
    return parse_pool(Resource("IPPool", args.name, spec))


def _pool_add(args: argparse.Namespace) -> int:
    pool = parse_pool_args(args)
    with _opened(args) as ipam:
        poolops.add_pool(ipam, pool)
    print(f"pool {pool.name} added: {pool.cidr} in /{pool.block_size} blocks")
    return EXIT_OK


def _pool_list(args: argparse.Namespace) -> int:
    with _opened(args) as ipam:
        pools = ipam.pools()
    make_console().print(render_pools(pools))
    return EXIT_OK


def _pool_delete(args: argparse.Namespace) -> int:
    with _opened(args) as ipam:
        poolops.delete_pool(ipam, args.name)
    print(f"pool {args.name} deleted")
    return EXIT_OK


def _table(title: str, left: Sequence[str], right: Sequence[str] = ()) -> Table:
    """A table whose text columns are left-aligned and number columns right-aligned."""
    table = Table(title=title)
    for column in left:
        table.add_column(column, no_wrap=True)
    for column in right:
        table.add_column(column, no_wrap=True, justify="right")
    return table


def render_pools(pools: Sequence[IPPool]) -> Table:
    table = _table(
        "pools", ("NAME", "CIDR", "BLOCK", "IPIP", "VXLAN", "NAT", "DISABLED", "NODE SELECTOR")
    )
    for p in pools:
        table.add_row(
            p.name,
            str(p.cidr),
            f"/{p.block_size}",
            p.ipip_mode.value,
            p.vxlan_mode.value,
            _yes_no(p.nat_outgoing),
            _yes_no(p.disabled),
            str(p.node_selector),
        )
    if not pools:
        table.caption = "no pools"
    return table


def _yes_no(value: bool) -> str:
    return "yes" if value else "no"


# --- node ------------------------------------------------------------------------------------


def parse_node_args(args: argparse.Namespace) -> Node:
    """`node add` flags -> the Node record the store holds -> `model.parse_node`."""
    check_object_name(args.name, "name")
    labels = parse_labels(args.label, "label")
    spec = _without_none({"ipv4Address": args.ipv4, "asNumber": _int_or_text(args.asn)})
    return parse_node(Resource("Node", args.name, spec, labels))


def _node_add(args: argparse.Namespace) -> int:
    node = parse_node_args(args)
    with _opened(args) as ipam:
        poolops.add_node(ipam, node)
    print(f"node {node.name} added")
    return EXIT_OK


def _node_list(args: argparse.Namespace) -> int:
    with _opened(args) as ipam:
        nodes = [parse_node(r) for r in ipam.store.list("Node").items]
        blocks = ipam.blocks()
    make_console().print(render_nodes(nodes, blocks))
    return EXIT_OK


def render_nodes(nodes: Sequence[Node], blocks: Sequence[Block]) -> Table:
    table = _table("nodes", ("NAME", "LABELS", "IPV4"), ("ASN", "BLOCKS"))
    for n in nodes:
        table.add_row(
            n.name,
            ",".join(f"{k}={v}" for k, v in sorted(n.labels.items())) or "-",
            str(n.ipv4_address) if n.ipv4_address else "-",
            str(n.as_number) if n.as_number is not None else "-",
            str(sum(1 for b in blocks if b.affinity == n.name)),
        )
    if not nodes:
        table.caption = "no nodes"
    return table


# --- ipam assign / release -------------------------------------------------------------------


@dataclass(frozen=True)
class _AssignArgs:
    node: str
    handle_id: str
    pod: str
    namespace: str
    ip: IPAddress | None
    pool: str | None
    version: int


def _parse_assign_args(args: argparse.Namespace) -> _AssignArgs:
    handle_name(args.handle)
    if args.namespace is not None and args.pod is None:
        raise InvalidInput("namespace", "--namespace needs --pod")
    namespace = (args.namespace or DEFAULT_NAMESPACE) if args.pod is not None else ""
    if args.pod is not None:
        check_object_name(args.pod, "pod")
        check_object_name(namespace, "namespace")
    ip = parse_ip(args.ip, "ip") if args.ip is not None else None
    if ip is not None and args.ipv6 and ip.version != 6:
        raise InvalidInput("ip", f"{ip} is not an IPv6 address (--ipv6 given)")
    version = ip.version if ip is not None else 6 if args.ipv6 else 4
    return _AssignArgs(args.node, args.handle, args.pod or "", namespace, ip, args.pool, version)


def _check_pool_choice(ipam: IPAM, req: _AssignArgs) -> None:
    if req.pool is None:
        return
    pool = next((p for p in ipam.pools() if p.name == req.pool), None)
    if pool is None:
        raise InvalidInput("pool", f"unknown pool {req.pool!r}")
    if req.ip is not None and req.ip not in pool.cidr:
        raise InvalidInput("ip", f"{req.ip} is not in pool {pool.name} ({pool.cidr})")


@contextmanager
def _workload_recorded(ipam: IPAM, req: _AssignArgs) -> Iterator[None]:
    """Record the pod as alive before allocating (embedded mode), so a GC running meanwhile
    never sees the new allocation as ownerless; forget it again if the allocation fails."""
    if not req.pod or not _is_embedded(ipam):
        yield
        return
    workload = Workload(req.handle_id, req.node, req.namespace, req.pod)
    try:
        ipam.store.get("Workload", workload.name)
        created = False  # a repeated assign for a live workload: leave its record alone
    except NotFound:
        poolops.record_workload(ipam, workload)
        created = True
    try:
        yield
    except BaseException:
        if created:
            poolops.forget_workload(ipam, req.handle_id)
        raise


def _assign(ipam: IPAM, req: _AssignArgs) -> list[IPAddress]:
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


def _ipam_assign(args: argparse.Namespace) -> int:
    req = _parse_assign_args(args)
    with _opened(args) as ipam:
        ipam.node(req.node)  # an unknown node is refused before anything is written
        _check_pool_choice(ipam, req)
        with _workload_recorded(ipam, req):
            ips = _assign(ipam, req)
    for ip in ips:
        print(ip)
    return EXIT_OK


def _release_handle(ipam: IPAM, handle_id: str) -> list[IPAddress]:
    try:
        handle = parse_handle(ipam.store.get("IPAMHandle", handle_name(handle_id)))
    except NotFound:
        raise InvalidInput("handle", f"unknown handle {handle_id!r}") from None
    # The stored id, not the typed one: names are lowercased, allocations keep the case.
    released = ipam.release_handle(handle.handle_id)
    if _is_embedded(ipam):
        poolops.forget_workload(ipam, handle.handle_id)
    return released


def _release_ip(ipam: IPAM, ip: IPAddress) -> list[IPAddress]:
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


def _ipam_release(args: argparse.Namespace) -> int:
    ip = parse_ip(args.ip, "ip") if args.ip is not None else None
    if args.handle is not None:
        handle_name(args.handle)
    with _opened(args) as ipam:
        released = _release_ip(ipam, ip) if ip is not None else _release_handle(ipam, args.handle)
    for each in released:
        print(f"released {each}")
    return EXIT_OK


# --- ipam show -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Usage:
    total: int
    in_use: int

    @property
    def free(self) -> int:
        return self.total - self.in_use

    @property
    def percent(self) -> str:
        return f"{100 * self.in_use / self.total:.1f}%" if self.total else "-"


def pool_usage(pool: IPPool, blocks: Sequence[Block]) -> Usage:
    in_use = sum(blockmath.in_use_count(b) for b in blocks if b.cidr in pool.cidr)
    return Usage(pool.cidr.size, in_use)


def _sorted_blocks(blocks: Sequence[Block]) -> list[Block]:
    return sorted(blocks, key=lambda b: (b.cidr.version, b.cidr.first))


def render_pool_usage(pools: Sequence[IPPool], blocks: Sequence[Block]) -> Table:
    table = _table("IP pool usage", ("POOL", "CIDR"), ("BLOCKS", "TOTAL", "IN USE", "FREE", "USED"))
    for pool in pools:
        usage = pool_usage(pool, blocks)
        claimed = sum(1 for b in blocks if b.cidr in pool.cidr)
        table.add_row(
            pool.name + (" (disabled)" if pool.disabled else ""),
            str(pool.cidr),
            f"{claimed}/{pool.block_count}",
            str(usage.total),
            str(usage.in_use),
            str(usage.free),
            usage.percent,
        )
    if not pools:
        table.caption = "no pools"
    return table


def render_block_usage(pools: Sequence[IPPool], blocks: Sequence[Block]) -> Table:
    table = _table("blocks", ("BLOCK", "POOL", "AFFINITY"), ("IN USE", "TOTAL", "FREE", "USED"))
    for blk in _sorted_blocks(blocks):
        pool = next((p.name for p in pools if blk.cidr in p.cidr), "(none)")
        usage = Usage(blk.size, blockmath.in_use_count(blk))
        table.add_row(
            str(blk.cidr),
            pool,
            blk.affinity or "-",
            str(usage.in_use),
            str(usage.total),
            str(usage.free),
            usage.percent,
        )
    if not blocks:
        table.caption = "no blocks claimed yet"
    return table


def borrowed(blocks: Sequence[Block]) -> list[tuple[IPAddress, str, str, Block]]:
    """(address, handle, holder node, block) for addresses used off their block's node."""
    return [
        (ip, attr.handle_id, attr.node, blk)
        for blk in _sorted_blocks(blocks)
        for ip, attr, _ in blockmath.allocated(blk)
        if attr.node != blk.affinity
    ]


def render_borrowed(blocks: Sequence[Block]) -> RenderableType:
    rows = borrowed(blocks)
    if not rows:
        return "borrowed addresses: none"
    table = _table("borrowed addresses", ("IP", "HANDLE", "HOLDER NODE", "BLOCK", "BLOCK AFFINITY"))
    for ip, handle_id, node, blk in rows:
        table.add_row(str(ip), handle_id, node or "-", str(blk.cidr), blk.affinity or "-")
    return table


def describe_ip(ipam: IPAM, ip: IPAddress) -> list[str]:
    """Who holds `ip`, or that it is free, or outside every pool."""
    held = ipam.holder_of(ip)
    if held is None:
        pool = next((p for p in ipam.pools() if ip in p.cidr), None)
        if pool is None:
            return [f"{ip} is not in any pool"]
        return [f"{ip} is free (pool {pool.name}, {pool.cidr})"]
    blk, attr, sequence = held
    return [
        f"{ip} is allocated",
        f"  handle:    {attr.handle_id}",
        f"  pod:       {attr.pod or '-'}",
        f"  namespace: {attr.namespace or '-'}",
        f"  node:      {attr.node or '-'}",
        f"  block:     {blk.cidr} (affinity {blk.affinity or '-'})",
        f"  sequence:  {sequence}",
        f"  type:      {attr.type.value}",
    ]


def _ipam_show(args: argparse.Namespace) -> int:
    ip = parse_ip(args.ip, "ip") if args.ip is not None else None
    console = make_console()
    with _opened(args) as ipam:
        if ip is not None:
            for line in describe_ip(ipam, ip):
                console.print(line)
            return EXIT_OK
        pools, blocks = ipam.pools(), ipam.blocks()
    console.print(render_pool_usage(pools, blocks))
    if args.show_blocks:
        console.print(render_block_usage(pools, blocks))
    if args.show_borrowed:
        console.print(render_borrowed(blocks))
    return EXIT_OK


# --- ipam check / gc -------------------------------------------------------------------------


def _describe_problem(item: Any) -> str:
    if isinstance(item, Leak):
        pod = f"{item.namespace}/{item.pod}" if item.pod else "-"
        return (
            f"{item.ip} handle={item.handle} pod={pod} node={item.node or '-'} "
            f"block={item.block} sequence={item.sequence}: {item.reason}"
        )
    if isinstance(item, HandleMismatch):
        return f"{item.handle}: recorded {item.recorded}, allocated {item.actual}"
    return str(item)


def render_check_report(report: CheckReport) -> list[str]:
    """Every problem list of the report, each with its count, then the verdict."""
    lines: list[str] = []
    problems = 0
    for f in fields(report):
        value = getattr(report, f.name)
        items = (
            [f"{k}: {'; '.join(v)}" for k, v in value.items()]
            if isinstance(value, dict)
            else [_describe_problem(v) for v in value]
        )
        problems += len(items)
        lines.append(f"{f.name.replace('_', ' ')}: {len(items)}")
        lines += [f"  {item}" for item in items]
    lines.append("ipam check: clean" if report.clean else f"ipam check: {problems} problem(s)")
    return lines


def _ipam_check(args: argparse.Namespace) -> int:
    with _opened(args) as ipam:
        report = check(ipam, liveness_for(ipam.store))
    if args.output == "json":
        print(json.dumps(report.to_dict(), indent=2, sort_keys=True))
    else:
        console = make_console()
        for line in render_check_report(report):
            console.print(line)
    return EXIT_OK if report.clean else EXIT_FAILED


def render_gc_result(result: GCResult) -> list[str]:
    labels = {
        "released_ips": "released",
        "kept_ips": "kept (alive, reallocated or younger than --grace)",
        "settled_handles": "settled handle",
        "suspect_handles": "suspect handle (settled once untouched for --grace)",
        "resolved_affinities": "resolved affinity",
        "released_blocks": "released block",
    }
    lines = [
        f"{labels[f.name]}: {item}" for f in fields(result) for item in getattr(result, f.name)
    ]
    return lines or ["nothing to collect"]


def _parse_grace(text: str) -> float:
    try:
        grace = float(text)
    except ValueError:
        raise InvalidInput("grace", f"expected seconds, got {text!r}") from None
    if not 0 <= grace < float("inf"):
        raise InvalidInput("grace", f"must be a non-negative number of seconds, got {text!r}")
    return grace


def _ipam_gc(args: argparse.Namespace) -> int:
    grace = _parse_grace(args.grace)
    if args.continuous or args.lease_namespace:
        return _ipam_gc_continuous(args, grace)
    with _opened(args) as ipam:
        result = collect_garbage(ipam, liveness_for(ipam.store), grace)
    for line in render_gc_result(result):
        print(line)
    return EXIT_OK


def _register_gc_controller_options(gc: argparse.ArgumentParser) -> None:
    """`ipam gc --continuous`: the controller the chart's GC Deployment runs."""
    gc.add_argument(
        "--continuous",
        action="store_true",
        help="keep collecting every --interval seconds until SIGTERM",
    )
    gc.add_argument(
        "--interval",
        metavar="SECONDS",
        default=str(DEFAULT_GC_INTERVAL),
        help=f"seconds between passes with --continuous (default: {DEFAULT_GC_INTERVAL:g})",
    )
    gc.add_argument(
        "--lease-namespace",
        metavar="NS",
        help="with --continuous: collect only while holding a coordination.k8s.io Lease in "
        "this namespace (leader election; kube store only)",
    )
    gc.add_argument(
        "--lease-name",
        default=DEFAULT_GC_LEASE,
        metavar="NAME",
        help=f"the Lease's name (default: {DEFAULT_GC_LEASE})",
    )
    gc.add_argument(
        "--identity",
        metavar="ID",
        help="this contender's name in the Lease (default: $POD_NAME, else the host name)",
    )


def _parse_seconds(text: str, field: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise InvalidInput(field, f"expected seconds, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise InvalidInput(field, f"must be a positive number of seconds, got {text!r}")
    return value


def _ipam_gc_continuous(args: argparse.Namespace, grace: float) -> int:
    import os
    import socket

    from ipam_blocks.gc_controller import GCLoopSettings, run_controller
    from ipam_blocks.leader import LeaseSettings

    if not args.continuous:
        raise InvalidInput("lease-namespace", "leader election needs --continuous")
    lease = None
    if args.lease_namespace:
        identity = args.identity or os.environ.get("POD_NAME") or socket.gethostname()
        lease = LeaseSettings(args.lease_namespace, args.lease_name, identity)
    settings = GCLoopSettings(_parse_seconds(args.interval, "interval"), grace, lease)
    with _opened(args) as ipam:
        api_client = getattr(ipam.store, "api_client", None)
        if lease is not None and api_client is None:
            raise InvalidInput("lease-namespace", "leader election needs --store kube")

        def report(result: GCResult) -> None:
            # Only passes that did something; every pass is logged ("gc pass done").
            if any(getattr(result, f.name) for f in fields(result)):
                for line in render_gc_result(result):
                    print(line, flush=True)

        run_controller(
            ipam, liveness_for(ipam.store), settings, api_client=api_client, report=report
        )
    return EXIT_OK


# --- ipam config -----------------------------------------------------------------------------


def _config_changes(args: argparse.Namespace) -> dict[str, Any]:
    changes = _without_none(
        {
            "strictAffinity": _bool_or_text(args.strict_affinity),
            "maxBlocksPerHost": _int_or_text(args.max_blocks_per_host),
        }
    )
    parse_ipam_config(Resource("IPAMConfig", IPAM_CONFIG_NAME, changes))  # reject bad input now
    return changes


def _apply_config(ipam: IPAM, changes: dict[str, Any]) -> IPAMConfig:
    """Create or CAS-update the `default` IPAMConfig; an unchanged config is not rewritten."""

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


def _ipam_config(args: argparse.Namespace) -> int:
    changes = _config_changes(args)
    with _opened(args) as ipam:
        cfg = _apply_config(ipam, changes) if changes else ipam.config()
    print(f"strictAffinity: {str(cfg.strict_affinity).lower()}")
    print(f"maxBlocksPerHost: {cfg.max_blocks_per_host} (0 = unlimited)")
    print(f"autoAllocateBlocks: {str(cfg.auto_allocate_blocks).lower()}")
    return EXIT_OK
