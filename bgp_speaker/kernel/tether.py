"""Runs a command that must not outlive the agent: ExaBGP, and BIRD on a reflector node.

    tether.py AGENT_PID NETNS_PATH|- COMMAND [ARG...]

A SIGKILLed agent cannot stop its ExaBGP, and an ExaBGP re-parented to PID 1 keeps its
sessions up and keeps announcing a dead node's blocks. So before it becomes ExaBGP (by
exec, same pid) this process asks the kernel for SIGKILL when its parent dies
(PR_SET_PDEATHSIG survives exec), then checks the parent is still AGENT_PID: had the agent
died between the fork and the prctl, the signal would never come. SIGKILL, like the
agent's own restarts: no NOTIFICATION goes out, so graceful-restart peers keep our routes
for their restart time, and every other peer sees the TCP connection close at once. The
relay ExaBGP runs reads ExaBGP's pipe and exits on its EOF.

The kernel's "parent" is the *thread* that forked: the agent starts this from its event
loop's thread, the one that supervises ExaBGP and lives as long as the agent.

It also enters the network namespace (NETNS_PATH; ``-``: stay), so the agent forks from
its own thread without a ``preexec_fn`` and never switches a namespace itself.

Standard library only and nothing imported from the project: it runs with a bare
interpreter before every ExaBGP start.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve()
PR_SET_PDEATHSIG = 1
CLONE_NEWNET = 0x40000000
EXIT_USAGE = 2
EXIT_ORPHANED = 3
EXIT_SETUP = 4


def tie_to_parent(agent_pid: int, libc: ctypes.CDLL) -> bool:
    """Ask for SIGKILL when the parent dies; False if it is already not ``agent_pid``."""
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"prctl(PR_SET_PDEATHSIG): {os.strerror(code)}")
    return os.getppid() == agent_pid


def enter_netns(path: str, libc: ctypes.CDLL) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"setns({path}): {os.strerror(code)}")
    finally:
        os.close(fd)


def tethered(agent_pid: int, netns_path: str | None, command: list[str]) -> list[str]:
    """The argv that runs ``command`` through this script (a bare interpreter: no site)."""
    return [sys.executable, "-I", "-S", str(SCRIPT), str(agent_pid), netns_path or "-", *command]


def main(argv: list[str]) -> int:
    if len(argv) < 4 or not argv[1].isdigit():
        sys.stderr.write("usage: tether.py AGENT_PID NETNS_PATH|- COMMAND [ARG...]\n")
        return EXIT_USAGE
    agent_pid, netns, command = int(argv[1]), argv[2], argv[3:]
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        if not tie_to_parent(agent_pid, libc):
            sys.stderr.write(f"tether: agent {agent_pid} is gone, not starting {command[0]}\n")
            return EXIT_ORPHANED
        if netns != "-":
            enter_netns(netns, libc)
        os.execvp(command[0], command)
    except OSError as err:
        sys.stderr.write(f"tether: {command[0]}: {err}\n")
    return EXIT_SETUP


if __name__ == "__main__":
    sys.exit(main(sys.argv))
