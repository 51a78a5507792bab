"""What each role runs: command lines are planned without touching the machine."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from l3fabric.lab import daemons
from l3fabric.lab.daemons import (
    FRR_DEFAULT_DAEMONS,
    Readiness,
    frr_daemon_names,
    frr_load_argv,
    plan_daemons,
)
from l3fabric.lab.errors import LabError
from l3fabric.lab.layout import LabPaths
from l3fabric.lab.topology import Bind, LabNode, Role

DIRS = LabPaths(Path("/run/lab/t")).node("n")


def node(role: Role, binds: tuple[Bind, ...] = ()) -> LabNode:
    return LabNode("n", "linux", "img", role, binds=binds)


def test_agent() -> None:
    [agent] = plan_daemons(node(Role.AGENT), "t-n", DIRS, "sqlite:/s.db", None)
    assert agent.argv[:3] == (sys.executable, "-m", "l3fabric.cli")
    assert agent.argv[3:] == (
        "--log-level", "info", "agent", "--node", "n", "--store", "sqlite:/s.db",
        "--socket", "/run/lab/t/nodes/n/agent.sock", "--state-dir", "/run/lab/t/nodes/n/agent",
    )  # fmt: skip
    assert agent.readiness == Readiness.AGENT_ANSWERS


def test_frr_instances_are_named() -> None:
    daemons = plan_daemons(node(Role.FRR), "t-n", DIRS, "", None)
    assert [d.name for d in daemons] == list(FRR_DEFAULT_DAEMONS)
    assert daemons[0].argv == ("/usr/lib/frr/zebra", "-N", "t-n", "-A", "127.0.0.1")
    assert daemons[0].ready_socket == Path("/var/run/frr/t-n/zebra.vty")
    assert frr_load_argv("t-n", DIRS) == (
        "vtysh", "-N", "t-n", "--config_dir", "/run/lab/t/nodes/n/frr", "-b",
    )  # fmt: skip


def test_frr_daemons_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(daemons, "_installed", lambda name: name != "pim6d")  # FRR 8.4 has none
    text = 'bgpd=yes\nospfd=no\nisisd="yes"\n# ripd=yes\nvtysh_enable=yes\nzebra_options="-A"'
    names = frr_daemon_names(text)
    assert names[0] == "zebra" and "bgpd" in names and "ospfd" not in names
    assert "ripd" not in names and "vtysh_enable" not in names
    assert "pim6d" not in frr_daemon_names("pim6d=yes")  # not installed: not started


def test_bird() -> None:
    conf = Bind(Path("/cfg/bird.conf"), "/etc/bird/bird.conf")
    [bird] = plan_daemons(node(Role.BIRD, (conf,)), "t-n", DIRS, "", None)
    assert bird.argv == (
        "bird", "-f", "-c", "/cfg/bird.conf", "-s", "/run/lab/t/nodes/n/bird.ctl",
        "-P", "/run/lab/t/nodes/n/bird.pid",
    )  # fmt: skip


def test_plain_nodes_and_bridges_run_nothing() -> None:
    assert plan_daemons(node(Role.LINUX), "t-n", DIRS, "", None) == []
    assert plan_daemons(node(Role.BRIDGE), "t-n", DIRS, "", None) == []


def test_socket_paths_must_fit() -> None:
    deep = LabPaths(Path("/" + "d" * 100)).node("n")
    with pytest.raises(LabError, match="shorter --state-dir"):
        plan_daemons(node(Role.AGENT), "t-n", deep, "sqlite:/s.db", None)
