"""The FIB programmer against real network namespaces and the kernel's routing table — no mocks.

Each root test gets a "node" namespace wired to a "peer" namespace by two veth pairs
(10.0.0.1/24 ↔ .2 and 10.0.1.1/24 ↔ .2, plus fd00::/64 and fd01::/64), so gateways on
both links are reachable and ECMP over the two is possible. The kernel is checked through
`ip -j` as well as through `Fib.dump`, so the FIB cannot agree with itself by mistake.
Namespaces are created by the fixture and deleted by name in its teardown.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Network, ip_address, ip_network

import pytest

from bgp_speaker.bgp.routes import PROTO_BGP, PROTO_WORKLOAD, IPNet, KernelRoute, NextHop
from bgp_speaker.kernel import fib as fib_module
from bgp_speaker.kernel import netlink_batch as nl
from bgp_speaker.kernel.fib import Fib, FibError

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and iproute2"
)


def root(fn):
    """Real namespaces and netlink: marked `root`, skipped when not root."""
    return pytest.mark.root(needs_root(fn))


_names = itertools.count()

GW_A, GW_B = ip_address("10.0.0.2"), ip_address("10.0.1.2")
GW6_A, GW6_B = ip_address("fd00::2"), ip_address("fd01::2")
UNREACHABLE = ip_address("192.0.2.1")  # no route to it in the node namespace


def net(text: str) -> IPNet:
    return ip_network(text)


def via(*gateways: str, device: str | None = None, onlink: bool = False) -> tuple[NextHop, ...]:
    return tuple(sorted(NextHop(ip_address(g), device, onlink) for g in gateways))


def sh(*args: str, check: bool = True) -> str:
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


@dataclass(frozen=True)
class Node:
    ns: str  # the namespace whose main table the FIB programs
    peer: str  # holds the gateways
    link_a: str  # node side of the 10.0.0.0/24 and fd00::/64 link
    link_b: str  # node side of the 10.0.1.0/24 and fd01::/64 link

    def ip_routes(self, *selector: str, family: str = "-4") -> list[dict]:
        return json.loads(sh("ip", "-n", self.ns, family, "-j", "route", "show", *selector) or "[]")

    def ours(self, family: str = "-4") -> dict[str, dict]:
        """`ip -j route show proto 77`, by destination."""
        return {r["dst"]: r for r in self.ip_routes("proto", str(PROTO_BGP), family=family)}

    def ip(self, *args: str) -> None:
        sh("ip", "-n", self.ns, *args)


@pytest.fixture
def node() -> Iterator[Node]:
    tag = f"l3f{os.getpid() % 10000}x{next(_names)}"
    ns, peer = f"{tag}-n", f"{tag}-p"
    made: list[str] = []
    try:
        for name in (ns, peer):
            sh("ip", "netns", "add", name)
            made.append(name)
        for side, (v4, v6) in {"a": ("10.0.0", "fd00:"), "b": ("10.0.1", "fd01:")}.items():
            sh("ip", "link", "add", f"n{side}", "netns", ns, "type", "veth",
               "peer", "name", f"p{side}", "netns", peer)  # fmt: skip
            for where, dev, host in ((ns, f"n{side}", "1"), (peer, f"p{side}", "2")):
                sh("ip", "-n", where, "addr", "add", f"{v4}.{host}/24", "dev", dev)
                sh("ip", "-n", where, "addr", "add", f"{v6}:{host}/64", "dev", dev, "nodad")
                sh("ip", "-n", where, "link", "set", dev, "up")
        yield Node(ns, peer, "na", "nb")
    finally:
        for name in made:
            sh("ip", "netns", "del", name, check=False)


@pytest.fixture
def fib(node: Node) -> Iterator[Fib]:
    with Fib(node.ns) as programmer:
        yield programmer


def by_prefix(*routes: KernelRoute) -> dict[IPNet, KernelRoute]:
    return {route.prefix: route for route in routes}


def slash28s(count: int, start: str = "10.128.0.0") -> list[IPv4Network]:
    base = int(ip_address(start))
    return [IPv4Network((base + 16 * i, 28)) for i in range(count)]


# --- single routes ---------------------------------------------------------------------------


@root
def test_add_replace_remove_one_route(node: Node, fib: Fib) -> None:
    prefix = net("10.10.0.0/24")
    fib.apply([KernelRoute(prefix, via("10.0.0.2", device="na"))], [])
    assert node.ours()["10.10.0.0/24"]["gateway"] == "10.0.0.2"
    assert fib.dump() == by_prefix(KernelRoute(prefix, via("10.0.0.2", device="na")))
    assert "10.10.0.0/24" not in sh("ip", "route", "show")  # the caller's netns is untouched

    fib.apply([KernelRoute(prefix, via("10.0.1.2", device="nb"))], [])
    shown = node.ours()["10.10.0.0/24"]
    assert (shown["gateway"], shown["dev"]) == ("10.0.1.2", "nb")
    assert len(node.ip_routes("10.10.0.0/24")) == 1  # replaced, not added beside

    fib.apply([], [prefix])
    assert node.ours() == {}
    assert fib.dump() == {}


@root
def test_removing_an_absent_route_succeeds(fib: Fib) -> None:
    fib.apply([], [net("10.10.0.0/24"), net("fd10::/64")])


@root
def test_ecmp_route_has_both_next_hops(node: Node, fib: Fib) -> None:
    route = KernelRoute(net("10.11.0.0/24"), via("10.0.1.2", "10.0.0.2"))
    fib.apply([route], [])
    hops = node.ours()["10.11.0.0/24"]["nexthops"]
    assert sorted((h["gateway"], h["dev"]) for h in hops) == [
        ("10.0.0.2", "na"),
        ("10.0.1.2", "nb"),
    ]
    dumped = fib.dump()[route.prefix]
    assert dumped.nexthops == (NextHop(GW_A, "na"), NextHop(GW_B, "nb"))  # sorted
    assert fib.reconcile(by_prefix(route)) == (0, 0)  # device-less hops match any device


@root
def test_onlink_next_hop(node: Node, fib: Fib) -> None:
    # 10.9.9.9 is on no connected subnet: only onlink makes it acceptable (IPIP style).
    route = KernelRoute(net("10.12.0.0/24"), via("10.9.9.9", device="na", onlink=True))
    fib.apply([route], [])
    assert "onlink" in node.ours()["10.12.0.0/24"]["flags"]
    assert fib.dump() == by_prefix(route)


@root
def test_blackhole(node: Node, fib: Fib) -> None:
    route = KernelRoute(net("10.13.0.0/26"), blackhole=True)
    fib.apply([route], [])
    assert node.ours()["10.13.0.0/26"]["type"] == "blackhole"
    assert fib.dump() == by_prefix(route)


@root
def test_ipv6_routes(node: Node, fib: Fib) -> None:
    routes = [
        KernelRoute(net("fd10::/64"), via("fd00::2", device="na")),
        KernelRoute(net("fd11::/64"), (NextHop(GW6_A, "na"), NextHop(GW6_B, "nb"))),
        KernelRoute(net("fd13::/122"), blackhole=True),
    ]
    fib.apply(routes, [])
    shown = node.ours("-6")
    assert shown["fd10::/64"]["gateway"] == "fd00::2"
    assert sorted(h["gateway"] for h in shown["fd11::/64"]["nexthops"]) == ["fd00::2", "fd01::2"]
    assert shown["fd13::/122"]["type"] == "blackhole"
    assert fib.dump() == by_prefix(*routes)

    # Replacing swaps the whole next-hop set, single <-> ECMP, both ways.
    swapped = [
        KernelRoute(net("fd10::/64"), (NextHop(GW6_A, "na"), NextHop(GW6_B, "nb"))),
        KernelRoute(net("fd11::/64"), via("fd01::2", device="nb")),
    ]
    fib.apply(swapped, [])
    assert fib.dump() == by_prefix(*swapped, routes[2])
    assert len(node.ip_routes("fd11::/64", family="-6")) == 1

    fib.apply([], [r.prefix for r in routes])
    assert node.ours("-6") == {}


@root
def test_dump_round_trips_a_mixed_table(fib: Fib) -> None:
    routes = by_prefix(
        KernelRoute(net("10.20.0.0/26"), via("10.0.0.2", device="na")),
        KernelRoute(net("10.20.0.64/26"), (NextHop(GW_A, "na"), NextHop(GW_B, "nb"))),
        KernelRoute(net("10.20.0.128/26"), via("10.9.9.9", device="nb", onlink=True)),
        KernelRoute(net("10.20.0.192/26"), blackhole=True),
        KernelRoute(net("10.20.1.7/32"), via("10.0.1.2", device="nb")),
        KernelRoute(net("fd20::/64"), via("fd01::2", device="nb")),
        KernelRoute(net("fd21::/64"), blackhole=True),
    )
    fib.apply(routes.values(), [])
    assert fib.dump() == routes


# --- reconcile -------------------------------------------------------------------------------


@root
def test_reconcile_adds_missing_changes_different_removes_stale(node: Node, fib: Fib) -> None:
    keep = KernelRoute(net("10.30.0.0/24"), via("10.0.0.2", device="na"))
    change = KernelRoute(net("10.30.1.0/24"), via("10.0.0.2", device="na"))
    stale = KernelRoute(net("10.30.2.0/24"), via("10.0.1.2", device="nb"))
    stale6 = KernelRoute(net("fd30::/64"), blackhole=True)
    fib.apply([keep, change, stale, stale6], [])

    changed = KernelRoute(change.prefix, via("10.0.0.2", "10.0.1.2"))  # now ECMP
    missing = KernelRoute(net("10.30.3.0/24"), via("10.0.1.2"))  # kernel picks the device
    desired = by_prefix(keep, changed, missing)
    assert fib.reconcile(desired) == (2, 2)

    assert set(node.ours()) == {"10.30.0.0/24", "10.30.1.0/24", "10.30.3.0/24"}
    assert node.ours("-6") == {}
    dumped = fib.dump()
    assert dumped[keep.prefix] == keep
    assert dumped[missing.prefix] == KernelRoute(missing.prefix, via("10.0.1.2", device="nb"))
    assert fib.reconcile(desired) == (0, 0)  # level-triggered: nothing left to do


@root
def test_a_fresh_fib_takes_over_routes_of_an_earlier_one(node: Node) -> None:
    """An agent restart: the new Fib's caches are empty, the kernel still has our routes."""
    prefix = net("10.31.0.0/24")
    with Fib(node.ns) as before:
        before.apply([KernelRoute(prefix, via("10.0.0.2"))], [])
    with Fib(node.ns) as after:
        after.apply([KernelRoute(prefix, via("10.0.1.2"))], [])  # EEXIST -> ours -> replace
        assert after.last_skipped == frozenset()
    assert node.ours()["10.31.0.0/24"]["gateway"] == "10.0.1.2"


