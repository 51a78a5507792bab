"""Errors of `l3fabric lab`, by what the caller should do about them.

L3FabricError (ipam_blocks.errors)
├── InvalidInput       the topology or a flag is wrong: fix the file (exit 2); names the field
└── LabError           the lab could not be brought to the asked state (exit 1)
    ├── LabAlreadyUp   a state file exists: `lab down` first (also after a crashed `lab up`)
    ├── LabNotUp       no state file: nothing to act on
    └── CommandFailed  a command (ip, an exec line, a daemon) failed; carries its output
"""

from __future__ import annotations

from collections.abc import Sequence

from ipam_blocks.errors import L3FabricError


class LabError(L3FabricError):
    """A lab operation that was valid but could not be carried out."""


class LabAlreadyUp(LabError):
    pass


class LabNotUp(LabError):
    pass


class CommandFailed(LabError):
    def __init__(self, what: str, argv: Sequence[str], code: int, output: str) -> None:
        detail = output.strip().splitlines()[-5:]  # the tail says why; the log has the rest
        super().__init__(
            f"{what}: `{' '.join(argv)}` exited {code}" + "".join(f"\n  {x}" for x in detail)
        )
        self.argv = list(argv)
        self.code = code
        self.output = output
