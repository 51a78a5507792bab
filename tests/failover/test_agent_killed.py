"""An agent killed by anything takes its ExaBGP (and its API relay) along, and a restarted
agent ends an ExaBGP a previous one left behind (issue 15, item 2).

On the mesh3 lab: n1's agent is SIGKILLed while n2 and n3 (real agents, real ExaBGP) have
their sessions to it Established; without graceful restart they must drop n1's block within
the hold time, and no process of n1's ExaBGP may be left. One lab for the module, tests in
file order (each leaves n1's agent running again).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from l3fabric.lab import host
from tests.fabric.harness import (
    ADDRESS,
    CONVERGE,
    HOLD,
    Fabric,
    eventually,
    fast_failure_config,
    mesh3_document,
    needs_fabric,
    running_lab,
)

pytestmark = [pytest.mark.root, pytest.mark.slow, needs_fabric]


@pytest.fixture(scope="module")
def fabric(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fabric]:
    tmp = tmp_path_factory.mktemp("h15b-killed")
    with running_lab(tmp, mesh3_document()) as lab:
        changed = time.time()
        with lab.store() as store:
            store.create(fast_failure_config())
        lab.add_pod("n1", "h15b-a1")
        lab.wait_sessions_after(changed)  # renegotiated with the new timers, without GR
        lab.wait_converged()
        yield lab


def exabgp_dir(fabric: Fabric, node: str) -> Path:
    return fabric.paths.node(node).agent_state / "exabgp"


def processes_of(workdir: Path) -> dict[int, str]:
    """Every live process naming the ExaBGP workdir (ExaBGP: its config; the relay: its
    socket), pid -> command line."""
    out: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        argv = host.cmdline(int(entry.name))
        if argv and any(str(workdir) in arg for arg in argv) and host.is_running(int(entry.name)):
            out[int(entry.name)] = " ".join(argv)
    return out


def n1_block(fabric: Fabric) -> str:
    (block,) = fabric.blocks()["n1"]
    return block


def test_a_sigkilled_agent_leaves_no_exabgp_and_peers_drop_its_routes(fabric: Fabric) -> None:
    block = n1_block(fabric)
    for node in ("n2", "n3"):
        assert fabric.route_table(node).get(block) == f"via {ADDRESS['n1']}"
    workdir = exabgp_dir(fabric, "n1")
    before = processes_of(workdir)
    assert any("relay.py" in cmd for cmd in before.values()), before  # the relay is seen
    assert any("exabgp.conf" in cmd for cmd in before.values()), before

    killed = time.monotonic()
    os.kill(fabric.agent_pid("n1"), signal.SIGKILL)
    gone: dict[str, float] = {}
    while len(gone) < 2 and time.monotonic() - killed < HOLD + 10:
        for node in ("n2", "n3"):
            if node not in gone and block not in fabric.route_table(node):
                gone[node] = time.monotonic() - killed
        time.sleep(0.02)
    left = processes_of(workdir)
    print(f"\nn1's agent SIGKILLed: its block left n2 after {gone.get('n2', -1):.2f} s, "
          f"n3 after {gone.get('n3', -1):.2f} s (hold time {HOLD} s)")  # fmt: skip
    assert not left, f"processes of the dead agent still run: {left}"
    assert set(gone) == {"n2", "n3"}, f"n1's block still routed: {fabric.route_table('n2')}"
    assert max(gone.values()) <= HOLD + 1, gone
    for node in ("n2", "n3"):
        assert fabric.peers(node)[ADDRESS["n1"]]["state"] != "established"

    restarted = time.time()
    fabric.restart_agent("n1")
    fabric.wait_sessions_after(restarted, nodes=("n1",))
    fabric.wait_converged(what="the fabric after n1's restart")


def test_a_restarted_agent_ends_the_exabgp_a_previous_one_left(fabric: Fabric) -> None:
    workdir = exabgp_dir(fabric, "n1")
    config = workdir / "exabgp.conf"
    fabric.stop_agent("n1")
    assert not processes_of(workdir)
    # What an agent killed before it could tie ExaBGP to itself left: an ExaBGP on n1's
    # config in n1's namespace, in its pid file, re-parented away from any agent.
    leftover = subprocess.Popen(
        host.in_netns(fabric.netns("n1"), ["exabgp", "server", str(config)]),
        cwd=workdir, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        eventually(
            lambda: [] if str(config) in " ".join(host.cmdline(leftover.pid) or []) else ["no"],
            10,
            "the leftover ExaBGP to run",
        )
        (workdir / "exabgp.pid").write_text(f"{leftover.pid}\n")
        restarted = time.time()
        fabric.restart_agent("n1")
        leftover.wait(timeout=CONVERGE)  # ended by the new agent, not by this test
    finally:
        if leftover.poll() is None:
            leftover.kill()
            leftover.wait()
    fabric.wait_sessions_after(restarted, nodes=("n1",))
    fabric.wait_converged(what="the fabric after n1's restart")
    assert set(processes_of(workdir)) >= {fabric.exabgp_pid("n1")}
