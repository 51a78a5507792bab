"""The store contract (ipam_blocks/store/base.py, DESIGN §3), run against every backend.

The first part holds for sqlite and kube alike; the `TestKube*` classes pin down what only the
Kubernetes backend does: schema pruning and validation by the API server, Node annotations,
error translation, watch resumption, pod liveness.
"""

from __future__ import annotations

import itertools
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from ipam_blocks.errors import (
    AlreadyExists,
    Conflict,
    InvalidInput,
    NotFound,
    StoreUnavailable,
    WatchExpired,
)
from ipam_blocks.liveness import PodRef
from ipam_blocks.selector import (
    LabelSelector,
    Operator,
    Requirement,
    parse_selector_dict,
    parse_selector_text,
)
from ipam_blocks.store import EventType, Resource, Store, WatchEvent, open_store
from tests.kube_api_double import RecordedRequest
from tests.store.conftest import StoreBackend

NODE_A = "l3f-contract-node-a"


def pool(name: str, cidr: str = "10.0.0.0/16", labels: dict[str, str] | None = None) -> Resource:
    spec = {"cidr": cidr, "blockSize": 26, "ipipMode": "CrossSubnet", "natOutgoing": True}
    return Resource("IPPool", name, spec, labels or {}, {"example.com/owner": "tests"})


def affinity(name: str, state: str = "pending") -> Resource:
    return Resource("BlockAffinity", name, {"node": NODE_A, "cidr": "10.0.0.0/26", "state": state})


def take(events: Iterator[WatchEvent], n: int) -> list[WatchEvent]:
    """Up to n events (fewer if the watch goes quiet first)."""
    return list(itertools.islice(events, n))


def summary(events: list[WatchEvent]) -> list[tuple[str, str, str | None]]:
    return [(str(e.type), e.resource.name, e.resource.revision) for e in events]


# ---------------------------------------------------------------------------------------------
# create / get


def test_create_then_get_round_trips_with_a_revision(any_store: Store) -> None:
    wanted = pool("pool-a", labels={"zone": "a"})
    created = any_store.create(wanted)
    assert created.revision
    assert created == replace(wanted, revision=created.revision)
    assert any_store.get("IPPool", "pool-a") == created


def test_nested_specs_with_nulls_round_trip(any_store: Store) -> None:
    spec = {
        "cidr": "10.0.0.0/30",
        "affinity": f"host:{NODE_A}",
        "allocations": [0, None, 1, None],
        "unallocated": [3, 1],
        "attributes": [
            {"handleID": "k8s-pod-network.abc", "pod": "web-1", "namespace": "default"},
            {"handleID": "ipip-tunnel-addr", "type": "Tunnel", "allocatedAt": 1_700_000_000},
        ],
        "sequenceNumber": 7,
        "sequenceNumberForAllocation": {"0": 3, "2": 7},
    }
    created = any_store.create(Resource("IPAMBlock", "10-0-0-0-30", spec))
    assert created.spec == spec
    assert any_store.get("IPAMBlock", "10-0-0-0-30").spec == spec


def test_create_existing_name_is_already_exists(any_store: Store) -> None:
    any_store.create(pool("pool-a"))
    with pytest.raises(AlreadyExists):
        any_store.create(pool("pool-a", cidr="10.1.0.0/16"))
    assert any_store.get("IPPool", "pool-a").spec["cidr"] == "10.0.0.0/16"


def test_same_name_in_different_kinds_is_allowed(any_store: Store) -> None:
    any_store.create(pool("shared"))
    any_store.create(affinity("shared"))
    assert any_store.get("BlockAffinity", "shared").spec["state"] == "pending"


def test_get_missing_is_not_found(any_store: Store) -> None:
    with pytest.raises(NotFound):
        any_store.get("IPPool", "nope")


def test_unknown_kind_is_invalid_input(any_store: Store) -> None:
    for call in (
        lambda: any_store.get("Bogus", "x"),
        lambda: any_store.list("Bogus"),
        lambda: any_store.create(Resource("Bogus", "x", {})),
    ):
        with pytest.raises(InvalidInput) as info:
            call()
        assert info.value.field == "kind"


# ---------------------------------------------------------------------------------------------
# update: compare-and-swap on the revision


def test_update_at_current_revision_writes_and_moves_the_revision(any_store: Store) -> None:
    created = any_store.create(pool("pool-a"))
    changed = created.with_spec({**created.spec, "cidr": "10.9.0.0/16"})
    updated = any_store.update(changed)
    assert updated.revision and updated.revision != created.revision
    assert updated.spec["cidr"] == "10.9.0.0/16"
    assert any_store.get("IPPool", "pool-a") == updated