# --- foreign routes --------------------------------------------------------------------------


@root
def test_foreign_route_for_our_prefix_is_never_replaced(node: Node, fib: Fib) -> None:
    node.ip("route", "add", "10.40.0.0/24", "via", "10.0.0.2", "proto", "static")
    node.ip("-6", "route", "add", "fd40::/64", "via", "fd00::2", "proto", "static")
    wanted = by_prefix(
        KernelRoute(net("10.40.0.0/24"), via("10.0.1.2")),
        KernelRoute(net("fd40::/64"), via("fd01::2")),
        KernelRoute(net("10.40.1.0/24"), via("10.0.1.2")),
    )

    fib.apply(wanted.values(), [])  # hot path, empty caches: EXCL refuses, dump tells whose
    assert fib.last_skipped == {net("10.40.0.0/24"), net("fd40::/64")}
    fib.apply(wanted.values(), [])  # now known foreign from the cache
    assert fib.last_skipped == {net("10.40.0.0/24"), net("fd40::/64")}
    assert fib.reconcile(wanted) == (0, 0)
    assert fib.last_skipped == {net("10.40.0.0/24"), net("fd40::/64")}
    fib.apply([], [net("10.40.0.0/24"), net("fd40::/64")])  # removes only what is ours

    [v4] = node.ip_routes("10.40.0.0/24")
    assert (v4["protocol"], v4["gateway"]) == ("static", "10.0.0.2")
    [v6] = node.ip_routes("fd40::/64", family="-6")
    assert (v6["protocol"], v6["gateway"]) == ("static", "fd00::2")
    assert set(fib.dump()) == {net("10.40.1.0/24")}


