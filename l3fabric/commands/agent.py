"""The `agent` verb of the l3fabric CLI: run the node agent in the foreground."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bgp_speaker.agent.main import (
    DEFAULT_METRICS_ADDRESS,
    DEFAULT_MTU,
    DEFAULT_STATE_DIR,
    AgentSettings,
    run,
)
from cni.protocol import DEFAULT_SOCKET, AgentUnreachable, call
from ipam_blocks.errors import L3FabricError
from ipam_blocks.store import default_store_url
from l3fabric.console import make_console, verb_group
from l3fabric.views.node_status import render_node_status


def register(subparsers: argparse._SubParsersAction) -> None:
    agent = subparsers.add_parser(
        "agent",
        help="run the node agent (CNI backend; later BGP)",
        description="Run the node agent in the foreground until SIGTERM. It serves the CNI "
        "plugin over a local unix socket and keeps a durable record of attached pods. "
        "Use --log-level info to log every CNI call.",
    )
    agent.add_argument("--node", required=True, help="this node's name in the store")
    agent.add_argument(
        "--socket", default=DEFAULT_SOCKET, metavar="PATH", help=f"(default: {DEFAULT_SOCKET})"
    )
    agent.add_argument(
        "--state-dir",
        default=str(DEFAULT_STATE_DIR),
        metavar="DIR",
        help=f"node-local state (default: {DEFAULT_STATE_DIR})",
    )
    agent.add_argument(
        "--mtu",
        type=int,
        default=None,
        help="pod MTU when the CNI config sets none (default: the underlay's less the pools' "
        f"encapsulation overhead, {DEFAULT_MTU} until known)",
    )
    agent.add_argument(
        "--workers", type=int, default=8, help="threads for IPAM/netlink work (default: 8)"
    )
    agent.add_argument(
        "--host-netns",
        metavar="PATH",
        help="network namespace to treat as the host (labs, tests); default: the agent's own",
    )
    agent.add_argument(
        "--no-bgp", dest="bgp", action="store_false", help="serve CNI only: no ExaBGP, no routes"
    )
    agent.add_argument(
        "--metrics-port", type=int, default=0, help="Prometheus metrics port (default: off)"
    )
    agent.add_argument(
        "--metrics-address",
        default=DEFAULT_METRICS_ADDRESS,
        help="address the metrics endpoint listens on; it is unauthenticated, so only a "
        f"trusted one (default: {DEFAULT_METRICS_ADDRESS})",
    )
    agent.add_argument(
        "--list-jitter",
        type=float,
        metavar="SECONDS",
        help="spread routing's first lists of the store over a random 0..SECONDS, so agents "
        "starting together do not list together (default: 5 with the Kubernetes store, 0 "
        "with the embedded one)",
    )
    agent.set_defaults(handler=_agent)

    status = verb_group(subparsers, "node", "nodes: records and BGP status").add_parser(
        "status",
        help="BGP sessions of this node's agent",
        description="The agent's BGP peers (address, type, state, since, prefixes received, "
        "accepted and advertised), like `calicoctl node status`.",
    )
    status.add_argument(
        "--socket", default=DEFAULT_SOCKET, metavar="PATH", help=f"(default: {DEFAULT_SOCKET})"
    )
    status.add_argument("-o", "--output", choices=("table", "json"), default="table")
    status.add_argument(
        "--check",
        action="store_true",
        help="print one line and exit 0 when routing runs and every desired BGP session is "
        "established, else 1 (the chart's readiness probe)",
    )
    status.set_defaults(handler=_node_status)


def _agent(args: argparse.Namespace) -> int:
    return run(
        AgentSettings(
            node=args.node,
            store_url=args.store or default_store_url(),
            socket_path=Path(args.socket),
            state_dir=Path(args.state_dir),
            mtu=args.mtu,
            workers=args.workers,
            host_netns=args.host_netns,
            bgp=args.bgp,
            metrics_port=args.metrics_port,
            metrics_address=args.metrics_address,
            list_jitter=args.list_jitter,
        )
    )


class AgentNotRunning(L3FabricError):
    """No agent answers on the socket."""


def _node_status(args: argparse.Namespace) -> int:
    try:
        status = call(args.socket, "node.status", {}, timeout=10)
    except AgentUnreachable as err:
        raise AgentNotRunning(f"no agent answers: {err}") from None
    if args.check:
        ready, line = sessions_ready(status)
        print(line)
        return 0 if ready else 1
    if args.output == "json":
        print(json.dumps(status, indent=2, sort_keys=True))
    else:
        make_console().print(render_node_status(status))
    return 0


def sessions_ready(status: dict) -> tuple[bool, str]:
    """(ready, one line why) from a `node.status` answer: routing has started (the node has a
    router id) and every desired session is established."""
    if not status.get("router_id"):
        return False, "not ready: routing not started (does the node have an IPv4 address?)"
    peers = status.get("peers") or []
    down = [
        f"{p.get('address')} ({p.get('state')})" for p in peers if p.get("state") != "established"
    ]
    if down:
        return False, (
            f"not ready: {len(peers) - len(down)}/{len(peers)} BGP sessions established; "
            f"down: {', '.join(down)}"
        )
    return True, f"ready: {len(peers)}/{len(peers)} BGP sessions established"