def test_update_can_change_labels_and_annotations(any_store: Store) -> None:
    created = any_store.create(pool("pool-a", labels={"zone": "a"}))
    updated = any_store.update(
        Resource("IPPool", "pool-a", created.spec, {"zone": "b"}, {}, created.revision)
    )
    got = any_store.get("IPPool", "pool-a")
    assert (got.labels, got.annotations) == ({"zone": "b"}, {})
    assert got.revision == updated.revision


def test_update_at_stale_revision_is_conflict_and_changes_nothing(any_store: Store) -> None:
    created = any_store.create(pool("pool-a"))
    current = any_store.update(created.with_spec({**created.spec, "cidr": "10.1.0.0/16"}))
    with pytest.raises(Conflict):
        any_store.update(created.with_spec({**created.spec, "cidr": "10.2.0.0/16"}))
    assert any_store.get("IPPool", "pool-a") == current


def test_update_missing_is_not_found(any_store: Store) -> None:
    created = any_store.create(pool("pool-a"))
    any_store.delete("IPPool", "pool-a")
    with pytest.raises(NotFound):
        any_store.update(created)


def test_update_without_revision_is_invalid_input(any_store: Store) -> None:
    any_store.create(pool("pool-a"))
    with pytest.raises(InvalidInput) as info:
        any_store.update(pool("pool-a", cidr="10.5.0.0/16"))
    assert info.value.field == "revision"
    assert any_store.get("IPPool", "pool-a").spec["cidr"] == "10.0.0.0/16"


def test_concurrent_writers_one_wins_the_others_conflict(store_backend: StoreBackend) -> None:
    stores = [store_backend.open() for _ in range(4)]
    base = stores[0].create(pool("pool-a"))
    outcomes: list[str] = []

    def write(store: Store, i: int) -> None:
        try:
            store.update(base.with_spec({**base.spec, "cidr": f"10.{i + 1}.0.0/16"}))
            outcomes.append("won")
        except Conflict:
            outcomes.append("conflict")

    threads = [threading.Thread(target=write, args=(s, i)) for i, s in enumerate(stores)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["conflict", "conflict", "conflict", "won"]


# ---------------------------------------------------------------------------------------------
# delete


def test_delete_without_revision(any_store: Store) -> None:
    any_store.create(pool("pool-a"))
    any_store.delete("IPPool", "pool-a")
    with pytest.raises(NotFound):
        any_store.get("IPPool", "pool-a")


def test_delete_at_current_revision(any_store: Store) -> None:
    created = any_store.create(pool("pool-a"))
    any_store.delete("IPPool", "pool-a", created.revision)
    assert any_store.list("IPPool").items == []


def test_delete_at_stale_revision_is_conflict_and_keeps_the_object(any_store: Store) -> None:
    created = any_store.create(pool("pool-a"))
    current = any_store.update(created.with_spec({**created.spec, "cidr": "10.1.0.0/16"}))
    with pytest.raises(Conflict):
        any_store.delete("IPPool", "pool-a", created.revision)
    assert any_store.get("IPPool", "pool-a") == current


def test_delete_missing_is_not_found(any_store: Store) -> None:
    with pytest.raises(NotFound):
        any_store.delete("IPPool", "nope")
    created = any_store.create(pool("pool-a"))
    any_store.delete("IPPool", "pool-a")
    with pytest.raises(NotFound):
        any_store.delete("IPPool", "pool-a", created.revision)


# ---------------------------------------------------------------------------------------------
# list and label selectors


@pytest.fixture
def labelled_pools(any_store: Store) -> Store:
    any_store.create(pool("p1", "10.1.0.0/16", {"zone": "a", "tier": "web"}))
    any_store.create(pool("p2", "10.2.0.0/16", {"zone": "b", "tier": "db"}))
    any_store.create(pool("p3", "10.3.0.0/16", {"zone": "c"}))
    any_store.create(pool("p4", "10.4.0.0/16"))
    any_store.create(affinity("p5"))  # another kind: never listed with the pools
    return any_store


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", ["p1", "p2", "p3", "p4"]),
        ("zone=a", ["p1"]),
        ("zone=a,tier=web", ["p1"]),
        ("zone=a,tier=db", []),
        ("zone in (a,b)", ["p1", "p2"]),
        ("zone notin (a,b)", ["p3", "p4"]),
        ("zone!=a", ["p2", "p3", "p4"]),
        ("tier", ["p1", "p2"]),
        ("!tier", ["p3", "p4"]),
        ("zone,!tier", ["p3"]),
        ("zone in (b,c),tier notin (web)", ["p2", "p3"]),
    ],
)
def test_list_with_label_selector(labelled_pools: Store, text: str, expected: list[str]) -> None:
    listing = labelled_pools.list("IPPool", parse_selector_text(text))
    assert [o.name for o in listing.items] == expected
    assert listing.revision