@root
def test_reconcile_never_removes_foreign_routes(node: Node, fib: Fib) -> None:
    node.ip("route", "add", "10.41.0.0/24", "via", "10.0.0.2", "proto", "static")
    node.ip("route", "add", "10.41.1.7/32", "dev", "na", "proto", str(PROTO_WORKLOAD))
    node.ip("route", "add", "blackhole", "10.41.2.0/24", "proto", "bird")
    fib.apply([KernelRoute(net("10.42.0.0/24"), via("10.0.0.2"))], [])

    assert fib.reconcile({}) == (0, 1)
    left = {r["dst"]: r.get("protocol") for r in node.ip_routes()}
    assert left == {
        "10.0.0.0/24": "kernel",
        "10.0.1.0/24": "kernel",
        "10.41.0.0/24": "static",
        "10.41.1.7": str(PROTO_WORKLOAD),
        "10.41.2.0/24": "bird",
    }


# --- batches and failures --------------------------------------------------------------------


@root
def test_twenty_thousand_routes_in_one_batch(node: Node, fib: Fib) -> None:
    prefixes = slash28s(20_000)
    hop = via("10.0.0.2")
    fib.apply((KernelRoute(p, hop) for p in prefixes), [])
    assert len(fib.dump()) == 20_000
    assert len(node.ip_routes("proto", str(PROTO_BGP))) == 20_000
    assert set(fib.dump()) == set(prefixes)

    fib.apply([], prefixes)
    assert fib.dump() == {}
    assert node.ip_routes("proto", str(PROTO_BGP)) == []


