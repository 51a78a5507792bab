"""The `l3fabric` console script: one argparse tree, verbs contributed by packages.

Each verb module in `l3fabric.commands` has `register(subparsers)`; `VERB_MODULES` lists them,
so a new one plugs in with one line here. Verbs that belong together live under a group
(`pool`, `node`, `ipam`, ...) made with `l3fabric.console.verb_group`, which any module may
extend: `verb_group(subparsers, "node").add_parser("status")` adds `node status` next to
`node add`.

A leaf verb sets `handler=fn` (`fn(args) -> exit code`). `--store` and `--log-level` are
added to every verb after registration, so packages never declare them.

Errors are turned into exit codes in one place, `main`:

    0  success
    1  valid request that could not be done (PoolExhausted, NoUsablePool, InUse,
       ContentionBudgetExceeded, ...), or `ipam check` found problems
    2  bad input (usage errors, InvalidInput); nothing was written
    3  store unavailable; nothing was written, worth retrying later
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

from ipam_blocks.errors import InvalidInput, L3FabricError, StoreUnavailable
from ipam_blocks.store import DEFAULT_STORE_URL, STORE_ENV
from l3fabric.console import EXIT_FAILED, EXIT_INVALID, EXIT_UNAVAILABLE

Handler = Callable[[argparse.Namespace], int]

# Packages whose `cli.register(subparsers)` contributes verbs, in help order.
VERB_MODULES = (
    "l3fabric.commands.ipam",
    "l3fabric.commands.agent",
    "l3fabric.commands.cni",
    "l3fabric.commands.lab",
)

LOG_LEVELS = ("debug", "info", "warning", "error")


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's one-line error format (the usage is one --help away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_INVALID, f"error: {self.prog}: {message} (see --help)\n")


def _all_parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):  # aliases repeat a parser
                yield from _all_parsers(child)


def _add_common_options(parser: argparse.ArgumentParser, *, root: bool) -> None:
    # Below the root the defaults are SUPPRESSed: a verb's own default would otherwise
    # overwrite a value given before the verb (`l3fabric --store X ipam show`).
    default = argparse.SUPPRESS
    parser.add_argument(
        "--store",
        metavar="URL",
        default=None if root else default,
        help=f"sqlite:PATH, kube or kube:KUBECONFIG (default: ${STORE_ENV}, "
        f"else {DEFAULT_STORE_URL})",
    )
    parser.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        default="warning" if root else default,
        help="log verbosity on stderr (default: warning)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="l3fabric",
        description="BGP-routed layer-3 pod network: IP pools, block IPAM, nodes, demo.",
    )
    subparsers = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for module in VERB_MODULES:
        importlib.import_module(module).register(subparsers)
    for each in _all_parsers(parser):
        _add_common_options(each, root=each is parser)
    return parser


class _KeyValueFormatter(logging.Formatter):
    """Appends the structured `extra` keys (op, node, block, ...) as key=value pairs.

    One record is one line whatever its fields hold (pod names come from CNI_ARGS): the
    message has its control characters escaped, a value with spaces, '=', '"' or control
    characters is quoted and escaped, and traceback lines are indented so that none of
    them can pass for a record of its own.
    """

    _STANDARD = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        extras = sorted((k, v) for k, v in vars(record).items() if k not in self._STANDARD)
        return super().format(record) + "".join(f" {k}={_log_value(v)}" for k, v in extras)

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = _escape_controls(record.message)
        return super().formatMessage(record)

    def formatException(self, ei: Any) -> str:
        return _indented(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return _indented(super().formatStack(stack_info))


_CONTROL_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_controls(text: str) -> str:
    """`text` with every non-printable character (newlines, lone surrogates, ...) escaped."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _CONTROL_ESCAPES.get(c) or repr(c)[1:-1] for c in text)


def _log_value(value: object) -> str:
    text = str(value)
    if text.isprintable() and not any(c in text for c in ' ="'):
        return text
    quoted = text.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{_escape_controls(quoted)}"'


def _indented(text: str) -> str:
    return "\n".join(f"  {_escape_controls(line)}" for line in text.splitlines())


_log_handler = logging.StreamHandler()  # stderr
_log_handler.setFormatter(_KeyValueFormatter("%(levelname)s %(name)s: %(message)s"))


def _setup_logging(level: str) -> None:
    # Idempotent and additive: `main` also runs in-process (the demo, tests), where other
    # handlers on the root logger must survive.
    root = logging.getLogger()
    if _log_handler not in root.handlers:
        root.addHandler(_log_handler)
    root.setLevel(level.upper())


def _fail(message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level)
    handler: Handler = args.handler
    try:
        return handler(args)
    except InvalidInput as e:
        return _fail(f"{e.field}: {e.message}", EXIT_INVALID)
    except StoreUnavailable as e:
        return _fail(f"store unavailable: {e}", EXIT_UNAVAILABLE)
    except L3FabricError as e:
        return _fail(str(e), EXIT_FAILED)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
