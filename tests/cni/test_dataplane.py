"""The pod dataplane against real network namespaces, veths and routes — no mocks.

The "host" is a namespace of its own (``host_netns=``), so the machine's real host
namespace is never touched: it has an address on lo (10.99.0.1) and an uplink veth pair, and
no default route, as on an isolated fabric: the pods' gateway must not depend on the host's
routing table.
Every namespace is created by a fixture and deleted by name in its teardown.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from netaddr import IPAddress, IPNetwork

from bgp_speaker.pods import dataplane as dp

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and iproute2"
)


def root(fn):
    """Real namespaces and netlink: marked `root`, skipped when not root."""
    return pytest.mark.root(needs_root(fn))


needs_ping = pytest.mark.skipif(shutil.which("ping") is None, reason="needs iputils-ping")

HOST_ADDR = IPAddress("10.99.0.1")
_names = itertools.count()


def sh(*args: str, check: bool = True) -> str:
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


def ns_path(name: str) -> str:
    return f"/var/run/netns/{name}"


def ip_json(ns: str, *args: str) -> list[dict]:
    return json.loads(sh("ip", "-n", ns, "-j", *args) or "[]")


def links(ns: str) -> dict[str, dict]:
    return {link["ifname"]: link for link in ip_json(ns, "-d", "link", "show")}


def ping(ns: str, target: IPAddress) -> bool:
    done = subprocess.run(
        ["ip", "netns", "exec", ns, "ping", "-c", "1", "-W", "2", str(target)],
        capture_output=True,
        check=False,
    )
    return done.returncode == 0


@pytest.fixture
def make_netns() -> Iterator[Callable[[], str]]:
    """Factory of fresh namespaces (returns the name); all deleted at teardown."""
    created: list[str] = []

    def make() -> str:
        name = f"l3fdp-{os.getpid()}-{next(_names)}"
        sh("ip", "netns", "add", name)
        created.append(name)
        sh("ip", "-n", name, "link", "set", "lo", "up")
        return name

    try:
        yield make
    finally:
        for name in created:
            sh("ip", "netns", "del", name, check=False)


@pytest.fixture
def host(make_netns: Callable[[], str]) -> str:
    name = make_netns()
    sh("ip", "-n", name, "addr", "add", f"{HOST_ADDR}/32", "dev", "lo")
    sh("ip", "-n", name, "link", "add", "uplink", "type", "veth", "peer", "name", "uplinkpeer")
    sh("ip", "-n", name, "link", "set", "uplink", "up")
    sh("ip", "-n", name, "link", "set", "uplinkpeer", "up")
    dp.enable_host_forwarding(host_netns=ns_path(name))
    return name


def attach(host: str, pod_ns: str, pod: str, *addrs: str, mtu: int = 1400) -> dp.PodAttachment:
    return dp.attach_pod(
        ns_path(pod_ns),
        "eth0",
        dp.host_veth_name("default", pod),
        [IPAddress(a) for a in addrs],
        mtu,
        host_netns=ns_path(host),
    )


def our_links(ns: str) -> list[str]:
    return [name for name in links(ns) if name.startswith(dp.HOST_VETH_PREFIX)]


# ------------------------------------------------------------------------------ pure


def test_host_veth_name_is_short_stable_and_distinct() -> None:
    name = dp.host_veth_name("kube-system", "coredns-5d78c9869d-abcde")
    assert name == dp.host_veth_name("kube-system", "coredns-5d78c9869d-abcde")
    assert name.startswith(dp.HOST_VETH_PREFIX)
    assert len(name) <= 15
    # "a.b"+"c" and "a"+"b.c" join to the same string; different pods must still differ
    assert dp.host_veth_name("default", "web-1") != dp.host_veth_name("default", "web-2")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"container_ifname": "x" * 16}, "container_ifname"),
        ({"container_ifname": "a/b"}, "container_ifname"),
        ({"host_ifname": ""}, "host_ifname"),
        ({"mtu": 60}, "mtu"),
        ({"mtu": 1000, "addresses": [IPAddress("fd00::5")]}, "mtu"),
        ({"addresses": []}, "addresses"),
        ({"addresses": ["not-an-ip"]}, "addresses"),
    ],
)
def test_invalid_arguments_are_rejected_before_touching_anything(kwargs: dict, field: str) -> None:
    args = {
        "netns": "/nonexistent/netns",
        "container_ifname": "eth0",
        "host_ifname": "l3fabc",
        "addresses": [IPAddress("10.1.0.5")],
        "mtu": 1500,
    } | kwargs
    with pytest.raises(dp.InvalidAttachment) as err:
        dp.attach_pod(**args)
    assert err.value.field == field


# ------------------------------------------------------------------------- real netns


@root
@needs_ping
def test_two_pods_reach_each_other_and_the_host(host: str, make_netns) -> None:
    pod_a, pod_b = make_netns(), make_netns()
    attach(host, pod_a, "a", "10.1.0.5")
    attach(host, pod_b, "b", "10.1.0.6")

    assert ping(pod_a, IPAddress("10.1.0.6")), "pod a -> pod b"
    assert ping(pod_b, IPAddress("10.1.0.5")), "pod b -> pod a"
    assert ping(pod_a, HOST_ADDR), "pod -> host"
    assert ping(host, IPAddress("10.1.0.6")), "host -> pod"
    # the pod resolved its gateway through proxy ARP, to the fixed host MAC
    neigh = ip_json(pod_a, "neigh", "show", "169.254.1.1")
    assert neigh and neigh[0]["lladdr"] == dp.HOST_VETH_MAC


@root
def test_attachment_is_configured_exactly(host: str, make_netns) -> None:
    pod = make_netns()
    att = attach(host, pod, "a", "10.1.0.5", mtu=1410)

    host_link = links(host)[att.host_ifname]
    pod_link = links(pod)["eth0"]
    assert host_link["address"] == dp.HOST_VETH_MAC
    assert host_link["mtu"] == pod_link["mtu"] == 1410
    assert "UP" in host_link["flags"] and "UP" in pod_link["flags"]
    assert pod_link["address"] == att.container_mac
    proxy_arp = sh(
        "ip", "netns", "exec", host, "cat", f"/proc/sys/net/ipv4/conf/{att.host_ifname}/proxy_arp"
    )
    assert proxy_arp.strip() == "1"

    host_routes = ip_json(host, "route", "show", "10.1.0.5/32")
    assert host_routes == [
        {
            "dst": "10.1.0.5",
            "dev": att.host_ifname,
            "protocol": str(dp.ROUTE_PROTOCOL),
            "scope": "link",
            "flags": [],
        }
    ]
    assert sh("ip", "-n", pod, "route").splitlines() == [
        "default via 169.254.1.1 dev eth0 ",
        "169.254.1.1 dev eth0 scope link ",
    ]
    # The gateway needs no ARP, so no help from the host's routing table.
    assert [
        line.strip() for line in sh("ip", "-n", pod, "neigh", "show", "169.254.1.1").splitlines()
    ] == [f"169.254.1.1 dev eth0 lladdr {dp.HOST_VETH_MAC} PERMANENT"]
    pod_addrs = [(a["local"], a["prefixlen"]) for a in pod_addr_info(pod, "inet")]
    assert pod_addrs == [("10.1.0.5", 32)]

    assert att == dp.PodAttachment(
        att.host_ifname,
        "eth0",
        ns_path(pod),
        pod_link["address"],
        (IPNetwork("10.1.0.5/32"),),
        1410,
    )
    assert dp.inspect_pod(att, host_netns=ns_path(host)) == []
    assert dp.list_host_routes(host_netns=ns_path(host)) == {
        IPNetwork("10.1.0.5/32"): att.host_ifname
    }


def pod_addr_info(ns: str, family: str) -> list[dict]:
    return [
        info
        for link in ip_json(ns, "addr", "show", "dev", "eth0")
        for info in link["addr_info"]
        if info["family"] == family and info.get("scope") != "link"
    ]


@root
@needs_ping
def test_dual_stack_pod(host: str, make_netns) -> None:
    pod_a, pod_b = make_netns(), make_netns()
    att = attach(host, pod_a, "a", "10.1.0.5", "fd00:10::5")
    attach(host, pod_b, "b", "10.1.0.6", "fd00:10::6")

    assert [(a["local"], a["prefixlen"]) for a in pod_addr_info(pod_a, "inet6")] == [
        ("fd00:10::5", 128)
    ]
    v6_routes = sh("ip", "-n", pod_a, "-6", "route", "show", "default")
    assert v6_routes.strip() == f"default via {dp.GATEWAY_V6} dev eth0 metric 1024 pref medium"
    assert ping(pod_a, IPAddress("fd00:10::6")), "pod a -> pod b over IPv6"
    assert dp.inspect_pod(att, host_netns=ns_path(host)) == []
    assert IPNetwork("fd00:10::5/128") in dp.list_host_routes(host_netns=ns_path(host))


@root
def test_v4_only_pod_has_ipv6_disabled_on_host_veth(host: str, make_netns) -> None:
    att = attach(host, make_netns(), "a", "10.1.0.5")
    path = f"/proc/sys/net/ipv6/conf/{att.host_ifname}/disable_ipv6"
    assert sh("ip", "netns", "exec", host, "cat", path).strip() == "1"


# --------------------------------------------------------------------------- idempotence


@root
def test_attach_twice_returns_the_same_attachment_without_rebuilding(host: str, make_netns) -> None:
    pod = make_netns()
    first = attach(host, pod, "a", "10.1.0.5")
    index = links(host)[first.host_ifname]["ifindex"]

    assert attach(host, pod, "a", "10.1.0.5") == first
    assert links(host)[first.host_ifname]["ifindex"] == index


@root
def test_attach_repairs_a_broken_setup(host: str, make_netns) -> None:
    pod = make_netns()
    attach(host, pod, "a", "10.1.0.5")
    sh("ip", "-n", pod, "route", "del", "default")

    again = attach(host, pod, "a", "10.1.0.5")
    assert dp.inspect_pod(again, host_netns=ns_path(host)) == []


@root
def test_a_lost_gateway_neighbour_is_reported_and_repaired(host: str, make_netns) -> None:
    pod = make_netns()
    att = attach(host, pod, "a", "10.1.0.5")
    sh("ip", "-n", pod, "neigh", "del", "169.254.1.1", "dev", "eth0")

    assert dp.inspect_pod(att, host_netns=ns_path(host)) == [
        f"eth0 in {ns_path(pod)}: gateway 169.254.1.1 is not a permanent neighbour at "
        f"{dp.HOST_VETH_MAC} (have none)"
    ]
    again = attach(host, pod, "a", "10.1.0.5")
    assert dp.inspect_pod(again, host_netns=ns_path(host)) == []


@root
def test_stale_host_veth_of_a_recreated_pod_is_replaced(host: str, make_netns) -> None:
    old_ns, new_ns = make_netns(), make_netns()
    old = attach(host, old_ns, "a", "10.1.0.5")

    new = attach(host, new_ns, "a", "10.1.0.7")
    assert new.host_ifname == old.host_ifname
    assert "eth0" not in links(old_ns)
    assert dp.inspect_pod(new, host_netns=ns_path(host)) == []
    assert dp.list_host_routes(host_netns=ns_path(host)) == {
        IPNetwork("10.1.0.7/32"): new.host_ifname
    }


@root
def test_detach_is_idempotent(host: str, make_netns) -> None:
    pod = make_netns()
    att = attach(host, pod, "a", "10.1.0.5")

    for _ in range(2):
        dp.detach_pod(att.host_ifname, att.netns, "eth0", host_netns=ns_path(host))
        assert our_links(host) == []
        assert "eth0" not in links(pod)
        assert dp.list_host_routes(host_netns=ns_path(host)) == {}
    dp.detach_pod(att.host_ifname, None, "eth0", host_netns=ns_path(host))


@root
def test_detach_after_the_pod_netns_is_gone(host: str, make_netns) -> None:
    pod = make_netns()
    att = attach(host, pod, "a", "10.1.0.5")
    sh("ip", "netns", "del", pod)

    dp.detach_pod(att.host_ifname, att.netns, "eth0", host_netns=ns_path(host))
    dp.detach_pod(att.host_ifname, att.netns, "eth0", host_netns=ns_path(host))
    assert our_links(host) == []
    assert dp.list_host_routes(host_netns=ns_path(host)) == {}


@root
def test_detach_removes_a_pod_veth_whose_host_end_has_another_name(host: str, make_netns) -> None:
    pod = make_netns()
    att = attach(host, pod, "a", "10.1.0.5")
    sh("ip", "-n", host, "link", "set", att.host_ifname, "name", "oldscheme0")

    dp.detach_pod(att.host_ifname, att.netns, "eth0", host_netns=ns_path(host))
    assert "eth0" not in links(pod)
    assert "oldscheme0" not in links(host)


# ------------------------------------------------------------------------------ failure


@root
def test_missing_netns_raises_and_creates_nothing(host: str, tmp_path) -> None:
    with pytest.raises(dp.NetnsNotFound, match="does not exist"):
        attach(host, "l3fdp-never-created", "a", "10.1.0.5")
    not_a_netns = tmp_path / "plain-file"
    not_a_netns.write_text("")
    with pytest.raises(dp.NetnsNotFound, match="not a namespace"):
        dp.attach_pod(
            str(not_a_netns),
            "eth0",
            "l3fplain",
            [IPAddress("10.1.0.5")],
            1500,
            host_netns=ns_path(host),
        )
    assert our_links(host) == []
    assert dp.list_host_routes(host_netns=ns_path(host)) == {}


@root
def test_missing_host_netns_is_not_reported_as_a_missing_pod(make_netns) -> None:
    with pytest.raises(dp.DataplaneError, match="host") as err:
        dp.attach_pod(
            ns_path(make_netns()),
            "eth0",
            "l3fx",
            [IPAddress("10.1.0.5")],
            1500,
            host_netns="/var/run/netns/l3fdp-no-such-host",
        )
    assert not isinstance(err.value, dp.NetnsNotFound)


@root
def test_address_already_routed_on_the_host_cleans_up(host: str, make_netns) -> None:
    pod = make_netns()
    sh("ip", "-n", host, "route", "add", "10.1.0.9/32", "dev", "uplink")

    with pytest.raises(dp.DataplaneError, match=r"10\.1\.0\.9/32.*already exists.*uplink"):
        attach(host, pod, "a", "10.1.0.9")
    assert our_links(host) == []
    assert "eth0" not in links(pod)
    assert dp.list_host_routes(host_netns=ns_path(host)) == {}


@root
def test_failure_inside_the_pod_removes_veth_and_host_routes(host: str, make_netns) -> None:
    # IPv6 disabled in the pod: the host side (veth, both host routes) is already done
    # when adding the pod's IPv6 address fails.
    pod = make_netns()
    sh("ip", "netns", "exec", pod, "sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1")

    with pytest.raises(dp.DataplaneError, match=f"configure eth0 in {ns_path(pod)}"):
        attach(host, pod, "a", "10.1.0.5", "fd00:10::5")
    assert our_links(host) == []
    assert "eth0" not in links(pod)
    assert dp.list_host_routes(host_netns=ns_path(host)) == {}


@root
def test_foreign_interface_with_the_host_name_is_left_alone(host: str, make_netns) -> None:
    name = dp.host_veth_name("default", "a")
    sh("ip", "-n", host, "link", "add", name, "type", "bridge")

    with pytest.raises(dp.DataplaneError, match="is a bridge, not a veth"):
        attach(host, make_netns(), "a", "10.1.0.5")
    assert links(host)[name]["linkinfo"]["info_kind"] == "bridge"


@root
def test_container_ifname_taken_in_the_pod(host: str, make_netns) -> None:
    pod = make_netns()
    sh("ip", "-n", pod, "link", "add", "eth0", "type", "veth", "peer", "name", "other")

    with pytest.raises(dp.DataplaneError, match="eth0 already exists"):
        attach(host, pod, "a", "10.1.0.5")
    assert our_links(host) == []
    assert "other" in links(pod)


# ------------------------------------------------------------------------------ inspect


BREAKAGES = {
    "pod address": (
        ["ip", "-n", "{pod}", "addr", "del", "10.1.0.5/32", "dev", "eth0"],
        "address 10.1.0.5/32 missing",
    ),
    "default route": (
        ["ip", "-n", "{pod}", "route", "del", "default"],
        "route missing: default via 169.254.1.1",
    ),
    "gateway route": (
        ["ip", "-n", "{pod}", "route", "del", "169.254.1.1"],
        "route missing: 169.254.1.1 dev eth0 scope link",
    ),
    "pod link down": (["ip", "-n", "{pod}", "link", "set", "eth0", "down"], "interface down"),
    "pod mtu": (["ip", "-n", "{pod}", "link", "set", "eth0", "mtu", "1300"], "MTU 1300"),
    "host veth down": (["ip", "-n", "{host}", "link", "set", "{veth}", "down"], "down"),
    "host route": (
        ["ip", "-n", "{host}", "route", "del", "10.1.0.5/32"],
        "host route 10.1.0.5/32: missing",
    ),
    "proxy arp": (
        ["ip", "netns", "exec", "{host}", "sysctl", "-qw", "net.ipv4.conf.{veth}.proxy_arp=0"],
        "proxy_arp is 0",
    ),
    "proxy delay": (
        ["ip", "netns", "exec", "{host}", "sysctl", "-qw", "net.ipv4.neigh.{veth}.proxy_delay=80"],
        "proxy_delay is 80",
    ),
    "pod veth gone": (["ip", "-n", "{pod}", "link", "del", "eth0"], "interface missing"),
    "pod netns gone": (["ip", "netns", "del", "{pod}"], "does not exist"),
}


@root
@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_inspect_reports_breakage(host: str, make_netns, breakage: str) -> None:
    pod = make_netns()
    att = attach(host, pod, "a", "10.1.0.5")
    assert dp.inspect_pod(att, host_netns=ns_path(host)) == []
    command, expected = BREAKAGES[breakage]
    sh(*(arg.format(pod=pod, host=host, veth=att.host_ifname) for arg in command))

    problems = dp.inspect_pod(att, host_netns=ns_path(host))
    assert any(expected in p for p in problems), problems


# ------------------------------------------------------------------------ scale, threads


@root
def test_many_cycles_leave_nothing_behind(host: str, make_netns) -> None:
    pod = make_netns()
    fds_before = len(os.listdir("/proc/self/fd"))
    for i in range(200):
        att = attach(host, pod, f"p{i}", f"10.1.{i // 250}.{i % 250 + 1}")
        dp.detach_pod(att.host_ifname, att.netns, "eth0", host_netns=ns_path(host))
    assert our_links(host) == []
    assert "eth0" not in links(pod)
    assert sh("ip", "-n", host, "route", "show", "proto", str(dp.ROUTE_PROTOCOL)) == ""
    assert len(os.listdir("/proc/self/fd")) <= fds_before + 2  # no leaked sockets or fds


@root
def test_concurrent_attach_and_detach(host: str, make_netns) -> None:
    pods = [make_netns() for _ in range(12)]
    with ThreadPoolExecutor(max_workers=6) as pool:
        atts = list(
            pool.map(lambda i: attach(host, pods[i], f"p{i}", f"10.1.0.{i + 10}"), range(12))
        )
        assert all(dp.inspect_pod(a, host_netns=ns_path(host)) == [] for a in atts)
        assert len(dp.list_host_routes(host_netns=ns_path(host))) == 12
        list(
            pool.map(
                lambda a: dp.detach_pod(a.host_ifname, a.netns, "eth0", host_netns=ns_path(host)),
                atts,
            )
        )
    assert our_links(host) == []


_forks: list[int] = []
os.register_at_fork(before=lambda: _forks.append(1))  # counts os.fork() in this process


@root
def test_no_process_is_forked_per_call(host: str, make_netns) -> None:
    # pyroute2's own IPRoute(netns=...) forks a child per socket; we must not.
    pod = make_netns()
    before = len(_forks)
    att = attach(host, pod, "a", "10.1.0.5")
    dp.inspect_pod(att, host_netns=ns_path(host))
    dp.detach_pod(att.host_ifname, att.netns, "eth0", host_netns=ns_path(host))
    assert len(_forks) == before


@root
def test_callers_thread_never_changes_namespace(host: str, make_netns) -> None:
    before = os.stat(f"/proc/self/task/{threading.get_native_id()}/ns/net").st_ino
    att = attach(host, make_netns(), "a", "10.1.0.5")
    dp.inspect_pod(att, host_netns=ns_path(host))
    dp.detach_pod(att.host_ifname, att.netns, "eth0", host_netns=ns_path(host))
    assert os.stat(f"/proc/self/task/{threading.get_native_id()}/ns/net").st_ino == before