def test_list_with_structured_selector(labelled_pools: Store) -> None:
    selector = parse_selector_dict(
        {
            "matchLabels": {"zone": "b"},
            "matchExpressions": [{"key": "tier", "operator": "In", "values": ["db", "web"]}],
        }
    )
    assert [o.name for o in labelled_pools.list("IPPool", selector).items] == ["p2"]
    exists = LabelSelector({}, (Requirement("tier", Operator.EXISTS),))
    assert [o.name for o in labelled_pools.list("IPPool", exists).items] == ["p1", "p2"]


def test_list_items_carry_their_revisions(any_store: Store) -> None:
    a = any_store.create(pool("a"))
    b = any_store.create(pool("b", "10.2.0.0/16"))
    b = any_store.update(b.with_spec({**b.spec, "natOutgoing": False}))
    assert any_store.list("IPPool").items == [a, b]


# ---------------------------------------------------------------------------------------------
# watch


def test_watch_from_a_list_revision_sees_later_changes_in_order(any_store: Store) -> None:
    any_store.create(pool("before"))
    since = any_store.list("IPPool").revision
    a = any_store.create(pool("pool-a"))
    any_store.create(affinity("other-kind"))
    a2 = any_store.update(a.with_spec({**a.spec, "cidr": "10.7.0.0/16"}))
    any_store.delete("IPPool", "pool-a", a2.revision)
    events = take(any_store.watch("IPPool", since, timeout=0.5), 10)
    assert [(str(e.type), e.resource.name) for e in events] == [
        ("ADDED", "pool-a"),
        ("MODIFIED", "pool-a"),
        ("DELETED", "pool-a"),
    ]
    assert events[0].resource == a
    assert events[1].resource == a2
    assert events[2].resource.spec == a2.spec  # the deleted object's last state


def test_watch_starts_strictly_after_the_given_revision(any_store: Store) -> None:
    a = any_store.create(pool("pool-a"))
    b = any_store.create(pool("pool-b", "10.2.0.0/16"))
    events = take(any_store.watch("IPPool", a.revision, timeout=0.3), 10)
    assert summary(events) == [("ADDED", "pool-b", b.revision)]
    assert take(any_store.watch("IPPool", b.revision, timeout=0.3), 10) == []


def test_watch_delivers_changes_made_while_watching(store_backend: StoreBackend) -> None:
    store = store_backend.store
    writer_store = store_backend.open()
    since = store.list("IPPool").revision

    def write() -> None:
        time.sleep(0.2)
        created = writer_store.create(pool("live"))
        time.sleep(0.1)
        writer_store.delete("IPPool", "live", created.revision)

    thread = threading.Thread(target=write)
    thread.start()
    events = take(store.watch("IPPool", since, timeout=2.0), 2)
    thread.join()
    assert [e.type for e in events] == [EventType.ADDED, EventType.DELETED]


def test_watch_timeout_counts_from_the_last_change(store_backend: StoreBackend) -> None:
    store, writer = store_backend.store, store_backend.open()
    since = store.list("IPPool").revision

    def write() -> None:
        for i in range(3):  # at 0.2, 0.4 and 0.6 s: each within 0.5 s of the one before
            time.sleep(0.2)
            writer.create(pool(f"p{i}", f"10.{i}.0.0/16"))

    thread = threading.Thread(target=write)
    thread.start()
    events = list(store.watch("IPPool", since, timeout=0.5))
    thread.join()
    assert [e.resource.name for e in events] == ["p0", "p1", "p2"]


def test_watch_ends_after_the_quiet_timeout(any_store: Store) -> None:
    since = any_store.list("IPPool").revision
    started = time.monotonic()
    assert list(any_store.watch("IPPool", since, timeout=0.4)) == []
    elapsed = time.monotonic() - started
    assert 0.3 <= elapsed < 2.0


# ---------------------------------------------------------------------------------------------
# Nodes: the BGP attributes in spec


