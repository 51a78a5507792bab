"""The CNI verbs' logic (`bgp_speaker.pods`) on a real SQLite store and an in-memory
dataplane: orderings, rollback, idempotency, error codes. The real dataplane is exercised
by tests/cni/test_plugin.py."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from netaddr import IPAddress, IPNetwork

from bgp_speaker.pods.dataplane import DataplaneError, NetnsNotFound, PodAttachment
from bgp_speaker.pods.network import PodNetwork, pod_host_ifname
from bgp_speaker.pods.records import WorkloadRecords
from cni import errors
from cni.errors import CniError
from ipam_blocks import block as blockmath
from ipam_blocks import retry
from ipam_blocks.allocator import IPAM, AssignRequest
from ipam_blocks.check import check
from ipam_blocks.errors import StoreUnavailable
from ipam_blocks.model import IPPool, Node
from ipam_blocks.pools import add_node, add_pool
from ipam_blocks.store.sqlite import SqliteStore
from ipam_blocks.store.workloads import WorkloadRecordLiveness

NODE = "node-a"
NETNS = "/proc/self/ns/net"  # a real namespace file the netns pre-check accepts, no root


class FakeDataplane:
    """Records veths by host name; `fail` makes the next attach raise."""

    def __init__(self) -> None:
        self.pods: dict[str, PodAttachment] = {}
        self.fail: Exception | None = None
        self.problems: list[str] = []
        self.detached: list[str] = []

    def attach(
        self, netns: str, ifname: str, host: str, addresses: Sequence[IPAddress], mtu: int
    ) -> PodAttachment:
        if self.fail is not None:
            raise self.fail
        nets = tuple(IPNetwork(f"{ip}/32") for ip in addresses)
        self.pods[host] = PodAttachment(host, ifname, netns, "02:00:00:00:00:01", nets, mtu)
        return self.pods[host]

    def detach(self, host: str, netns: str | None, ifname: str) -> None:
        self.detached.append(host)
        self.pods.pop(host, None)

    def inspect(self, att: PodAttachment) -> list[str]:
        return list(self.problems)


class DownStore:
    """A store that cannot be reached."""

    def __getattr__(self, name: str) -> Any:
        def fail(*args: Any, **kwargs: Any) -> Any:
            raise StoreUnavailable("connection refused")

        return fail


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(retry, "_pause", lambda budget, attempt: None)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    s = SqliteStore(tmp_path / "store.db")
    ipam = IPAM(s)
    add_pool(ipam, IPPool("main", IPNetwork("10.60.0.0/24"), 28))
    add_pool(ipam, IPPool("tiny", IPNetwork("10.61.0.0/31"), 31))
    add_node(ipam, Node(NODE))
    yield s
    s.close()


@pytest.fixture
def dp() -> FakeDataplane:
    return FakeDataplane()


@pytest.fixture
def pods(store: SqliteStore, dp: FakeDataplane) -> PodNetwork:
    return PodNetwork(NODE, IPAM(store), WorkloadRecords(store, NODE), dp, 1500)


def cni(
    pods: PodNetwork,
    command: str,
    cid: str = "c1",
    pod: str = "p1",
    *,
    netns: str = NETNS,
    ifname: str = "eth0",
    **conf: Any,
) -> Any:
    """One CNI call through the agent's op table, as the socket server makes it."""
    env = {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": cid,
        "CNI_NETNS": netns,
        "CNI_IFNAME": ifname,
        "CNI_PATH": "/opt/cni/bin",
        "CNI_ARGS": f"K8S_POD_NAMESPACE=ns;K8S_POD_NAME={pod}" if pod else "",
    }
    config = {"cniVersion": "1.0.0", "name": "net", **conf}
    return pods.ops()[f"cni.{command.lower()}"]({"env": env, "config": config})


def allocated(store: SqliteStore) -> list[str]:
    return [str(ip) for b in IPAM(store).blocks() for ip, _, _ in blockmath.allocated(b)]


def assert_clean(store: SqliteStore, dp: FakeDataplane) -> None:
    assert allocated(store) == []
    assert store.list("Workload").items == []
    assert dp.pods == {}
    report = check(IPAM(store), WorkloadRecordLiveness(store))
    assert report.clean, report.to_dict()


def cni_error(pods: PodNetwork, command: str, *args: Any, **kwargs: Any) -> CniError:
    with pytest.raises(CniError) as err:
        cni(pods, command, *args, **kwargs)
    return err.value


# --- ADD -----------------------------------------------------------------------------------


