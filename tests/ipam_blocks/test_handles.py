"""A handle is one exact id: names never fold case, and every read compares the stored id.

Also: handles stored by earlier versions (an id with capitals under its lowercased name)
keep working for exactly their id, and `ipam check` sees a live pod's address that IPAM
does not hold for it.
"""

from __future__ import annotations

import pytest
from netaddr import IPAddress, IPNetwork

from bgp_speaker.pods.records import WorkloadRecords
from ipam_blocks import block as blockmath
from ipam_blocks.admin import release_handle as admin_release_handle
from ipam_blocks.allocator import IPAM, AssignRequest
from ipam_blocks.check import check
from ipam_blocks.errors import InvalidInput
from ipam_blocks.gc import collect_garbage
from ipam_blocks.model import (
    IPPool,
    Node,
    Workload,
    handle_name,
    parse_handle,
    parse_workload,
    render_workload,
)
from ipam_blocks.pools import add_node, add_pool, forget_workload, record_workload
from ipam_blocks.store.base import Resource
from ipam_blocks.store.sqlite import SqliteStore
from ipam_blocks.store.workloads import WorkloadRecordLiveness

NODE = "n1"


@pytest.fixture
def ipam(store: SqliteStore) -> IPAM:
    ipam = IPAM(store)
    add_pool(ipam, IPPool("pool-a", IPNetwork("10.0.0.0/24"), 28))
    add_node(ipam, Node(NODE))
    return ipam


def assign(ipam: IPAM, handle_id: str, pod: str = "") -> IPAddress:
    (ip,) = ipam.auto_assign(AssignRequest(NODE, handle_id, pod=pod, namespace="ns"))
    return ip


def holders(ipam: IPAM) -> dict[IPAddress, str]:
    return {ip: a.handle_id for blk in ipam.blocks() for ip, a, _ in blockmath.allocated(blk)}


def handles(store: SqliteStore) -> dict[str, str]:
    return {r.name: r.spec["handleID"] for r in store.list("IPAMHandle").items}


# --- names -----------------------------------------------------------------------------------


def test_a_valid_lowercase_id_is_its_own_name() -> None:
    for handle_id in ("l3fabric.abcd", "ipip-tunnel-addr-n1", "k8s-pod-network.0f3a"):
        assert handle_name(handle_id) == handle_id


def test_ids_differing_only_in_case_get_distinct_valid_names() -> None:
    ids = ["net.ABCD", "net.abcd", "net.Abcd", "net.abcD"]
    names = [handle_name(i) for i in ids]
    assert len(set(names)) == len(ids)
    assert all(n == n.lower() and n.startswith("net.abcd") for n in names)
    assert handle_name("net.ABCD") == handle_name("net.ABCD")


def test_a_long_id_with_capitals_stays_within_the_name_limit() -> None:
    long = "net." + "A" * 240 + ".B"
    name = handle_name(long)
    assert len(name) <= 253 and name != handle_name(long.lower())
    assert name[-1].isalnum() and ".-" not in name


def test_ids_that_are_no_name_even_lowercased_are_still_refused() -> None:
    for bad in ("net/x", "", "net.a b", "-net"):
        with pytest.raises(InvalidInput, match="handle"):
            handle_name(bad)


# --- the allocator ---------------------------------------------------------------------------


def test_ids_differing_only_in_case_hold_separate_addresses(ipam: IPAM, store) -> None:
    upper, lower = assign(ipam, "net.ABCD"), assign(ipam, "net.abcd")

    assert upper != lower
    assert holders(ipam) == {upper: "net.ABCD", lower: "net.abcd"}
    assert sorted(handles(store).values()) == ["net.ABCD", "net.abcd"]

    assert ipam.release_handle("net.abcd") == [lower]
    assert holders(ipam) == {upper: "net.ABCD"}
    assert ipam.release_handle("net.abcd") == []
    assert ipam.release_handle("net.ABCD") == [upper]
    assert holders(ipam) == {} and handles(store) == {}
    assert check(ipam, WorkloadRecordLiveness(store), recheck_after=0).clean


def test_the_operators_release_needs_the_exact_id(ipam: IPAM) -> None:
    ip = assign(ipam, "net.ABCD")
    with pytest.raises(InvalidInput, match=r"unknown handle 'net\.abcd'"):
        admin_release_handle(ipam, "net.abcd")
    assert holders(ipam) == {ip: "net.ABCD"}
    assert admin_release_handle(ipam, "net.ABCD") == [ip]


def _legacy_handle(ipam: IPAM, store: SqliteStore, handle_id: str) -> IPAddress:
    """An allocation as a version that lowercased names stored it."""
    ip = assign(ipam, handle_id)
    res = next(r for r in store.list("IPAMHandle").items if r.spec["handleID"] == handle_id)
    store.delete("IPAMHandle", res.name)
    store.create(Resource("IPAMHandle", handle_id.lower(), res.spec))
    return ip