def node(spec: dict | None = None, labels: dict | None = None, annotations: dict | None = None):
    spec = spec if spec is not None else {"ipv4Address": "192.168.1.10/24", "asNumber": 64513}
    return Resource("Node", NODE_A, spec, labels or {}, annotations or {})


def test_node_round_trips_its_bgp_spec(any_store: Store) -> None:
    spec = {
        "ipv4Address": "192.168.1.10/24",
        "asNumber": 64513,
        "routeReflectorClusterID": "224.0.0.1",
    }
    created = any_store.create(node(spec, {"l3fabric.io/rack": "r1"}, {"example.com/owner": "ops"}))
    got = any_store.get("Node", NODE_A)
    assert got == created
    assert got.spec == spec
    assert isinstance(got.spec["asNumber"], int)
    assert got.labels == {"l3fabric.io/rack": "r1"}
    assert got.annotations == {"example.com/owner": "ops"}
    assert not any(key.startswith("l3fabric.io/") for key in got.annotations)


def test_node_spec_update_and_conflict(any_store: Store) -> None:
    created = any_store.create(node())
    updated = any_store.update(
        created.with_spec({"ipv4Address": "192.168.1.10/24", "asNumber": 65000})
    )
    assert any_store.get("Node", NODE_A).spec == {
        "ipv4Address": "192.168.1.10/24",
        "asNumber": 65000,
    }
    with pytest.raises(Conflict):
        any_store.update(created.with_spec({"asNumber": 1}))
    listed = any_store.list("Node").items
    assert [n.name for n in listed] == [NODE_A]
    assert listed[0] == updated


# ---------------------------------------------------------------------------------------------
# Kubernetes only


def _invalid(store: Store, obj: Resource) -> InvalidInput:
    with pytest.raises(InvalidInput) as info:
        store.create(obj)
    return info.value


@pytest.mark.kube
class TestKubeSchema:
    """The API server applies the CRD schema: code relying on undeclared fields breaks here."""

    def test_undeclared_fields_are_pruned(self, kube_backend: StoreBackend) -> None:
        store = kube_backend.store
        spec = {
            "cidr": "10.0.0.0/16",
            "blockSizeTypo": 24,
            "nodeSelector": {"matchLabels": {"rack": "r1"}, "matchLabel": {"x": "y"}},
        }
        created = store.create(Resource("IPPool", "pool-a", spec))
        expected = {"cidr": "10.0.0.0/16", "nodeSelector": {"matchLabels": {"rack": "r1"}}}
        assert created.spec == expected
        assert store.get("IPPool", "pool-a").spec == expected

    def test_invalid_enum_is_invalid_input_naming_the_field(
        self, kube_backend: StoreBackend
    ) -> None:
        error = _invalid(kube_backend.store, affinity("a-1", state="bogus"))
        assert error.field == "spec.state"
        assert "bogus" in str(error)
        with pytest.raises(NotFound):
            kube_backend.store.get("BlockAffinity", "a-1")

    @pytest.mark.parametrize(
        ("spec", "field"),
        [
            ({"node": NODE_A, "cidr": "10.0.0.0/26"}, "spec.state"),  # required
            ({"node": NODE_A, "cidr": 26, "state": "pending"}, "spec.cidr"),  # type
            ({"node": NODE_A, "cidr": "x", "state": "pending", "deleted": "yes"}, "spec.deleted"),
        ],
    )
    def test_schema_violations_name_the_field(
        self, kube_backend: StoreBackend, spec: dict, field: str
    ) -> None:
        assert _invalid(kube_backend.store, Resource("BlockAffinity", "a-1", spec)).field == field

    def test_numeric_limits(self, kube_backend: StoreBackend) -> None:
        too_big = Resource("IPPool", "p", {"cidr": "10.0.0.0/8", "blockSize": 129})
        assert _invalid(kube_backend.store, too_big).field == "spec.blockSize"
        not_int = Resource("IPPool", "p", {"cidr": "10.0.0.0/8", "blockSize": 26.5})
        assert _invalid(kube_backend.store, not_int).field == "spec.blockSize"

    def test_nulls_only_where_nullable(self, kube_backend: StoreBackend) -> None:
        block = {
            "cidr": "10.0.0.0/31",
            "allocations": [None, None],
            "unallocated": [0, None],  # not nullable
            "attributes": [],
            "sequenceNumber": 0,
        }
        error = _invalid(kube_backend.store, Resource("IPAMBlock", "10-0-0-0-31", block))
        assert error.field == "spec.unallocated[1]"

    def test_invalid_name_is_invalid_input(self, kube_backend: StoreBackend) -> None:
        assert _invalid(kube_backend.store, pool("Not_A_DNS_Name")).field == "metadata.name"

    def test_update_is_validated_too(self, kube_backend: StoreBackend) -> None:
        created = kube_backend.store.create(affinity("a-1"))
        with pytest.raises(InvalidInput) as info:
            kube_backend.store.update(created.with_spec({**created.spec, "state": "claimed"}))
        assert info.value.field == "spec.state"


