"""The `demo` verb (and, later, `lab up|down|status`)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    demo = subparsers.add_parser(
        "demo",
        help="show block IPAM at work on a throwaway embedded store",
        description="Create a pool and three nodes in a temporary sqlite store, assign and "
        "release pod addresses, then print `ipam show --show-blocks` and `ipam check`. "
        "Ignores --store: the demo never touches a real store.",
    )
    demo.add_argument("--keep", action="store_true", help="keep the temporary store afterwards")
    demo.set_defaults(handler=_demo)


def _demo(args: argparse.Namespace) -> int:
    # Imported here: the demo pulls in the whole CLI, which imports this module.
    from lab.demo import run_demo

    return run_demo(keep=args.keep)