@root
def test_partial_failure_names_the_failed_prefixes_and_keeps_the_rest(node: Node, fib: Fib) -> None:
    prefixes = slash28s(1_000)
    bad = set(prefixes[::97])
    routes = [KernelRoute(p, via(str(UNREACHABLE) if p in bad else "10.0.0.2")) for p in prefixes]
    routes.append(KernelRoute(net("10.50.0.0/24"), via("10.0.0.2", device="nosuchdev")))
    routes.append(KernelRoute(net("10.50.1.0/24"), via("fd00::2")))  # other family

    with pytest.raises(FibError) as caught:
        fib.apply(routes, [])

    failures = caught.value.failures
    assert set(failures) == bad | {net("10.50.0.0/24"), net("10.50.1.0/24")}
    assert all("unreachable" in failures[p] for p in bad)
    assert "nosuchdev" in failures[net("10.50.0.0/24")]
    assert str(prefixes[0]) in str(caught.value)  # the message names prefixes
    installed = set(fib.dump())
    assert installed == set(prefixes) - bad
    assert len(node.ip_routes("proto", str(PROTO_BGP))) == len(prefixes) - len(bad)


@root
def test_lost_acks_are_reported_and_reconcile_settles_them(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A tiny receive buffer plus chunks far larger than it fits: the kernel drops acks.
    monkeypatch.setattr(fib_module, "_RCVBUF", 4096)
    prefixes = slash28s(2_000)
    desired = by_prefix(*(KernelRoute(p, via("10.0.0.2", device="na")) for p in prefixes))
    with Fib(node.ns) as small:
        small._chunk = 500  # defeat the chunk sizing that normally prevents the overrun
        with pytest.raises(FibError) as caught:
            small.apply(desired.values(), [])
    assert caught.value.failures
    assert all("no acknowledgement" in r for r in caught.value.failures.values())
    monkeypatch.undo()
    with Fib(node.ns) as fib:
        assert fib.dump() == desired  # acks were lost, the routes were not
        assert fib.reconcile(desired) == (0, 0)


@root
def test_missing_namespace_is_a_fib_error() -> None:
    with pytest.raises(FibError, match="does not exist"):
        Fib(f"l3f-missing-{os.getpid()}")


def test_bad_table_or_protocol_is_refused() -> None:
    with pytest.raises(FibError, match="table"):
        Fib(table=255)
    with pytest.raises(FibError, match="protocol"):
        Fib(protocol=2)


# --- the codec, without a kernel -------------------------------------------------------------


@pytest.mark.parametrize(
    "route",
    [
        KernelRoute(net("10.60.0.0/26"), via("10.0.0.2", device="na")),
        KernelRoute(net("10.60.0.0/26"), (NextHop(GW_A, "na"), NextHop(GW_B, "nb", True))),
        KernelRoute(net("fd60::/64"), (NextHop(GW6_A, "na"), NextHop(GW6_B, "nb"))),
        KernelRoute(net("fd60::/64"), blackhole=True),
    ],
)
def test_packed_route_parses_back(route: KernelRoute) -> None:
    links = {"na": 7, "nb": 9}
    packed = nl.pack_newroute(42, nl.NLM_F_CREATE, route, 1000, PROTO_BGP, links)
    [(kind, _flags, seq, offset, length)] = nl.iter_messages(packed, len(packed))
    assert (kind, seq) == (nl.RTM_NEWROUTE, 42)
    entry = nl.parse_route(packed, offset, length, want_hops=True)
    assert entry is not None
    assert (entry.prefix, entry.table, entry.protocol) == (route.prefix, 1000, PROTO_BGP)
    assert (entry.kind == nl.RTN_BLACKHOLE) == route.blackhole
    names = {index: name for name, index in links.items()}
    assert [(gw, names.get(i), onlink) for gw, i, onlink in entry.hops] == [
        (h.gateway, h.device, h.onlink) for h in route.nexthops
    ]


def test_unpackable_routes_are_refused_before_the_kernel() -> None:
    with pytest.raises(nl.PackError, match="neither"):
        nl.pack_newroute(1, 0, KernelRoute(net("10.0.0.0/8")), 254, PROTO_BGP, {})
    with pytest.raises(nl.PackError, match="not IPv4"):
        nl.pack_newroute(1, 0, KernelRoute(net("10.0.0.0/8"), via("fd00::1")), 254, 77, {})


def test_acks_are_matched_by_sequence_number() -> None:
    def ack(seq: int, code: int, text: str = "") -> bytes:
        tlv = b""
        flags = nl.NLM_F_CAPPED
        if text:
            raw = text.encode() + b"\0"
            tlv = nl._RTA_HDR.pack(4 + len(raw), nl.NLMSGERR_ATTR_MSG) + raw
            tlv += b"\0" * (-len(tlv) % 4)
            flags |= nl.NLM_F_ACK_TLVS
        body = nl._ERRNO.pack(-code) + nl._NLMSGHDR.pack(16, nl.RTM_NEWROUTE, 0, seq, 0) + tlv
        return nl._NLMSGHDR.pack(16 + len(body), nl.NLMSG_ERROR, flags, seq, 0) + body

    buf = ack(5, 0) + ack(6, errno.ENETUNREACH, "Nexthop has invalid gateway") + ack(99, 0)
    pending: set[int] = {5, 6, 7}
    failed: dict[int, nl.Ack] = {}
    nl.collect_acks(buf, len(buf), pending, failed)
    assert pending == {7}  # 99 was never ours to wait for
    assert failed == {6: nl.Ack(6, errno.ENETUNREACH, "Nexthop has invalid gateway")}