@pytest.mark.kube
class TestKubeNodes:
    def test_bgp_spec_is_stored_as_node_annotations(self, kube_backend: StoreBackend) -> None:
        store = kube_backend.store
        store.create(node({"ipv4Address": "10.0.0.1/24", "asNumber": 64512}))
        raw = store.core.read_node(NODE_A)
        assert raw.metadata.annotations["l3fabric.io/ipv4-address"] == "10.0.0.1/24"
        assert raw.metadata.annotations["l3fabric.io/as-number"] == "64512"

    def test_update_keeps_what_others_own(self, kube_backend: StoreBackend) -> None:
        """The kubelet's and others' parts of a Node survive the store's writes."""
        store = kube_backend.store
        store.core.create_node(
            {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": NODE_A,
                    "labels": {"kubernetes.io/hostname": NODE_A, **dict([kube_backend.scope])},
                    "annotations": {"node.alpha.kubernetes.io/ttl": "0"},
                },
                "spec": {"podCIDR": "10.244.1.0/24", "unschedulable": True},
            }
        )
        got = store.get("Node", NODE_A)
        assert got.spec == {}
        assert got.labels == {"kubernetes.io/hostname": NODE_A}
        store.update(got.with_spec({"ipv4Address": "10.0.0.1/24", "asNumber": 64512}))
        raw = store.core.read_node(NODE_A)
        assert raw.spec.pod_cidr == "10.244.1.0/24"
        assert raw.spec.unschedulable is True
        assert raw.metadata.annotations["node.alpha.kubernetes.io/ttl"] == "0"
        assert raw.metadata.annotations["l3fabric.io/as-number"] == "64512"
        assert raw.metadata.labels["kubernetes.io/hostname"] == NODE_A

    def test_spec_holds_only_the_bgp_attributes(self, kube_backend: StoreBackend) -> None:
        error = _invalid(kube_backend.store, node({"podCIDR": "10.244.0.0/24"}))
        assert error.field == "spec.podCIDR"
        error = _invalid(kube_backend.store, node({"asNumber": "64512"}))
        assert error.field == "spec.asNumber"

    def test_bgp_annotations_cannot_be_written_directly(self, kube_backend: StoreBackend) -> None:
        error = _invalid(kube_backend.store, node({}, annotations={"l3fabric.io/as-number": "1"}))
        assert error.field == "annotations"


@pytest.mark.kube
class TestKubeErrors:
    def test_unreachable_server_is_store_unavailable(self, tmp_path: Path) -> None:
        from ipam_blocks.store.kube import KubeStore

        with socket.socket() as s:  # a port nobody listens on
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "c", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
                    "users": [{"name": "u", "user": {"token": "t"}}],
                    "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                    "current-context": "x",
                }
            )
        )
        store = KubeStore(str(kubeconfig))
        calls = [
            lambda: store.get("IPPool", "a"),
            lambda: store.list("Node"),
            lambda: store.create(pool("a")),
            lambda: store.delete("IPPool", "a", "1"),
            lambda: list(store.watch("IPPool", "1", 0.5)),
        ]
        for call in calls:
            started = time.monotonic()
            with pytest.raises(StoreUnavailable) as info:
                call()
            assert f"127.0.0.1:{port}" in str(info.value)
            assert "object at 0x" not in str(info.value)
            assert info.value.__cause__ is not None
            assert time.monotonic() - started < 5
        store.close()

    def test_missing_kubeconfig_is_invalid_input(self, tmp_path: Path) -> None:
        from ipam_blocks.store.kube import KubeStore

        with pytest.raises(InvalidInput) as info:
            KubeStore(str(tmp_path / "absent"))
        assert info.value.field == "kubeconfig"

    @pytest.mark.parametrize(
        ("code", "reason"),
        [(500, "InternalError"), (503, "ServiceUnavailable"), (429, "TooManyRequests")],
    )
    def test_server_errors_are_store_unavailable(
        self, kube_backend: StoreBackend, kube_api, code: int, reason: str
    ) -> None:
        kube_api.fail_next(code, reason=reason)
        with pytest.raises(StoreUnavailable) as info:
            kube_backend.store.list("IPPool")
        assert str(code) in str(info.value)
        assert kube_backend.store.list("IPPool").items == []  # and the next call works

    def test_workload_is_embedded_only(self, kube_backend: StoreBackend) -> None:
        assert not kube_backend.store.holds_workloads
        for call in (
            lambda: kube_backend.store.list("Workload"),
            lambda: kube_backend.store.create(Resource("Workload", "w", {"pod": "p"})),
        ):
            with pytest.raises(InvalidInput) as info:
                call()
            assert info.value.field == "kind"
            assert "embedded" in info.value.message

    def test_scope_label_is_reserved(self, kube_backend: StoreBackend) -> None:
        key, _ = kube_backend.scope
        with pytest.raises(InvalidInput) as info:
            kube_backend.store.create(pool("a", labels={key: "someone-else"}))
        assert info.value.field == "labels"

    def test_missing_crd_is_store_unavailable(self, tmp_path: Path) -> None:
        from ipam_blocks.store.kube import KubeStore
        from tests.kube_api_double import KubeApiDouble

        crds = tmp_path / "crds"
        crds.mkdir()
        with KubeApiDouble(crds) as bare:
            store = KubeStore(str(bare.kubeconfig))
            with pytest.raises(StoreUnavailable) as info:
                store.get("IPPool", "a")
            assert "ippools.l3fabric.io" in str(info.value)
            store.close()


