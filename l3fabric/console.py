"""What every verb module shares: exit codes, verb groups and the console tables print to.

Verb modules (`l3fabric.commands.*`) import this, never `l3fabric.cli`, which imports them.
"""

from __future__ import annotations

import argparse
import os
import sys

from rich.console import Console

EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_UNAVAILABLE = 0, 1, 2, 3
# Piped output is read by scripts and tests: a wide fixed width keeps table rows unwrapped.
PIPE_WIDTH = 200


def verb_group(
    subparsers: argparse._SubParsersAction, name: str, help: str = ""
) -> argparse._SubParsersAction:
    """The sub-verb table of group `name`, created on first use so several packages can add
    verbs to one group (`node add` from ipam_blocks, `node status` from the agent)."""
    parser = subparsers.choices.get(name)
    if parser is None:
        parser = subparsers.add_parser(name, help=help, description=help)
        parser.add_subparsers(dest=f"{name}_verb", metavar="VERB", required=True)
    return _subparsers_of(parser)


def _subparsers_of(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    raise ValueError(f"{parser.prog} is a verb, not a group")


def make_console() -> Console:
    """The console verbs print tables to. Markup is off: pod names are user data."""
    width = None if sys.stdout.isatty() else int(os.environ.get("COLUMNS") or PIPE_WIDTH)
    return Console(width=width, markup=False, highlight=False, emoji=False)
