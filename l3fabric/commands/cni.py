"""The `cni` verbs of the l3fabric CLI: `cni install`."""

from __future__ import annotations

import argparse
from pathlib import Path

from cni.install import install
from cni.protocol import DEFAULT_SOCKET
from l3fabric.console import EXIT_OK, verb_group

DEFAULT_BIN_DIR = "/opt/cni/bin"
DEFAULT_CONF_DIR = "/etc/cni/net.d"


def register(subparsers: argparse._SubParsersAction) -> None:
    verbs = verb_group(subparsers, "cni", "the CNI plugin")
    inst = verbs.add_parser(
        "install",
        help="install the plugin executable and its conflist",
        description="Write the `l3fabric` plugin into the runtime's CNI bin directory and "
        "10-l3fabric.conflist (l3fabric -> tuning -> portmap) into its config directory.",
    )
    inst.add_argument(
        "--bin-dir", default=DEFAULT_BIN_DIR, metavar="DIR", help=f"(default: {DEFAULT_BIN_DIR})"
    )
    inst.add_argument(
        "--conf-dir", default=DEFAULT_CONF_DIR, metavar="DIR", help=f"(default: {DEFAULT_CONF_DIR})"
    )
    inst.add_argument("--mtu", type=int, help="pod MTU (default: the agent's --mtu)")
    inst.add_argument(
        "--socket",
        default=DEFAULT_SOCKET,
        metavar="PATH",
        help=f"agent socket (default: {DEFAULT_SOCKET})",
    )
    inst.set_defaults(handler=_install)


def _install(args: argparse.Namespace) -> int:
    done = install(Path(args.bin_dir), Path(args.conf_dir), mtu=args.mtu, socket=args.socket)
    print(f"plugin:   {done.plugin}")
    print(f"conflist: {done.conflist}")
    return EXIT_OK