@pytest.mark.kube
class TestKubeWatch:
    @pytest.mark.parametrize("bookmarks", [True, False])
    def test_watch_resumes_across_server_side_ends(
        self, kube_backend, kube_api, bookmarks: bool
    ) -> None:
        """Each server watch lasts 0.15 s: the store resumes from the last event or bookmark
        it saw, without losing or repeating events."""
        kube_api.max_watch_seconds = 0.15
        kube_api.send_bookmarks = bookmarks
        store = kube_backend.store
        writer = kube_backend.open()
        since = store.list("IPPool").revision

        def write() -> None:
            for i in range(4):  # the last at 0.6 s: the quiet period restarts with each event
                time.sleep(0.15)
                writer.create(pool(f"p{i}", f"10.{i}.0.0/16"))

        thread = threading.Thread(target=write)
        thread.start()
        events = take(store.watch("IPPool", since, timeout=0.5), 10)
        thread.join()
        assert [e.resource.name for e in events] == ["p0", "p1", "p2", "p3"]
        assert len({(m.method, m.path) for m in kube_api.requests if m.query.get("watch")}) == 1
        assert sum(1 for m in kube_api.requests if m.query.get("watch")) > 2

    def test_compacted_history_is_watch_expired(self, kube_backend, kube_api) -> None:
        store = kube_backend.store
        since = store.list("IPPool").revision
        store.create(pool("a"))
        kube_api.compact()
        with pytest.raises(WatchExpired) as info:
            list(store.watch("IPPool", since, timeout=0.5))
        assert isinstance(info.value, StoreUnavailable)
        # The documented recovery: list again, watch from there.
        listing = store.list("IPPool")
        assert [o.name for o in listing.items] == ["a"]
        assert list(store.watch("IPPool", listing.revision, timeout=0.2)) == []

    def test_sqlite_change_log_is_compacted_and_old_watches_expire(
        self, sqlite_backend: StoreBackend, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        from ipam_blocks.store import sqlite

        monkeypatch.setattr(sqlite, "COMPACT_EVERY", 10)
        monkeypatch.setattr(sqlite, "CHANGES_KEPT", 5)
        store = sqlite_backend.store
        since = store.list("IPPool").revision
        for i in range(30):
            store.create(pool(f"p{i}", f"10.{i}.0.0/16"))
        with pytest.raises(WatchExpired):
            list(store.watch("IPPool", since, timeout=0.2))
        listing = store.list("IPPool")
        assert len(listing.items) == 30  # objects stay; only their history is trimmed
        store.create(pool("late", "10.200.0.0/16"))
        assert [e.resource.name for e in store.watch("IPPool", listing.revision, 0.2)] == ["late"]

    def test_closing_a_watch_early_releases_it(self, kube_backend: StoreBackend) -> None:
        store = kube_backend.store
        since = store.list("IPPool").revision
        store.create(pool("a"))
        events = store.watch("IPPool", since, timeout=30)
        assert next(events).resource.name == "a"
        started = time.monotonic()
        events.close()  # type: ignore[attr-defined]
        assert time.monotonic() - started < 1
        store.create(pool("b", "10.2.0.0/16"))  # the client is still usable


@pytest.mark.kube
class TestKubeScopeAndWiring:
    def test_scopes_do_not_see_each_other(self, kube_backend, kube_api) -> None:
        from ipam_blocks.store.kube import KubeStore

        other = KubeStore(str(kube_api.kubeconfig), scope=(kube_backend.scope[0], "other"))
        try:
            since = kube_backend.store.list("IPPool").revision
            other.create(pool("theirs"))
            kube_backend.store.create(pool("ours", "10.2.0.0/16"))
            assert [o.name for o in kube_backend.store.list("IPPool").items] == ["ours"]
            assert [o.name for o in other.list("IPPool").items] == ["theirs"]
            events = take(kube_backend.store.watch("IPPool", since, timeout=0.3), 5)
            assert [e.resource.name for e in events] == ["ours"]
            assert events[0].resource.labels == {}  # the scope label stays out of sight
        finally:
            other.close()

    def test_open_store_kube_url(self, kube_api) -> None:
        from ipam_blocks.store.kube import KubeStore

        store = open_store(f"kube:{kube_api.kubeconfig}")
        try:
            assert isinstance(store, KubeStore)
            store.create(pool("via-url"))
            assert store.get("IPPool", "via-url").spec["cidr"] == "10.0.0.0/16"
        finally:
            store.close()

    def test_requests_stay_within_the_expected_rbac(self, kube_backend, kube_api) -> None:
        """What the store needs from RBAC: CRUD+list+watch on l3fabric.io, the same on nodes
        (patch, not put), and list on pods."""
        store = kube_backend.store
        a = store.create(pool("a"))
        store.update(a.with_spec({**a.spec, "disabled": True}))
        store.get("IPPool", "a")
        store.list("IPPool")
        list(store.watch("IPPool", a.revision, timeout=0.1))
        store.delete("IPPool", "a")
        n = store.create(node())
        store.update(n.with_spec({"asNumber": 64600}))
        store.get("Node", NODE_A)
        store.delete("Node", NODE_A, None)
        store.owner_liveness().live_pods()
        assert rbac_rules(kube_api.requests) == {
            ("l3fabric.io", "ippools"): {"create", "update", "get", "list", "watch", "delete"},
            ("", "nodes"): {"create", "patch", "get", "delete"},
            ("", "pods"): {"list"},
        }


def rbac_rules(requests: Iterable[RecordedRequest]) -> dict[tuple[str, str], set[str]]:
    """(API group, resource) -> RBAC verbs, derived from the requests the double recorded."""
    rules: dict[tuple[str, str], set[str]] = {}
    for r in requests:
        parts = r.path.strip("/").split("/")
        group, rest = ("", parts[2:]) if parts[0] == "api" else (parts[1], parts[3:])
        if rest[:1] == ["namespaces"]:
            rest = rest[2:]
        named = len(rest) > 1
        verb = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}.get(
            r.method, "get" if named else "watch" if r.query.get("watch") else "list"
        )
        rules.setdefault((group, "/".join(rest[:1] + rest[2:])), set()).add(verb)
    return rules