def test_add_records_allocates_and_attaches(pods: PodNetwork, store, dp) -> None:
    result = cni(pods, "ADD")
    [ip] = allocated(store)
    assert result["ips"] == [{"address": f"{ip}/32", "gateway": "169.254.1.1", "interface": 1}]
    host = pod_host_ifname("ns", "p1", "c1")
    assert result["interfaces"][0] == {"name": host, "mac": "ee:ee:ee:ee:ee:ee"}
    [record] = WorkloadRecords(store, NODE).on_node()
    assert (record.handle_id, record.pod, record.addresses) == ("net.c1", "p1", (ip,))
    # In embedded mode the record is what tells GC the allocation is alive.
    assert check(IPAM(store), WorkloadRecordLiveness(store)).clean


def test_repeated_add_allocates_nothing_new(pods: PodNetwork, store, dp) -> None:
    first = cni(pods, "ADD")
    assert cni(pods, "ADD") == first
    assert len(allocated(store)) == 1


def test_add_after_an_interrupted_add_starts_from_a_clean_handle(
    pods: PodNetwork, store, dp
) -> None:
    """A crash between allocating and recording the address leaves a record without
    addresses and an allocation on the handle: the retried ADD must not hold two."""
    cni(pods, "ADD")
    records = WorkloadRecords(store, NODE)
    record = records.get("net.c1")
    records.set_addresses(record, ())
    cni(pods, "ADD")
    assert len(allocated(store)) == 1


def test_failed_attach_releases_everything(pods: PodNetwork, store, dp) -> None:
    dp.fail = DataplaneError("create veth: File exists")
    err = cni_error(pods, "ADD")
    assert err.code == errors.DATAPLANE_FAILED and "File exists" in err.details
    assert_clean(store, dp)


def test_netns_vanishing_mid_add_is_a_clean_error(pods: PodNetwork, store, dp) -> None:
    dp.fail = NetnsNotFound("network namespace '/run/netns/x': does not exist")
    assert cni_error(pods, "ADD").code == errors.NETNS_NOT_FOUND
    assert_clean(store, dp)


def test_missing_netns_is_refused_before_anything_is_written(
    pods: PodNetwork, store, dp, tmp_path: Path
) -> None:
    err = cni_error(pods, "ADD", netns=str(tmp_path / "nope"))
    assert err.code == errors.NETNS_NOT_FOUND
    assert_clean(store, dp)


def test_full_pool_is_code_100_and_leaves_nothing(pods: PodNetwork, store, dp) -> None:
    tiny = {"ipam": {"pools": ["tiny"]}}
    cni(pods, "ADD", "c1", "p1", **tiny)
    cni(pods, "ADD", "c2", "p2", **tiny)
    err = cni_error(pods, "ADD", "c3", "p3", **tiny)
    assert err.code == errors.POOL_EXHAUSTED and "tiny" in err.details
    assert len(allocated(store)) == 2 and len(store.list("Workload").items) == 2
    assert pod_host_ifname("ns", "p3", "c3") not in dp.pods


def test_unknown_pool_and_unknown_node_are_invalid_config(store, dp) -> None:
    pods = PodNetwork(NODE, IPAM(store), WorkloadRecords(store, NODE), dp, 1500)
    err = cni_error(pods, "ADD", ipam={"pools": ["nope"]})
    assert err.code == errors.INVALID_CONFIG and "nope" in err.details
    stranger = PodNetwork("node-z", IPAM(store), WorkloadRecords(store, "node-z"), dp, 1500)
    err = cni_error(stranger, "ADD")
    assert err.code == errors.INVALID_CONFIG and "node-z" in err.details
    assert_clean(store, dp)


def test_store_down_is_try_again_later(dp) -> None:
    down = DownStore()
    pods = PodNetwork(NODE, IPAM(down), WorkloadRecords(down, NODE), dp, 1500)  # type: ignore[arg-type]
    for command in ("ADD", "DEL"):
        err = cni_error(pods, command)
        assert err.code == errors.TRY_AGAIN_LATER and "connection refused" in err.details
    assert dp.pods == {}


def test_second_ifname_for_the_same_container_is_refused(pods: PodNetwork) -> None:
    cni(pods, "ADD")
    assert cni_error(pods, "ADD", ifname="net1").code == errors.ATTACHMENT_CONFLICT


