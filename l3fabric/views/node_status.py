"""`node status`: the agent's view of its BGP sessions, rendered like `calicoctl node status`."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text


def _since(timestamp: float, now: float) -> str:
    if not timestamp:
        return "-"
    seconds = int(now - timestamp)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(timestamp))


def render_node_status(status: dict[str, Any], now: float | None = None) -> RenderableType:
    now = time.time() if now is None else now
    header = Text(
        f"l3fabric agent is running on node {status['node']} "
        f"(router id {status.get('router_id') or '-'})"
    )
    table = Table(title="IPv4 BGP status", title_justify="left")
    for column in ("PEER ADDRESS", "PEER TYPE", "STATE", "SINCE"):
        table.add_column(column)
    for column in ("RECEIVED", "ACCEPTED", "ADVERTISED"):
        table.add_column(column, justify="right")
    table.add_column("INFO")
    for peer in status["peers"]:
        table.add_row(
            peer["address"],
            # On a reflector node BIRD holds the fabric sessions: say which process has each.
            f"{peer['type']} (BIRD)" if peer.get("speaker") == "bird" else peer["type"],
            peer["state"],
            _since(peer["since"], now),
            str(peer["received"]),
            str(peer["accepted"]),
            str(peer["advertised"]),
            peer.get("reason", ""),
        )
    dropped = status.get("dropped_by_policy") or {}
    footer = Text(
        f"exported prefixes: {len(status['exported'])}   "
        f"kernel routes: {status['routes_installed']}   "
        f"dropped by policy: {sum(dropped.values())}"
        + (f" ({', '.join(f'{k} {v}' for k, v in sorted(dropped.items()))})" if dropped else "")
        + f"   ExaBGP restarts: {status['speaker_restarts']}"
        + f"   last sync: {_last_sync(status.get('last_sync'), now)}"
    )
    extra = [_reflector_line(status.get("reflector")), _overlay_line(status.get("overlay"))]
    return Group(header, table, footer, *(line for line in extra if line is not None))


def _last_sync(at: float | None, now: float) -> str:
    """When routing last levelled itself to its caches of the store (None: not yet)."""
    return "never" if not at else f"{_since(at, now)} ago"


def _reflector_line(reflector: dict[str, Any] | None) -> Text | None:
    """The BIRD a route reflector node runs: up or not, restarts, reloads, its last error."""
    if not reflector:
        return None
    state = f"running (pid {reflector['pid']})" if reflector["running"] else "NOT RUNNING"
    line = (
        f"route reflector: BIRD {state}   restarts: {reflector['restarts']}   "
        f"reloads: {reflector['reloads']}"
    )
    if reflector.get("last_error"):
        line += f"   last error: {reflector['last_error']}"
    return Text(line)


def _overlay_line(overlay: dict[str, Any] | None) -> Text | None:
    """Tunnel devices, pod MTU, NAT, and any encapsulation this node cannot provide."""
    if not overlay:
        return None
    devices = ", ".join(f"{name} mtu {mtu}" for name, mtu in sorted(overlay["devices"].items()))
    parts = [
        f"encapsulation: {devices or 'none'}",
        f"pod MTU {overlay.get('pod_mtu') or '-'}",
        f"natOutgoing {'on' if (overlay.get('nat') or {}).get('enabled') else 'off'}",
    ]
    parts += [f"{kind} UNAVAILABLE: {why}" for kind, why in sorted(overlay["unavailable"].items())]
    parts += [f"{part} error: {why}" for part, why in sorted(overlay["errors"].items())]
    return Text("   ".join(parts))
