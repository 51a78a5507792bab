"""The installed plugin executed exactly as a runtime executes it (env + stdin, a fresh
process per call) against a running agent with an embedded store, on real namespaces."""

from __future__ import annotations

import json
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from bgp_speaker.pods import dataplane
from cni import errors
from ipam_blocks.allocator import AssignRequest
from tests.agent.harness import HOST_ADDRESS, NODE, NodeHarness, in_netns, run_ip
from tests.cni.runtime import REFERENCE_PLUGINS, ConflistRuntime, Container, assert_cni_error

pytestmark = pytest.mark.root
MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


def ns_name(c: Container) -> str:
    return Path(c.netns).name


def ip_of(result: dict) -> str:
    return result["ips"][0]["address"].split("/")[0]


def assert_pings(netns: str, address: str) -> None:
    run = in_netns(netns, "ping", "-c", "1", "-W", "3", address)
    assert run.returncode == 0, f"{netns} cannot reach {address}: {run.stdout}{run.stderr}"


# --- the dataplane works -------------------------------------------------------------------


def test_pods_reach_each_other_and_the_host(node: NodeHarness, agent) -> None:
    a, b = node.new_pod("pa"), node.new_pod("pb")
    ra, rb = node.add(a), node.add(b)

    mac = run_ip("-o", "link", "show", "eth0", netns=ns_name(a)).split("link/ether ")[1][:17]
    assert ra == {
        "cniVersion": "1.0.0",
        "interfaces": [
            {"name": dataplane.host_veth_name("default", "pa"), "mac": "ee:ee:ee:ee:ee:ee"},
            {"name": "eth0", "mac": mac, "sandbox": a.netns},
        ],
        "ips": [{"address": f"{ip_of(ra)}/32", "gateway": "169.254.1.1", "interface": 1}],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dns": {},
    }
    assert ip_of(ra) != ip_of(rb)
    assert_pings(ns_name(a), ip_of(rb))
    assert_pings(ns_name(b), ip_of(ra))
    assert_pings(ns_name(a), HOST_ADDRESS)
    assert_pings(node.host_ns, ip_of(ra))
    assert_pings(node.host_ns, ip_of(rb))

    node.delete(a)
    node.delete(b)
    node.assert_nothing_left()


def test_result_for_a_0_4_0_config_has_ip_versions(node: NodeHarness, agent) -> None:
    c = node.new_pod("old")
    result = node.add(c, cniVersion="0.4.0", mtu=1400)
    assert result["cniVersion"] == "0.4.0"
    assert result["ips"] == [
        {"version": "4", "address": f"{ip_of(result)}/32", "gateway": "169.254.1.1",
         "interface": 1}
    ]  # fmt: skip
    assert "mtu 1400" in run_ip("link", "show", "eth0", netns=ns_name(c))
    node.delete(c, cniVersion="0.4.0")
    node.assert_nothing_left()


def ipv4_only_tools(tmp: Path) -> Path:
    """A PATH with iptables but no ip6tables, as on an IPv4-only node.

    Debian's portmap (plugins 1.1.1) fails CHECK for any IPv4-only pod when ip6tables works:
    it looks for IPv6 DNAT chains that ADD never created (containernetworking/plugins#819,
    fixed upstream later; reproduced here with bridge + portmap alike). Without ip6tables it
    checks IPv4 only, which is all an IPv4 pod has.
    """
    tools = tmp / "ipv4-tools"
    tools.mkdir()
    for tool in ("iptables", "iptables-save", "iptables-restore"):
        (tools / tool).symlink_to(shutil.which(tool) or f"/usr/sbin/{tool}")
    return tools


