"""Which processes each node role runs, and how: command lines and file locations only (the
one look at the machine: which FRR daemons are installed).

- l3fabric: `l3fabric agent` with the lab's store, its socket and state under the node's
  directory; ready when the socket answers `agent.status`.
- FRR (DESIGN §8): `zebra`, `bgpd` and the other daemons enabled in a bound
  `/etc/frr/daemons` (default: zebra, bgpd, staticd), each as `-N <instance>` so several
  instances share the machine; ready when `/var/run/frr/<instance>/<daemon>.vty` exists.
  The bound `frr.conf` is then loaded with `vtysh -N <instance> --config_dir DIR -b`.
- BIRD 2: `bird -f -c CONF -s SOCK -P PIDFILE` (foreground: the recorded PID is BIRD's);
  ready when its control socket exists.

Every daemon runs in the foreground so that the PID `lab up` records is the daemon's own.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

from l3fabric.lab.errors import LabError
from l3fabric.lab.layout import NodeDirs
from l3fabric.lab.topology import LabNode, Role, bird_config

FRR_BIN = Path("/usr/lib/frr")
FRR_RUN = Path("/var/run/frr")
FRR_DEFAULT_DAEMONS = ("zebra", "bgpd", "staticd")
# Daemons a `daemons` file may enable, in FRR's own start order (zebra first, always).
FRR_KNOWN_DAEMONS = (
    "zebra", "mgmtd", "bgpd", "ospfd", "ospf6d", "ripd", "ripngd", "isisd", "pimd", "pim6d",
    "ldpd", "nhrpd", "eigrpd", "babeld", "sharpd", "pbrd", "staticd", "bfdd", "fabricd",
    "vrrpd", "pathd",
)  # fmt: skip
UNIX_PATH_MAX = 107  # sun_path is 108 bytes including the terminating NUL


class Readiness:
    """How `lab up` knows a daemon serves: its socket file exists, or (agent) answers."""

    SOCKET_EXISTS = "socket-exists"
    AGENT_ANSWERS = "agent-answers"


@dataclass(frozen=True)
class Daemon:
    name: str
    argv: tuple[str, ...]
    ready_socket: Path
    readiness: str = Readiness.SOCKET_EXISTS


def plan_daemons(
    node: LabNode, instance: str, dirs: NodeDirs, store_url: str, frr_daemons: str | None
) -> list[Daemon]:
    """The daemons of `node`; `instance` names its FRR instance, `frr_daemons` is the text of
    its bound `/etc/frr/daemons` (None: not bound)."""
    if node.role is Role.AGENT:
        return [_agent(node, dirs, store_url)]
    if node.role is Role.FRR:
        return [_frr(name, instance) for name in frr_daemon_names(frr_daemons)]
    if node.role is Role.BIRD:
        return [_bird(node, dirs)]
    return []


def agent_argv(node: str, dirs: NodeDirs, store_url: str) -> tuple[str, ...]:
    # The agent is part of this installation; say so plainly if this build lacks it.
    if importlib.util.find_spec("bgp_speaker.agent.main") is None:
        raise LabError("this l3fabric build has no node agent (bgp_speaker.agent)")
    return (
        sys.executable, "-m", "l3fabric.cli", "--log-level", "info", "agent",
        "--node", node, "--store", store_url, "--socket", str(dirs.agent_socket),
        "--state-dir", str(dirs.agent_state),
    )  # fmt: skip


def _agent(node: LabNode, dirs: NodeDirs, store_url: str) -> Daemon:
    _check_socket_path(dirs.agent_socket)
    argv = agent_argv(node.name, dirs, store_url)
    return Daemon("agent", argv, dirs.agent_socket, Readiness.AGENT_ANSWERS)


def _frr(name: str, instance: str) -> Daemon:
    socket = frr_run_dir(instance) / f"{name}.vty"
    _check_socket_path(socket)
    argv = (str(FRR_BIN / name), "-N", instance, "-A", "127.0.0.1")
    return Daemon(name, argv, socket)


def _bird(node: LabNode, dirs: NodeDirs) -> Daemon:
    _check_socket_path(dirs.bird_socket)
    conf = bird_config(node).host
    argv = (
        "bird", "-f", "-c", str(conf), "-s", str(dirs.bird_socket),
        "-P", str(dirs.bird_pidfile),
    )  # fmt: skip
    return Daemon("bird", argv, dirs.bird_socket)


def frr_run_dir(instance: str) -> Path:
    return FRR_RUN / instance


def frr_load_argv(instance: str, dirs: NodeDirs) -> tuple[str, ...]:
    return ("vtysh", "-N", instance, "--config_dir", str(dirs.frr_config_dir), "-b")


def frr_daemon_names(daemons_file: str | None) -> tuple[str, ...]:
    """Daemons to run: zebra plus those set to `yes` in an FRR `daemons` file."""
    if daemons_file is None:
        return FRR_DEFAULT_DAEMONS
    enabled = {"zebra"}
    for line in daemons_file.splitlines():
        key, sep, value = line.partition("=")
        if sep and value.strip().strip("\"'") == "yes":
            enabled.add(key.strip())
    # mgmtd is FRR >= 9; the Debian FRR here (8.4) has none, so skip what is not installed.
    return tuple(d for d in FRR_KNOWN_DAEMONS if d in enabled and (d == "zebra" or _installed(d)))


def _installed(daemon: str) -> bool:
    return (FRR_BIN / daemon).exists()


def _check_socket_path(path: Path) -> None:
    if len(str(path).encode()) > UNIX_PATH_MAX:
        raise LabError(
            f"socket path {path} is longer than {UNIX_PATH_MAX} bytes; use a shorter --state-dir"
        )