def test_concurrent_adds_of_one_container_allocate_once(pods: PodNetwork, store) -> None:
    results: list[Any] = []
    threads = [threading.Thread(target=lambda: results.append(cni(pods, "ADD"))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 6 and all(r == results[0] for r in results)
    assert len(allocated(store)) == 1


# --- DEL -----------------------------------------------------------------------------------


def test_del_is_idempotent(pods: PodNetwork, store, dp) -> None:
    cni(pods, "DEL", "never-added")
    cni(pods, "ADD")
    cni(pods, "DEL")
    cni(pods, "DEL")
    assert_clean(store, dp)


def test_del_of_an_old_sandbox_spares_the_new_sandboxs_veth(pods: PodNetwork, store, dp) -> None:
    """Same pod, new sandbox ADDed before the old one's DEL: they share the host veth name,
    and the veth now belongs to the new sandbox."""
    old = cni(pods, "ADD", "old", "web")
    new = cni(pods, "ADD", "new", "web")
    cni(pods, "DEL", "old", "web")
    host = pod_host_ifname("ns", "web", "new")
    assert host in dp.pods
    assert allocated(store) == [new["ips"][0]["address"].split("/")[0]]
    assert old["ips"] != new["ips"]
    cni(pods, "DEL", "new", "web")
    assert_clean(store, dp)


# --- CHECK ---------------------------------------------------------------------------------


def test_check(pods: PodNetwork, dp) -> None:
    result = cni(pods, "ADD")
    cni(pods, "CHECK", prevResult=result)

    dp.problems = ["eth0: address 10.60.0.1/32 missing"]
    err = cni_error(pods, "CHECK", prevResult=result)
    assert err.code == errors.CHECK_FAILED and "10.60.0.1/32 missing" in err.details

    dp.problems = []
    wrong = {**result, "ips": [{"address": "10.9.9.9/32", "interface": 1}]}
    err = cni_error(pods, "CHECK", prevResult=wrong)
    assert err.code == errors.CHECK_FAILED and "10.9.9.9/32" in err.details

    err = cni_error(pods, "CHECK", "other", prevResult=result)
    assert err.code == errors.CONTAINER_UNKNOWN


# --- STATUS and GC -------------------------------------------------------------------------


def test_status(pods: PodNetwork, store, dp) -> None:
    cni(pods, "STATUS", cniVersion="1.1.0")
    err = cni_error(pods, "STATUS", cniVersion="1.1.0", ipam={"pools": ["x"]})
    assert err.code == errors.NOT_AVAILABLE
    down = DownStore()
    unreachable = PodNetwork(NODE, IPAM(down), WorkloadRecords(down, NODE), dp, 1500)  # type: ignore[arg-type]
    err = cni_error(unreachable, "STATUS", cniVersion="1.1.0")
    assert err.code == errors.NOT_AVAILABLE and "connection refused" in err.details


def gc(pods: PodNetwork, *valid: str) -> None:
    attachments = [{"containerID": cid, "ifname": "eth0"} for cid in valid]
    cni(pods, "GC", cniVersion="1.1.0", **{"cni.dev/valid-attachments": attachments})


def test_gc_releases_unlisted_attachments_and_unrecorded_allocations(
    pods: PodNetwork, store, dp
) -> None:
    kept = cni(pods, "ADD", "keep", "keep")
    cni(pods, "ADD", "drop", "drop")
    ipam = IPAM(store)
    ipam.auto_assign(AssignRequest(node=NODE, handle_id="net.crashed"))  # no record
    ipam.auto_assign(AssignRequest(node=NODE, handle_id="othernet.x"))  # not our network
    gc(pods, "keep")
    remaining = sorted(allocated(store))
    assert kept["ips"][0]["address"].split("/")[0] in remaining and len(remaining) == 2
    assert [w.container_id for w in WorkloadRecords(store, NODE).on_node()] == ["keep"]
    assert list(dp.pods) == [pod_host_ifname("ns", "keep", "keep")]


def test_gc_skips_attachments_in_flight(pods: PodNetwork, store) -> None:
    cni(pods, "ADD", "busy", "busy")
    with pods._locks.hold("net.busy"):
        gc(pods)
    assert len(allocated(store)) == 1
    gc(pods)
    assert allocated(store) == []


# --- the op wrapper ------------------------------------------------------------------------


def test_op_refuses_a_command_that_does_not_match(pods: PodNetwork) -> None:
    env = {"CNI_COMMAND": "DEL", "CNI_CONTAINERID": "c", "CNI_IFNAME": "eth0", "CNI_PATH": "/"}
    config = {"cniVersion": "1.0.0", "name": "net"}
    with pytest.raises(CniError) as exc:
        pods.ops()["cni.add"]({"env": env, "config": config})
    err = exc.value
    assert err.code == errors.INVALID_ENV and "expected ADD" in err.msg