@pytest.mark.kube
def test_pod_liveness_lists_running_pods_with_their_nodes(kube_backend, kube_api) -> None:
    from ipam_blocks.store.kube import KubePodLiveness

    store = kube_backend.store
    core = store.core
    labels = dict([kube_backend.scope])

    def make_pod(ns: str, name: str, node_name: str | None) -> None:
        spec: dict = {"containers": [{"name": "c", "image": "busybox"}]}
        if node_name:
            spec["nodeName"] = node_name
        body = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "labels": labels},
            "spec": spec,
        }
        core.create_namespaced_pod(ns, body)

    make_pod("default", "web-1", NODE_A)
    make_pod("kube-system", "dns-1", "node-b")
    make_pod("default", "pending-1", None)
    make_pod("default", "done-1", NODE_A)
    make_pod("default", "failed-1", NODE_A)
    for name, phase in (("done-1", "Succeeded"), ("failed-1", "Failed")):
        raw = core.read_namespaced_pod(name, "default", _preload_content=False).json()
        raw["status"] = {"phase": phase}
        core.replace_namespaced_pod_status(name, "default", raw, _preload_content=False)

    liveness = store.owner_liveness()
    assert isinstance(liveness, KubePodLiveness)
    assert liveness.live_pods() == {
        PodRef("default", "web-1", NODE_A),
        PodRef("kube-system", "dns-1", "node-b"),
        PodRef("default", "pending-1", ""),
    }
    core.delete_namespaced_pod("web-1", "default")
    assert PodRef("default", "web-1", NODE_A) not in liveness.live_pods()


