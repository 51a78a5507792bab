"""Tables and lines of the `pool`, `node` and `ipam` verbs: pure functions of model values,
also used by `l3fabric.lab.demo`, which runs those verbs in-process."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields

from rich.console import RenderableType
from rich.table import Table

from ipam_blocks.check import CheckReport, HandleMismatch, Leak
from ipam_blocks.gc import GCResult
from ipam_blocks.model import Block, IPPool, Node
from ipam_blocks.usage import AddressUse, Usage, block_usage, borrowed, pool_usage


def _table(title: str, left: Sequence[str], right: Sequence[str] = ()) -> Table:
    """A table whose text columns are left-aligned and number columns right-aligned."""
    table = Table(title=title)
    for column in left:
        table.add_column(column, no_wrap=True)
    for column in right:
        table.add_column(column, no_wrap=True, justify="right")
    return table


def _yes_no(value: bool) -> str:
    return "yes" if value else "no"


def _percent(usage: Usage) -> str:
    return f"{100 * usage.in_use / usage.total:.1f}%" if usage.total else "-"


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


def render_pool_usage(pools: Sequence[IPPool], blocks: Sequence[Block]) -> Table:
    table = _table("IP pool usage", ("POOL", "CIDR"), ("BLOCKS", "TOTAL", "IN USE", "FREE", "USED"))
    for row in pool_usage(pools, blocks):
        pool, usage = row.pool, row.addresses
        table.add_row(
            pool.name + (" (disabled)" if pool.disabled else ""),
            str(pool.cidr),
            f"{row.blocks}/{pool.block_count}",
            str(usage.total),
            str(usage.in_use),
            str(usage.free),
            _percent(usage),
        )
    if not pools:
        table.caption = "no pools"
    return table


def render_block_usage(pools: Sequence[IPPool], blocks: Sequence[Block]) -> Table:
    table = _table("blocks", ("BLOCK", "POOL", "AFFINITY"), ("IN USE", "TOTAL", "FREE", "USED"))
    for row in block_usage(pools, blocks):
        usage = row.addresses
        table.add_row(
            str(row.block.cidr),
            row.pool or "(none)",
            row.block.affinity or "-",
            str(usage.in_use),
            str(usage.total),
            str(usage.free),
            _percent(usage),
        )
    if not blocks:
        table.caption = "no blocks claimed yet"
    return table


def render_borrowed(blocks: Sequence[Block]) -> RenderableType:
    rows = borrowed(blocks)
    if not rows:
        return "borrowed addresses: none"
    table = _table("borrowed addresses", ("IP", "HANDLE", "HOLDER NODE", "BLOCK", "BLOCK AFFINITY"))
    for row in rows:
        table.add_row(
            str(row.ip),
            row.handle_id,
            row.node or "-",
            str(row.block.cidr),
            row.block.affinity or "-",
        )
    return table


def render_address_use(use: AddressUse) -> list[str]:
    """Who holds the address, or that it is free, or outside every pool."""
    ip, allocation = use.ip, use.allocation
    if allocation is None:
        if use.pool is None:
            return [f"{ip} is not in any pool"]
        return [f"{ip} is free (pool {use.pool.name}, {use.pool.cidr})"]
    blk, holder = allocation.block, allocation.holder
    return [
        f"{ip} is allocated",
        f"  handle:    {holder.handle_id}",
        f"  pod:       {holder.pod or '-'}",
        f"  namespace: {holder.namespace or '-'}",
        f"  node:      {holder.node or '-'}",
        f"  block:     {blk.cidr} (affinity {blk.affinity or '-'})",
        f"  sequence:  {allocation.sequence}",
        f"  type:      {holder.type.value}",
    ]


def _describe_problem(item: object) -> str:
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
        if not isinstance(value, list | dict):
            continue
        items = (
            [f"{k}: {'; '.join(v)}" for k, v in value.items()]
            if isinstance(value, dict)
            else [_describe_problem(v) for v in value]
        )
        problems += len(items)
        lines.append(f"{f.name.replace('_', ' ')}: {len(items)}")
        lines += [f"  {item}" for item in items]
    if report.skipped:
        lines.append(
            f"skipped: {report.skipped} finding(s) a fresh read did not confirm "
            "(writes in flight); run again to look at them once more"
        )
    lines.append("ipam check: clean" if report.clean else f"ipam check: {problems} problem(s)")
    return lines


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
