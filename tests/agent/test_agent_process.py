"""The agent as a process: socket, shutdown, restart, introspection ops."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import pytest

from cni import errors
from cni.errors import CniError
from tests.agent.harness import HOST_ADDRESS, NodeHarness, in_netns

pytestmark = pytest.mark.root


def ip_of(result: dict) -> str:
    return result["ips"][0]["address"].split("/")[0]


def pings(netns: str, address: str) -> bool:
    return in_netns(netns, "ping", "-c", "1", "-W", "3", address).returncode == 0


def test_socket_is_private(node: NodeHarness, agent) -> None:
    assert stat.S_IMODE(node.socket.stat().st_mode) == 0o600
    assert stat.S_ISSOCK(node.socket.stat().st_mode)


def test_a_second_agent_on_the_same_socket_refuses(node: NodeHarness, agent) -> None:
    second = subprocess.run(
        node.agent_command(), capture_output=True, text=True, timeout=30, check=False
    )
    assert second.returncode != 0
    assert "another agent is listening" in second.stderr
    assert agent.call("agent.status")["node"] == "node-a"  # the first one is unharmed


def test_status_and_workloads(node: NodeHarness, agent) -> None:
    status = agent.call("agent.status")
    assert status["node"] == "node-a" and status["cni_in_flight"] == 0
    c = node.new_pod("listed")
    result = node.add(c)
    [w] = agent.call("workloads.list")["workloads"]
    assert w == {
        "handleID": f"l3fabric.{c.container_id}",
        "node": "node-a",
        "namespace": "default",
        "pod": "listed",
        "containerID": c.container_id,
        "ifname": "eth0",
        "netns": c.netns,
        "addresses": [ip_of(result)],
    }
    with pytest.raises(CniError) as err:
        agent.call("no.such.op")
    assert err.value.code == errors.INVALID_CONFIG
    node.delete(c)


def test_sigterm_keeps_pods_working_and_a_restarted_agent_deletes_them(
    node: NodeHarness, agent
) -> None:
    c = node.new_pod("survivor")
    result = node.add(c)
    assert agent.stop() == 0, agent.log_text()
    assert "agent stopped" in agent.log_text()
    assert not node.socket.exists()
    # The kernel keeps forwarding without the agent.
    assert pings(node.host_ns, ip_of(result))
    assert pings(Path(c.netns).name, HOST_ADDRESS)

    node.start_agent()
    check = node.cni("CHECK", c, node.conf(prevResult=result))
    assert check.ok, check
    node.delete(c)
    node.assert_nothing_left()


def test_killed_agent_leaves_a_stale_socket_that_the_next_one_replaces(
    node: NodeHarness, agent
) -> None:
    c = node.new_pod("crash")
    node.add(c)
    agent.kill()
    assert node.socket.exists()  # SIGKILL: no cleanup
    node.start_agent()
    node.delete(c)
    node.assert_nothing_left()


def test_bad_agent_flags_exit_2(node: NodeHarness) -> None:
    cmd = [sys.executable, "-m", "l3fabric.cli", "agent", "--node", "Bad_Name"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    assert run.returncode == 2 and "node" in run.stderr