def test_embedded_store_holds_workloads_and_has_no_cluster_objects(
    sqlite_backend: StoreBackend,
) -> None:
    store = sqlite_backend.store
    assert store.holds_workloads
    assert store.secrets() is None
    assert store.lease("l3fabric-system", "l3fabric-ipam-gc") is None
    spec = {"pod": "web-1", "namespace": "default", "node": NODE_A}
    store.create(Resource("Workload", "net.c1", spec))
    assert store.owner_liveness().live_pods() == {PodRef("default", "web-1", NODE_A)}


@pytest.mark.kube
class TestKubeApiDoubleFidelity:
    """The test double answers like a real API server where a client can tell the difference."""

    @staticmethod
    def _api(kube_api):
        from kubernetes import client, config

        return client.CustomObjectsApi(config.new_client_from_config(str(kube_api.kubeconfig)))

    @staticmethod
    def _pool_body(name: str, cidr: str, labels: dict[str, str] | None = None) -> dict:
        return {
            "apiVersion": "l3fabric.io/v1",
            "kind": "IPPool",
            "metadata": {"name": name, "labels": labels or {}},
            "spec": {"cidr": cidr},
        }

    def test_replace_without_resource_version_is_unconditional(self, kube_api) -> None:
        api = self._api(kube_api)
        args = ("l3fabric.io", "v1", "ippools")
        created = api.create_cluster_custom_object(*args, self._pool_body("a", "10.0.0.0/8"))
        replaced = api.replace_cluster_custom_object(
            *args, "a", self._pool_body("a", "10.1.0.0/16")
        )
        assert replaced["spec"]["cidr"] == "10.1.0.0/16"
        assert replaced["metadata"]["resourceVersion"] != created["metadata"]["resourceVersion"]
        assert replaced["metadata"]["uid"] == created["metadata"]["uid"]
        # A write that changes nothing keeps the revision, as etcd3 storage does.
        again = api.replace_cluster_custom_object(*args, "a", replaced)
        assert again["metadata"]["resourceVersion"] == replaced["metadata"]["resourceVersion"]

    def test_watch_follows_objects_into_and_out_of_a_selector(self, kube_api) -> None:
        from kubernetes import watch

        api = self._api(kube_api)
        args = ("l3fabric.io", "v1", "ippools")
        since = api.list_cluster_custom_object(*args)["metadata"]["resourceVersion"]
        obj = api.create_cluster_custom_object(*args, self._pool_body("a", "10.0.0.0/8"))
        obj["metadata"]["labels"] = {"zone": "a"}
        obj = api.replace_cluster_custom_object(*args, "a", obj)
        obj["spec"]["natOutgoing"] = True
        obj = api.replace_cluster_custom_object(*args, "a", obj)
        obj["metadata"]["labels"] = {"zone": "b"}
        api.replace_cluster_custom_object(*args, "a", obj)
        stream = watch.Watch().stream(
            api.list_cluster_custom_object, *args, label_selector="zone=a",
            resource_version=since, timeout_seconds=1,
        )  # fmt: skip
        assert [e["type"] for e in stream] == ["ADDED", "MODIFIED", "DELETED"]

    def test_errors_are_status_objects_and_the_token_is_checked(self, kube_api) -> None:
        import json
        import urllib.error
        import urllib.request

        def fetch(path: str, token: str | None) -> tuple[int, dict]:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            request = urllib.request.Request(kube_api.url + path, headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=5) as response:
                    return response.status, json.loads(response.read())
            except urllib.error.HTTPError as e:
                return e.code, json.loads(e.read())

        code, body = fetch("/apis/example.com/v1/things", kube_api.token)
        assert (code, body["kind"], body["reason"]) == (404, "Status", "NotFound")
        code, body = fetch("/apis/l3fabric.io/v1/ippools", None)
        assert (code, body["kind"], body["reason"]) == (401, "Status", "Unauthorized")
        code, body = fetch("/apis/l3fabric.io/v1/ippools?fieldSelector=x", kube_api.token)
        assert (code, body["reason"]) == (400, "BadRequest")  # unimplemented: refused, loudly