def test_chain_with_tuning_and_portmap(node: NodeHarness, agent, tmp_path: Path) -> None:
    """The conflist `cni install` wrote (l3fabric -> tuning -> portmap), run like libcni,
    the plugins inside the host's namespace where a runtime runs them."""
    conflist = json.loads(node.conflist.read_text())
    assert [p["type"] for p in conflist["plugins"]] == ["l3fabric", "tuning", "portmap"]
    runtime = ConflistRuntime(
        conflist,
        cni_path=[REFERENCE_PLUGINS, node.plugin.parent],
        wrapper=["/usr/sbin/ip", "netns", "exec", node.host_ns],
        runtime_config={
            "portMappings": [{"hostPort": 18080, "containerPort": 80, "protocol": "tcp"}]
        },
        extra_env={"PATH": str(ipv4_only_tools(tmp_path))},
    )
    c = node.new_pod("chained")
    result = runtime.add(c)
    assert result["interfaces"][1]["sandbox"] == c.netns
    assert in_netns(ns_name(c), "sysctl", "-n", "net.core.somaxconn").stdout.strip() == "1024"
    nat = in_netns(node.host_ns, "iptables-save", "-t", "nat").stdout
    assert "18080" in nat and ip_of(result) in nat

    runtime.check(c, result)

    runtime.delete(c, result)
    assert "18080" not in in_netns(node.host_ns, "iptables-save", "-t", "nat").stdout
    node.assert_nothing_left()


# --- idempotency -----------------------------------------------------------------------------


def test_repeated_add_returns_the_same_result_and_allocates_nothing(
    node: NodeHarness, agent
) -> None:
    c = node.new_pod("again")
    first = node.add(c)
    assert node.add(c) == first
    assert len(node.allocated()) == 1
    node.delete(c)
    node.delete(c)  # DEL twice: success
    node.assert_nothing_left()


def test_del_of_unknown_container_and_of_a_vanished_netns_succeeds(
    node: NodeHarness, agent
) -> None:
    node.delete(Container("never-added", "/var/run/netns/none-such", pod="ghost"))
    c = node.new_pod("vanish")
    node.add(c)
    node.delete_netns(ns_name(c))
    node.delete(c)
    node.assert_nothing_left()


def test_check_reports_a_removed_address_and_a_removed_route(node: NodeHarness, agent) -> None:
    a, b = node.new_pod("cka"), node.new_pod("ckb")
    ra, rb = node.add(a), node.add(b)
    for c, result in ((a, ra), (b, rb)):
        run = node.cni("CHECK", c, node.conf(prevResult=result))
        assert run.ok and not run.stdout.strip(), run

    run_ip("addr", "del", f"{ip_of(ra)}/32", "dev", "eth0", netns=ns_name(a))
    run = node.cni("CHECK", a, node.conf(prevResult=ra))
    assert_cni_error(run, errors.CHECK_FAILED, f"address {ip_of(ra)}/32 missing")

    run_ip("route", "del", f"{ip_of(rb)}/32", netns=node.host_ns)
    run = node.cni("CHECK", b, node.conf(prevResult=rb))
    assert_cni_error(run, errors.CHECK_FAILED, f"host route {ip_of(rb)}/32: missing")

    node.delete(a)
    node.delete(b)
    node.assert_nothing_left()


# --- bad input: the right code, and nothing left behind --------------------------------------


@pytest.mark.parametrize("var", ["CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME",
                                 "CNI_PATH"])  # fmt: skip
def test_missing_environment_variable(node: NodeHarness, agent, var: str) -> None:
    run = node.cni("ADD", node.new_pod("env"), env={var: None})
    assert_cni_error(run, errors.INVALID_ENV, var)
    node.assert_nothing_left()


@pytest.mark.parametrize(
    ("stdin", "code", "words"),
    [
        (b'{"cniVersion": "1.0.0", "name": ', errors.UNDECODABLE_CONFIG, ["decode"]),
        (b"", errors.UNDECODABLE_CONFIG, ["decode"]),
        (b'{"cniVersion": "9.9.9", "name": "l3fabric"}', errors.INCOMPATIBLE_VERSION, ["9.9.9"]),
        (b'{"cniVersion": "1.0.0", "name": "l3fabric", "mtu": "big"}', errors.INVALID_CONFIG,
         ["mtu"]),
        (b'{"cniVersion": "1.0.0"}', errors.INVALID_CONFIG, ["name"]),
        (b'{"cniVersion": "1.0.0", "name": "l3fabric", "ipam": {"pools": ["nope"]}}',
         errors.INVALID_CONFIG, ["nope"]),
    ],
)  # fmt: skip
def test_bad_configuration(node: NodeHarness, agent, stdin: bytes, code: int, words) -> None:
    if b'"name"' in stdin and b'"socket"' not in stdin:  # point the valid ones at our agent
        stdin = stdin.replace(b"{", b'{"socket": "%s", ' % str(node.socket).encode(), 1)
    run = node.cni("ADD", node.new_pod("bad"), stdin)
    assert_cni_error(run, code, *words)
    node.assert_nothing_left()


