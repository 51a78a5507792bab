"""One IPAM handle per (container ID, interface), through the installed plugin against a
running agent on real namespaces: container IDs that differ only in case, a second
interface of one container, and a failed repeated ADD never take a running pod's address."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from itertools import count
from pathlib import Path

import pytest

from cni import errors
from tests.agent.harness import HOST_ADDRESS, REPO, AgentProcess, NodeHarness, node_harness
from tests.cni.runtime import assert_cni_error
from tests.cni.test_plugin import assert_pings, ip_of, ns_name

pytestmark = pytest.mark.root
_ids = count()


@pytest.fixture
def node(tmp_path: Path) -> Iterator[NodeHarness]:
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces")
    with node_harness(tmp_path, prefix=f"h15a{os.getpid() % 10000}x{next(_ids)}") as harness:
        yield harness


def ipam_check_cli(node: NodeHarness) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "l3fabric.cli", "--store", f"sqlite:{node.store_path}",
         "ipam", "check"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_container_ids_differing_only_in_case_get_their_own_addresses(
    node: NodeHarness, agent: AgentProcess
) -> None:
    upper = replace(node.new_pod("pu"), container_id=f"ABCD-{node.prefix}".upper())
    lower = replace(node.new_pod("pl"), container_id=f"abcd-{node.prefix}".lower())

    ru = node.add(upper)
    rl = node.add(lower)

    assert ip_of(ru) != ip_of(rl)
    assert sorted(node.allocated()) == sorted([ip_of(ru), ip_of(rl)])
    assert sorted(w.container_id for w in node.records()) == sorted(
        [upper.container_id, lower.container_id]
    )
    for pod, other in ((upper, rl), (lower, ru)):
        assert_pings(ns_name(pod), ip_of(other))
        assert_pings(ns_name(pod), HOST_ADDRESS)
    check = ipam_check_cli(node)
    assert check.returncode == 0, check.stdout + check.stderr

    node.delete(lower)  # must not touch the pod whose ID differs only in case
    assert node.allocated() == [ip_of(ru)]
    assert_pings(ns_name(upper), HOST_ADDRESS)
    assert node.ipam_check().clean, node.ipam_check().to_dict()

    node.delete(upper)
    node.assert_nothing_left()


def test_del_of_a_refused_second_interface_leaves_the_first_alone(
    node: NodeHarness, agent: AgentProcess
) -> None:
    pod = node.new_pod("two")
    first = node.add(pod)
    second = replace(pod, ifname="eth1")

    assert_cni_error(node.cni("ADD", second), errors.ATTACHMENT_CONFLICT, "eth0")
    run = node.cni("DEL", second)  # what a runtime does after a failed ADD
    assert run.ok, run

    assert node.allocated() == [ip_of(first)]
    assert [w.ifname for w in node.records()] == ["eth0"]
    assert_pings(ns_name(pod), HOST_ADDRESS)
    assert node.ipam_check().clean

    node.delete(pod)
    node.assert_nothing_left()


def test_a_failed_repeated_add_keeps_the_running_pods_address(
    node: NodeHarness, agent: AgentProcess
) -> None:
    pod = node.new_pod("again")
    first = node.add(pod)

    run = node.cni("ADD", replace(pod, netns=f"{pod.netns}-gone"))
    assert not run.ok, run

    assert node.allocated() == [ip_of(first)]
    assert [w.addresses for w in node.records()] == [(ip_of(first),)]
    assert_pings(ns_name(pod), HOST_ADDRESS)
    assert node.ipam_check().clean

    node.delete(pod)
    node.assert_nothing_left()


def test_ipam_check_finds_a_live_pods_address_free_in_ipam(
    node: NodeHarness, agent: AgentProcess
) -> None:
    pod = node.new_pod("lost")
    ip = ip_of(node.add(pod))
    (record,) = node.records()
    node.ipam.release_handle(record.handle_id)  # the loss a shared handle used to cause

    check = ipam_check_cli(node)

    assert check.returncode == 1, check.stdout + check.stderr
    assert "addresses not held: 1" in check.stdout, check.stdout
    assert f"{ip} used by pod default/lost interface eth0" in check.stdout, check.stdout
    assert "but free in IPAM" in check.stdout, check.stdout
    node.delete(pod)
    node.assert_nothing_left()
