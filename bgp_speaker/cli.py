"""The `agent` verb of the l3fabric CLI: run the node agent in the foreground."""

from __future__ import annotations

import argparse
from pathlib import Path

from bgp_speaker.agent import DEFAULT_MTU, DEFAULT_STATE_DIR, AgentSettings, run
from cni.protocol import DEFAULT_SOCKET
from ipam_blocks.store import default_store_url


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
        "--mtu", type=int, default=DEFAULT_MTU, help="pod MTU when the CNI config sets none"
    )
    agent.add_argument(
        "--workers", type=int, default=8, help="threads for IPAM/netlink work (default: 8)"
    )
    agent.add_argument(
        "--host-netns",
        metavar="PATH",
        help="network namespace to treat as the host (labs, tests); default: the agent's own",
    )
    agent.set_defaults(handler=_agent)


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
        )
    )
