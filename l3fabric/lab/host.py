"""What the lab does to this host: `ip` commands, commands in namespaces, daemon processes.

The lab shells out to iproute2 rather than using netlink directly: lab setup is not a hot
path, and an `ip` command line in an error message tells the user exactly what failed and
how to retry it by hand. Processes are found again by PID *and* command line (a recycled PID
is never signalled) or by the network namespace they run in.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from l3fabric.lab.errors import CommandFailed

NETNS_DIR = Path("/var/run/netns")
COMMAND_TIMEOUT = 60.0
"""Seconds an `ip` command or an exec line may take before the lab gives up on it."""


def ip(*args: str, what: str = "ip") -> str:
    """Run `ip ARGS...`; its stdout, or CommandFailed with its stderr."""
    return run(["ip", *args], what=what)


def run(
    argv: Sequence[str],
    *,
    what: str,
    env: Mapping[str, str] | None = None,
    stdin: bytes | None = None,
    timeout: float = COMMAND_TIMEOUT,
) -> str:
    try:
        done = subprocess.run(
            list(argv), input=stdin, capture_output=True, env=env, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        raise CommandFailed(what, argv, -1, f"timed out after {timeout:g} s") from None
    except OSError as err:
        raise CommandFailed(what, argv, -1, str(err)) from None
    out = done.stdout.decode(errors="replace")
    if done.returncode != 0:
        raise CommandFailed(what, argv, done.returncode, out + done.stderr.decode(errors="replace"))
    return out


def run_logged(
    argv: Sequence[str],
    *,
    what: str,
    env: Mapping[str, str],
    log: Path,
    timeout: float = COMMAND_TIMEOUT,
) -> None:
    """Run `argv` with its output appended to `log`. A file, not a pipe: a command that
    leaves a background process behind (`sh -c 'daemon &'`) would hold a pipe open, and
    waiting for its end would hang."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        out.write(f"$ {' '.join(argv)}\n".encode())
        out.flush()
        start = out.tell()
        try:
            done = subprocess.run(
                list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env=dict(env), timeout=timeout, check=False,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            raise CommandFailed(what, argv, -1, f"timed out after {timeout:g} s") from None
        except OSError as err:
            raise CommandFailed(what, argv, -1, str(err)) from None
    if done.returncode != 0:
        with open(log, "rb") as back:
            back.seek(start)
            output = back.read().decode(errors="replace")
        raise CommandFailed(what, argv, done.returncode, output)


def in_netns(netns: str, argv: Sequence[str]) -> list[str]:
    """The command line that runs `argv` inside `netns`."""
    return ["ip", "netns", "exec", netns, *argv]


# --- network namespaces ----------------------------------------------------------------------


def netns_path(name: str) -> Path:
    return NETNS_DIR / name


def netns_exists(name: str) -> bool:
    return netns_path(name).exists()


def add_netns(name: str) -> None:
    """Create a namespace with its loopback up."""
    ip("netns", "add", name, what=f"create network namespace {name}")
    ip("-n", name, "link", "set", "lo", "up", what=f"bring up lo in {name}")


def delete_netns(name: str) -> None:
    """Delete a namespace if it exists; its veths and bridges go with it."""
    if netns_exists(name):
        ip("netns", "del", name, what=f"delete network namespace {name}")


def netns_pids(name: str) -> list[int]:
    """PIDs of the processes running in namespace `name` (none if it does not exist)."""
    if not netns_exists(name):
        return []
    out = ip("netns", "pids", name, what=f"list processes in {name}")
    return [int(x) for x in out.split()]


# --- processes -------------------------------------------------------------------------------


def spawn(argv: Sequence[str], *, env: Mapping[str, str], log: Path) -> int:
    """Start a detached process (own session: it outlives `lab up`), output to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            env=dict(env), start_new_session=True,
        )  # fmt: skip
    return proc.pid


def cmdline(pid: int) -> list[str] | None:
    """A process's command line; None if it is gone (or a zombie, whose cmdline is empty)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [x.decode(errors="replace") for x in raw.split(b"\0")[:-1]] or None


def is_running(pid: int) -> bool:
    """Alive and not a zombie (a zombie's parent may not have reaped it yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def matches(pid: int, argv: Sequence[str]) -> bool:
    """Is `pid` still the process that was started as `argv` (possibly via `ip netns exec`)?"""
    seen = cmdline(pid)
    return seen is not None and (seen == list(argv) or seen[-len(argv) :] == list(argv))


def stop(pids: Iterable[int], timeout: float = 10.0) -> list[int]:
    """SIGTERM, then SIGKILL after `timeout`; the PIDs still running after that."""
    pending = [p for p in dict.fromkeys(pids) if is_running(p)]
    for pid in pending:
        _signal(pid, signal.SIGTERM)
    pending = _wait_gone(pending, timeout)
    for pid in pending:
        _signal(pid, signal.SIGKILL)
    return _wait_gone(pending, 5.0)


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        for pid in pids:
            _reap(pid)
        pids = [p for p in pids if is_running(p)]
        if not pids or time.monotonic() >= deadline:
            return pids
        time.sleep(0.05)


def _reap(pid: int) -> None:
    # When `lab up` ran in this process (tests, the demo) its daemons are our children: reap
    # them, or they linger as zombies. Anyone else's child is not ours to wait for.
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)
