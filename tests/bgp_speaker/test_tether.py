"""kernel/tether.py: what the agent starts ExaBGP (and BIRD) through, so ExaBGP dies with the agent.

The end-to-end proof (a SIGKILLed agent on a real fabric) is in
tests/failover/test_agent_killed.py; these show the mechanism with plain processes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from bgp_speaker.kernel import tether

# A stand-in agent: starts `sleep` through the tether, prints its pid, then waits.
AGENT = f"""
import os, subprocess, sys
child = subprocess.Popen([sys.executable, "-I", "-S", {str(tether.SCRIPT)!r}, str(os.getpid()),
                          "-", "sleep", "60"], start_new_session=True)
print(child.pid, flush=True)
child.wait()
"""


def gone(pid: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state == "Z":
            return True
        time.sleep(0.02)
    return False


def test_the_command_dies_when_the_agent_is_sigkilled() -> None:
    agent = subprocess.Popen([sys.executable, "-c", AGENT], stdout=subprocess.PIPE, text=True)
    assert agent.stdout is not None
    sleeper = int(agent.stdout.readline())
    try:
        time.sleep(0.3)  # the tether has exec'd sleep by now
        assert not gone(sleeper, 0.1)
        assert Path(f"/proc/{sleeper}/cmdline").read_text().split("\0")[0] == "sleep"
        agent.kill()  # its own session: only the parent-death signal can reach it
        agent.wait()
        assert gone(sleeper, 2), "the tethered command outlived its agent"
    finally:
        if not gone(sleeper, 0):
            os.kill(sleeper, signal.SIGKILL)


def test_an_orphan_never_starts_the_command(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    # Our parent is this test, not PID 1: as if the agent died before the prctl.
    done = subprocess.run(
        [sys.executable, "-I", "-S", str(tether.SCRIPT), "1", "-", "touch", str(marker)],
        capture_output=True, text=True, timeout=10,
    )  # fmt: skip
    assert done.returncode == tether.EXIT_ORPHANED, done
    assert "is gone" in done.stderr
    assert not marker.exists()


def test_bad_usage_and_a_missing_namespace_are_refused(tmp_path: Path) -> None:
    usage = subprocess.run([sys.executable, str(tether.SCRIPT), "x", "-", "true"],
                           capture_output=True, text=True, timeout=10)  # fmt: skip
    assert usage.returncode == tether.EXIT_USAGE and "usage" in usage.stderr
    missing = tmp_path / "no-such-netns"
    script = (
        "import subprocess, sys, os; sys.exit(subprocess.run([sys.executable, "
        f"{str(tether.SCRIPT)!r}, str(os.getpid()), {str(missing)!r}, 'true']).returncode)"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=10)  # fmt: skip
    assert done.returncode == tether.EXIT_SETUP, done
    assert str(missing) in done.stderr
