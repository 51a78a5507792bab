"""The `pool`, `node` and `ipam` verbs of the l3fabric CLI (DESIGN §2, §4).

Flags are turned into the Resource a CRD would be and parsed by `model`, so CLI and CRD input
share one validator and errors name the CRD field (`cidr`, `blockSize`, `nodeSelector`).
Input is parsed before the store is opened: bad input never writes anything.

What the verbs do to the store is `ipam_blocks` (`pools`, `admin`, `usage`, `check`, `gc`,
`gc_controller`); what they print is `l3fabric.views.ipam`.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import fields
from typing import Any

from ipam_blocks import admin
from ipam_blocks import pools as poolops
from ipam_blocks.allocator import IPAM
from ipam_blocks.check import check
from ipam_blocks.errors import InvalidInput
from ipam_blocks.gc import GCResult, collect_garbage
from ipam_blocks.gc_controller import (
    DEFAULT_GRACE,
    DEFAULT_INTERVAL,
    GCLoopSettings,
    run_controller,
)
from ipam_blocks.leader import LeaseSettings
from ipam_blocks.model import (
    IPAM_CONFIG_NAME,
    IPPool,
    Node,
    check_object_name,
    handle_name,
    parse_ip,
    parse_ipam_config,
    parse_node,
    parse_pool,
)
from ipam_blocks.selector import parse_labels, parse_selector_text
from ipam_blocks.store import Resource, open_store
from ipam_blocks.usage import address_use
from l3fabric.console import EXIT_FAILED, EXIT_OK, make_console, verb_group
from l3fabric.views.ipam import (
    render_address_use,
    render_block_usage,
    render_borrowed,
    render_check_report,
    render_gc_result,
    render_nodes,
    render_pool_usage,
    render_pools,
)

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

    chk = verbs.add_parser(
        "check",
        help="report leaks and inconsistencies that a fresh read confirms (exit 1 if any); "
        "findings that change meanwhile are writes in flight, counted as skipped",
    )
    chk.add_argument("-o", "--output", choices=("text", "json"), default="text")
    chk.set_defaults(handler=_ipam_check)

    gc = verbs.add_parser("gc", help="release leaked addresses and settle leftovers")
    gc.add_argument(
        "--grace",
        metavar="SECONDS",
        default=str(DEFAULT_GRACE),
        help=f"only touch leaks older than this (default: {DEFAULT_GRACE:g})",
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


# --- ipam assign / release -------------------------------------------------------------------


def _parse_assign_args(args: argparse.Namespace) -> admin.ManualAssignment:
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
    return admin.ManualAssignment(
        args.node, args.handle, args.pod or "", namespace, ip, args.pool, version
    )


def _ipam_assign(args: argparse.Namespace) -> int:
    req = _parse_assign_args(args)
    with _opened(args) as ipam:
        ips = admin.assign(ipam, req)
    for ip in ips:
        print(ip)
    return EXIT_OK


def _ipam_release(args: argparse.Namespace) -> int:
    ip = parse_ip(args.ip, "ip") if args.ip is not None else None
    if args.handle is not None:
        handle_name(args.handle)
    with _opened(args) as ipam:
        if ip is not None:
            released = admin.release_ip(ipam, ip)
        else:
            released = admin.release_handle(ipam, args.handle)
    for each in released:
        print(f"released {each}")
    return EXIT_OK


# --- ipam show -------------------------------------------------------------------------------


def _ipam_show(args: argparse.Namespace) -> int:
    ip = parse_ip(args.ip, "ip") if args.ip is not None else None
    console = make_console()
    with _opened(args) as ipam:
        if ip is not None:
            for line in render_address_use(address_use(ipam, ip)):
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


def _ipam_check(args: argparse.Namespace) -> int:
    with _opened(args) as ipam:
        report = check(ipam, ipam.store.owner_liveness())
    if args.output == "json":
        print(json.dumps(report.to_dict(), indent=2, sort_keys=True))
    else:
        console = make_console()
        for line in render_check_report(report):
            console.print(line)
    return EXIT_OK if report.clean else EXIT_FAILED


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
        result = collect_garbage(ipam, ipam.store.owner_liveness(), grace)
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
        default=str(DEFAULT_INTERVAL),
        help=f"seconds between passes with --continuous (default: {DEFAULT_INTERVAL:g})",
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
    if not args.continuous:
        raise InvalidInput("lease-namespace", "leader election needs --continuous")
    lease = None
    if args.lease_namespace:
        identity = args.identity or os.environ.get("POD_NAME") or socket.gethostname()
        lease = LeaseSettings(args.lease_namespace, args.lease_name, identity)
    settings = GCLoopSettings(_parse_seconds(args.interval, "interval"), grace, lease)

    def report(result: GCResult) -> None:
        # Only passes that did something; every pass is logged ("gc pass done").
        if any(getattr(result, f.name) for f in fields(result)):
            for line in render_gc_result(result):
                print(line, flush=True)

    with _opened(args) as ipam:
        run_controller(ipam, settings, report=report)
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


def _ipam_config(args: argparse.Namespace) -> int:
    changes = _config_changes(args)
    with _opened(args) as ipam:
        cfg = admin.apply_config(ipam, changes) if changes else ipam.config()
    print(f"strictAffinity: {str(cfg.strict_affinity).lower()}")
    print(f"maxBlocksPerHost: {cfg.max_blocks_per_host} (0 = unlimited)")
    print(f"autoAllocateBlocks: {str(cfg.auto_allocate_blocks).lower()}")
    return EXIT_OK