def test_nonexistent_netns_allocates_nothing(node: NodeHarness, agent) -> None:
    c = Container("ctr-nonet", "/var/run/netns/l3t-does-not-exist", pod="nonet")
    run = node.cni("ADD", c)
    assert_cni_error(run, errors.NETNS_NOT_FOUND, "does not exist")
    node.assert_nothing_left()


def test_full_pool(node: NodeHarness, agent) -> None:
    pods = [node.new_pod(f"full{i}") for i in range(5)]
    for c in pods[:4]:  # the tiny pool is one /30 block: four addresses
        node.add(c, ipam={"pools": ["tiny"]})
    run = node.cni("ADD", pods[4], node.conf(ipam={"pools": ["tiny"]}))
    assert_cni_error(run, errors.POOL_EXHAUSTED, "pool exhausted", "tiny")
    assert len(node.allocated()) == 4 and len(node.records()) == 4
    assert dataplane.host_veth_name("default", "full4") not in node.host_veths()
    assert node.ipam_check().clean
    for c in pods[:4]:
        node.delete(c, ipam={"pools": ["tiny"]})
    node.assert_nothing_left()


def test_agent_down(node: NodeHarness) -> None:
    c = node.new_pod("down")
    assert_cni_error(node.cni("ADD", c), errors.TRY_AGAIN_LATER, "agent unreachable")
    assert_cni_error(node.cni("DEL", c), errors.TRY_AGAIN_LATER)
    status = node.cni("STATUS", None, node.conf(cniVersion="1.1.0"))
    assert_cni_error(status, errors.NOT_AVAILABLE, "agent unreachable")


# --- CNI 1.1: STATUS and GC ------------------------------------------------------------------


def test_status(node: NodeHarness, agent) -> None:
    run = node.cni("STATUS", None, node.conf(cniVersion="1.1.0"))
    assert run.ok and not run.stdout.strip(), run
    run = node.cni("STATUS", None, node.conf(cniVersion="1.1.0", ipam={"pools": ["nope"]}))
    assert_cni_error(run, errors.NOT_AVAILABLE, "nope")


def test_gc_releases_what_the_runtime_no_longer_lists(node: NodeHarness, agent) -> None:
    keep, drop = node.new_pod("keep"), node.new_pod("drop")
    v11 = {"cniVersion": "1.1.0"}
    kept = node.add(keep, **v11)
    node.add(drop, **v11)
    # An allocation without a record: an ADD that crashed before it wrote one.
    node.ipam.auto_assign(AssignRequest(node=NODE, handle_id="l3fabric.crashed"))
    valid = [{"containerID": keep.container_id, "ifname": "eth0"}]
    run = node.cni("GC", None, node.conf(**v11, **{"cni.dev/valid-attachments": valid}))
    assert run.ok and not run.stdout.strip(), run
    assert node.allocated() == [ip_of(kept)]
    assert node.host_veths() == [dataplane.host_veth_name("default", "keep")]
    assert [r.pod for r in node.records()] == ["keep"]
    node.delete(keep, **v11)
    node.assert_nothing_left()


# --- scale -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_200_pods_added_and_deleted_leave_nothing(node: NodeHarness, agent) -> None:
    names = [f"s{i}" for i in range(200)]
    node.new_netns_batch(names)
    pods = [
        Container(f"ctr-{node.prefix}-{n}", node.netns_path(f"{node.prefix}-{n}"), pod=n)
        for n in names
    ]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(node.add, pods))
    assert len({ip_of(r) for r in results}) == 200
    assert len(node.host_veths()) == 200 and len(node.host_routes()) == 200
    assert node.ipam_check().clean
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(node.delete, pods))
    node.assert_nothing_left()
