"""CNI_NETNS paths that are no pod network namespace, through the real plugin and agent: each
gets a clean CNI error at once, leaves nothing behind, and never stalls other pods."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cni import errors
from tests.agent.harness import NodeHarness
from tests.cni.runtime import Container, assert_cni_error

pytestmark = pytest.mark.root

WORKERS = 8  # the agent's default --workers: this many stuck calls would stall every pod
QUICK = 10.0  # seconds: far below the shim's own 60 s timeout


def test_a_fifo_as_netns_is_refused_at_once_and_stalls_nobody(
    node: NodeHarness, agent, tmp_path: Path
) -> None:
    fifo = tmp_path / "not-a-netns"
    os.mkfifo(fifo)
    calls = [Container(f"ctr-fifo-{i}", str(fifo), pod=f"fifo-{i}") for i in range(WORKERS + 2)]
    started = time.monotonic()
    with ThreadPoolExecutor(len(calls)) as pool:
        runs = list(pool.map(lambda c: node.cni("ADD", c), calls))
    assert time.monotonic() - started < QUICK
    for run in runs:
        assert_cni_error(run, errors.NETNS_NOT_FOUND, "not a namespace")

    # The agent's workers are all free: a real pod still gets its address at once.
    started = time.monotonic()
    node.add(node.new_pod("after-fifo"))
    assert time.monotonic() - started < QUICK
    for c in calls:
        node.delete(c)


@pytest.mark.parametrize("kind", ["regular file", "directory", "/dev/null"])
def test_other_non_namespace_paths_are_refused(
    node: NodeHarness, agent, tmp_path: Path, kind: str
) -> None:
    path = {"regular file": tmp_path / "file", "directory": tmp_path, "/dev/null": None}[kind]
    if kind == "regular file":
        path.write_text("")  # type: ignore[union-attr]
    c = Container("ctr-odd", str(path or "/dev/null"), pod="odd")
    assert_cni_error(node.cni("ADD", c), errors.NETNS_NOT_FOUND)
    node.delete(c)
    node.assert_nothing_left()


@pytest.mark.parametrize("which", ["the host's", "the agent's own"])
def test_the_host_network_namespace_is_refused(node: NodeHarness, agent, which: str) -> None:
    # The agent runs in the test's namespace, the host side is a namespace of the harness:
    # in production both are the node's; either must be refused.
    netns = node.host_netns_path if which == "the host's" else f"/proc/{agent.proc.pid}/ns/net"
    c = Container("ctr-host", netns, pod="host")
    assert_cni_error(node.cni("ADD", c), errors.INVALID_CONFIG, "CNI_NETNS", "host")
    node.delete(c)
    node.assert_nothing_left()


def test_del_naming_the_host_namespace_leaves_the_host_veths(node: NodeHarness, agent) -> None:
    pod = node.new_pod("keeps")
    node.add(pod)
    (victim,) = node.host_veths()
    # A DEL that names the host's namespace and one of its veths as the pod's interface.
    node.delete(Container("ctr-other", node.host_netns_path, ifname=victim, pod="other"))
    assert node.host_veths() == [victim]
    node.delete(pod)
    node.assert_nothing_left()