def test_a_handle_stored_under_its_lowercased_name_keeps_working(ipam: IPAM, store) -> None:
    ip = _legacy_handle(ipam, store, "net.ABCD")
    assert handles(store) == {"net.abcd": "net.ABCD"}

    assert ipam.release_handle("net.abcd") == []  # not its id
    assert holders(ipam) == {ip: "net.ABCD"}
    assert check(ipam, WorkloadRecordLiveness(store), recheck_after=0).clean

    assert ipam.release_handle("net.ABCD") == [ip]
    assert holders(ipam) == {} and handles(store) == {}


def test_an_id_whose_name_another_handle_holds_is_refused_not_shared(ipam: IPAM, store) -> None:
    legacy_ip = _legacy_handle(ipam, store, "net.ABCD")
    crafted = handle_name("net.XYZ")  # an id that spells another id's derived name
    xyz_ip = assign(ipam, "net.XYZ")

    for taken in ("net.abcd", crafted):
        with pytest.raises(InvalidInput, match="held by handle"):
            assign(ipam, taken)

    assert holders(ipam) == {legacy_ip: "net.ABCD", xyz_ip: "net.XYZ"}
    assert parse_handle(store.get("IPAMHandle", crafted)).blocks == {
        str(IPNetwork(f"{xyz_ip}/28").cidr): 1
    }
    assert check(ipam, WorkloadRecordLiveness(store), recheck_after=0).clean


def test_gc_settles_a_legacy_handle_in_place(ipam: IPAM, store) -> None:
    ip = _legacy_handle(ipam, store, "net.ABCD")
    res = store.get("IPAMHandle", "net.abcd")
    store.update(res.with_spec({**res.spec, "block": {"10.0.0.0/28": 3}}))  # overcounted

    result = collect_garbage(ipam, WorkloadRecordLiveness(store), grace=0)

    assert result.settled_handles == ["net.ABCD"]
    assert handles(store) == {"net.abcd": "net.ABCD"}
    assert holders(ipam) == {ip: "net.ABCD"}


# --- workload records ------------------------------------------------------------------------


def test_workload_records_are_found_by_their_exact_id(store: SqliteStore) -> None:
    records = WorkloadRecords(store, NODE)
    upper = records.create(Workload("net.ABCD", NODE, pod="pu"))
    lower = records.create(Workload("net.abcd", NODE, pod="pl"))
    assert records.get("net.ABCD") == upper and records.get("net.abcd") == lower

    records.forget("net.abcd")
    assert records.get("net.abcd") is None and records.get("net.ABCD") == upper


def test_a_legacy_record_is_neither_read_nor_forgotten_for_another_id(store) -> None:
    spec = render_workload(Workload("net.ABCD", NODE, pod="pu")).spec
    legacy = parse_workload(store.create(Resource("Workload", "net.abcd", spec)))
    records = WorkloadRecords(store, NODE)

    assert records.get("net.abcd") is None
    assert records.get("net.ABCD") == legacy
    with pytest.raises(InvalidInput, match=r"held by handle 'net\.ABCD'"):
        records.create(Workload("net.abcd", NODE, pod="pl"))
    records.forget("net.abcd")
    assert records.get("net.ABCD") == legacy

    set_ = records.set_addresses(records.get("net.ABCD"), ("10.0.0.1",))  # type: ignore[arg-type]
    assert set_.name == "net.abcd" and records.get("net.ABCD") == set_
    records.forget("net.ABCD")
    assert store.list("Workload").items == []


def test_the_operators_workload_records_are_exact_too(ipam: IPAM, store) -> None:
    record_workload(ipam, Workload("net.ABCD", NODE, "ns", "pu"))
    record_workload(ipam, Workload("net.abcd", NODE, "ns", "pl"))
    forget_workload(ipam, "net.abcd")
    assert [r.spec["handleID"] for r in store.list("Workload").items] == ["net.ABCD"]


# --- ipam check: live pods' addresses --------------------------------------------------------


def _live(store: SqliteStore, handle_id: str, pod: str, *addresses: IPAddress) -> None:
    w = Workload(handle_id, NODE, "ns", pod, ifname="eth0", addresses=tuple(map(str, addresses)))
    store.create(render_workload(w))


def test_check_reports_a_live_pods_address_that_ipam_shows_free(ipam: IPAM, store) -> None:
    ip = assign(ipam, "net.a", pod="pa")
    _live(store, "net.a", "pa", ip)
    assert check(ipam, WorkloadRecordLiveness(store), recheck_after=0).clean

    ipam.release_handle("net.a")
    report = check(ipam, WorkloadRecordLiveness(store), recheck_after=0)

    assert report.addresses_not_held == [
        f"{ip} used by pod ns/pa interface eth0 on node {NODE} (handle 'net.a') but free in IPAM"
    ]
    assert not report.clean


def test_check_reports_a_live_pods_address_held_by_another_handle(ipam: IPAM, store) -> None:
    ip = assign(ipam, "net.ABCD", pod="pu")
    _live(store, "net.ABCD", "pu", ip)
    _live(store, "net.abcd", "pl", ip)  # what a shared handle used to leave behind

    report = check(ipam, WorkloadRecordLiveness(store), recheck_after=0)

    assert report.addresses_not_held == [
        f"{ip} used by pod ns/pl interface eth0 on node {NODE} (handle 'net.abcd') "
        "but held by handle 'net.ABCD'"
    ]
