"""BIRD's `show protocols all`, parsed into its BGP sessions (pure).

A protocol starts with a header line (name, protocol, table, state, since, info: the
config's `timeformat protocol "%s"` makes "since" epoch seconds), followed by indented
details, of which this reads the neighbour address, the last error and the route counts.
"""

from __future__ import annotations

import re
from ipaddress import ip_address

from bgp_speaker.bgp.reflection import ReflectorSessionState

__all__ = ["parse_protocols"]

_HEADER = re.compile(
    r"^(?P<name>\S+)\s+BGP\s+\S+\s+(?P<state>\S+)\s+(?P<since>\S+)\s*(?P<info>.*)$"
)
_ROUTES = re.compile(r"^\s+Routes:\s+(?P<imported>\d+) imported, (?:(?P<filtered>\d+) filtered, )?"
                     r"(?P<exported>\d+) exported")  # fmt: skip


def parse_protocols(text: str) -> tuple[ReflectorSessionState, ...]:
    sessions: list[ReflectorSessionState] = []
    current: dict[str, object] | None = None

    def flush() -> None:
        if current is not None:
            sessions.append(ReflectorSessionState(**current))  # type: ignore[arg-type]

    for line in text.splitlines():
        header = _HEADER.match(line)
        if header:
            flush()
            info = header["info"].strip()
            try:
                since = float(header["since"])
            except ValueError:
                since = 0.0
            current = {
                "name": header["name"], "peer": None, "bgp_state": info.split()[0] if info else "",
                "since": since, "info": info,
            }  # fmt: skip
            continue
        if current is None or (line and not line[0].isspace()):
            flush()
            current = None
            continue
        stripped = line.strip()
        if stripped.startswith("Neighbor address:"):
            current["peer"] = ip_address(stripped.split(":", 1)[1].strip().split("%")[0])
        elif stripped.startswith("Last error:"):
            current["last_error"] = stripped.split(":", 1)[1].strip()
        elif routes := _ROUTES.match(line):
            current["imported"] = int(routes["imported"])
            current["exported"] = int(routes["exported"])
    flush()
    return tuple(sessions)
