"""The chart's RBAC rules are exactly the API calls the code makes.

The agent's and the IPAM GC's own code runs against the Kubernetes API test double, which
records every request; each request becomes (API group, resource, verb, namespace, name)
(GET of one object = get, of a collection = list, with watch=true = watch; POST = create,
PUT = update, PATCH = patch, DELETE = delete). The rules the chart grants each component's
ServiceAccount (ClusterRoles through ClusterRoleBindings, Roles through RoleBindings, with
resourceNames) must allow every recorded call, and every rule must be used by some call.

The scenarios go through the branches that need distinct permissions: a CNI ADD that claims a
block after losing a claim race (affinity create/delete), DEL, STATUS, CHECK, the routing
reads and watches; GC releasing a leak, creating/settling/deleting handles, confirming and
deleting affinities, freeing the empty block of a deleted node, with Lease leader election.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from netaddr import IPAddress, IPNetwork

from bgp_speaker.pods.dataplane import PodAttachment
from bgp_speaker.pods.network import PodNetwork
from bgp_speaker.pods.records import WorkloadRecords, open_records_store
from bgp_speaker.routing.caches import CLUSTER_KINDS, NODE_KINDS, RoutingCaches
from bgp_speaker.routing.startup import _identity
from ipam_blocks import retry
from ipam_blocks.allocator import CLAIMED_AT_ANNOTATION, IPAM, NODE_LABEL, AssignRequest
from ipam_blocks.gc import SUSPECT_ANNOTATION
from ipam_blocks.gc_controller import GCLoopSettings, run_passes
from ipam_blocks.leader import LeaderElector, LeaseSettings
from ipam_blocks.model import AffinityState, affinity_name, handle_name
from ipam_blocks.node_labels import label_node_objects
from ipam_blocks.store.base import CRD_PLURALS, Resource
from ipam_blocks.store.kube import KubeStore
from l3fabric.cli import main as cli_main
from tests.chart.conftest import NAMESPACE, TOR_PEERS, render_objects
from tests.kube_api_double import KubeApiDouble, RecordedRequest
from tests.routing.caches import desired_of

NODE = "node-a"
UNANNOTATED = "node-c"
POOL = IPNetwork("10.244.0.0/24")
OLD = 1000.0  # "long ago" for allocations, claims and suspicions made in the setup
TOR_PASSWORD = "rack1-md5-secret"


@dataclass(frozen=True)
class Call:
    group: str
    resource: str
    verb: str
    namespace: str | None
    name: str | None


@dataclass(frozen=True)
class Grant:
    group: str
    resource: str
    verb: str
    namespace: str | None  # None: every namespace and cluster-scoped (a ClusterRoleBinding)
    name: str | None  # None: any name (no resourceNames)

    def allows(self, call: Call) -> bool:
        return (
            (self.group, self.resource, self.verb) == (call.group, call.resource, call.verb)
            and (self.namespace is None or self.namespace == call.namespace)
            and (self.name is None or self.name == call.name)
        )


def to_call(req: RecordedRequest) -> Call:
    parts = [p for p in req.path.split("/") if p]
    group, rest = ("", parts[2:]) if parts[0] == "api" else (parts[1], parts[3:])
    namespace = None
    if rest[0] == "namespaces" and len(rest) >= 3:
        namespace, rest = rest[1], rest[2:]
    resource = "/".join([rest[0], *rest[2:3]])  # subresources are resources of their own
    name = rest[1] if len(rest) > 1 else None
    match req.method:
        case "GET" if name:
            verb = "get"
        case "GET":
            verb = "watch" if req.query.get("watch") in ("true", "1") else "list"
        case "DELETE" if not name:
            verb = "deletecollection"
        case other:
            verb = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}[other]
    return Call(group, resource, verb, namespace, name)


def grants_of(objects: list[dict[str, Any]], service_account: str) -> set[Grant]:
    """What the chart's (Cluster)RoleBindings give one ServiceAccount of the release."""
    roles = {
        (o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]): o.get("rules") or []
        for o in objects
        if o["kind"] in ("Role", "ClusterRole")
    }
    grants = set()
    for binding in objects:
        if binding["kind"] not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        subject = {"kind": "ServiceAccount", "name": service_account, "namespace": NAMESPACE}
        if subject not in binding["subjects"]:
            continue
        ref = binding["roleRef"]
        namespace = binding["metadata"].get("namespace")  # None for a ClusterRoleBinding
        role_namespace = namespace if ref["kind"] == "Role" else None
        for rule in roles[(ref["kind"], role_namespace, ref["name"])]:
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    for verb in rule["verbs"]:
                        for name in rule.get("resourceNames") or [None]:
                            grants.add(Grant(group, resource, verb, namespace, name))
    return grants


def compare(calls: Iterable[Call], grants: set[Grant]) -> tuple[list[Call], list[Grant]]:
    """(calls no rule allows, grants no call uses)."""
    calls = set(calls)
    denied = sorted((c for c in calls if not any(g.allows(c) for g in grants)), key=repr)
    unused = sorted((g for g in grants if not any(g.allows(c) for c in calls)), key=repr)
    return denied, unused


@pytest.fixture(scope="module")
def chart_objects(chart: Any) -> list[dict[str, Any]]:
    # The ToR values set: it also renders the BGP password Role.
    return render_objects(chart, TOR_PEERS)


@pytest.fixture
def api() -> Iterator[KubeApiDouble]:
    with KubeApiDouble() as double:
        yield double


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(retry, "_pause", lambda budget, attempt: None)


@pytest.fixture(autouse=True)
def in_release_namespace(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POD_NAMESPACE", NAMESPACE)  # the agent's DaemonSet sets it


@pytest.fixture
def admin(api: KubeApiDouble) -> Iterator[KubeStore]:
    """The cluster admin (`helm install`, kubectl) setting the scene; not recorded."""
    store = KubeStore(str(api.kubeconfig))
    store.create(Resource("IPPool", "pool", {"cidr": str(POOL), "blockSize": 26}))
    store.create(Resource("Node", NODE, {"ipv4Address": "192.0.2.1/24"}, {"rack": "r1"}))
    store.create(Resource("Node", "node-b", {"ipv4Address": "192.0.2.2/24"}, {"rack": "r1"}))
    store.create(Resource("Node", UNANNOTATED, {}, {"rack": "r2"}))
    store.create(Resource("BGPConfiguration", "default", {"nodeToNodeMeshEnabled": True}))
    # The ToR peering as the chart's values set renders it: MD5 from a Secret of the release's
    # namespace, which the chart tells the agent through POD_NAMESPACE.
    store.core.create_namespaced_secret(
        NAMESPACE,
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "bgp-passwords"},
            "stringData": {"rack1": TOR_PASSWORD},
        },
    )
    store.create(
        Resource(
            "BGPPeer",
            "tor",
            {
                "peerIP": "192.0.2.254",
                "asNumber": 65001,
                "nodeSelector": {},
                "password": {"secretKeyRef": {"name": "bgp-passwords", "key": "rack1"}},
            },
        )
    )
    yield store
    store.close()


def _recorded(api: KubeApiDouble) -> list[Call]:
    return [to_call(r) for r in api.requests]


def _create_pod(admin: KubeStore, name: str, node: str) -> None:
    body = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "pause"}]},
    }
    admin.core.create_namespaced_pod("default", body, _preload_content=False)


# --- the agent -----------------------------------------------------------------------------


class FakeDataplane:
    """Veths are not the point here: the API calls are."""

    def attach(self, netns: str, ifname: str, host: str, addresses: Any, mtu: int):
        nets = tuple(IPNetwork(f"{ip}/32") for ip in addresses)
        return PodAttachment(host, ifname, netns, "02:00:00:00:00:01", nets, mtu)

    def detach(self, host: str, netns: str | None, ifname: str) -> None:
        pass

    def inspect(self, att: PodAttachment) -> list[str]:
        return []


def _cni(pods: PodNetwork, command: str, cid: str, **config: Any) -> Any:
    env = {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": cid,
        "CNI_NETNS": "/proc/self/ns/net",
        "CNI_IFNAME": "eth0",
        "CNI_PATH": "/opt/cni/bin",
        "CNI_ARGS": f"K8S_POD_NAMESPACE=default;K8S_POD_NAME=pod-{cid}",
    }
    config = {"cniVersion": "1.1.0", "name": "net", **config}
    return pods.ops()[f"cni.{command.lower()}"]({"env": env, "config": config})


def _watch_briefly(store: KubeStore, api: KubeApiDouble) -> None:
    """The agent's caches, until they have started a watch of every kind they follow."""
    plurals = {"Node": "nodes", **CRD_PLURALS}
    wanted = {plurals[k] for k in (*CLUSTER_KINDS, *NODE_KINDS)}

    async def run() -> None:
        caches = RoutingCaches(store, NODE)
        caches.start(lambda: None)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            watching = {c.resource for c in _recorded(api) if c.verb == "watch"}
            if wanted <= watching:
                break
            await asyncio.sleep(0.02)
        caches.stop()
        # Recorded what it needed: cut the watches short instead of waiting out their timeout.
        quiet = [logging.getLogger(n) for n in ("l3fabric.informer", "urllib3")]
        levels = [q.level for q in quiet]
        for q in quiet:
            q.setLevel(logging.CRITICAL)
        try:
            api.stop()
            await asyncio.to_thread(caches.stop, 10)
        finally:
            for q, level in zip(quiet, levels, strict=True):
                q.setLevel(level)

    asyncio.run(run())


def run_agent_scenario(api: KubeApiDouble, admin: KubeStore, tmp_path: Path) -> list[Call]:
    # Node-b owns a block; node-a holds a pending claim on that same block (a claim race it
    # lost), and a handle for the pod it is about to add, left by an earlier life of the node
    # whose local records are gone.
    setup = IPAM(admin, clock=lambda: OLD)
    (b_ip,) = setup.auto_assign(AssignRequest("node-b", "net.b1", pod="b1", namespace="default"))
    b_block = next(b.cidr for b in setup.blocks() if IPAddress(b_ip) in b.cidr)
    admin.create(
        Resource(
            "BlockAffinity",
            affinity_name(NODE, b_block),
            {"node": NODE, "cidr": str(b_block), "state": AffinityState.PENDING.value},
            {NODE_LABEL: NODE},
            {CLAIMED_AT_ANNOTATION: str(int(OLD))},
        )
    )
    spare = next(b for b in POOL.subnet(26) if b != b_block)
    admin.create(
        Resource(
            "IPAMHandle", handle_name("net.c1"), {"handleID": "net.c1", "block": {str(spare): 1}}
        )
    )
    api.requests.clear()

    store = KubeStore(str(api.kubeconfig))  # the agent's own client
    try:
        ipam = IPAM(store)
        ipam.node(NODE)  # start-up check (agent._prepare_host)
        assert _identity(store, NODE) is not None  # routing start (routing_main)
        # A node nobody annotated: the agent writes the address it detected to its Node.
        detected = IPNetwork("192.0.2.3/24")
        assert _identity(store, UNANNOTATED, lambda: detected) is not None
        records = WorkloadRecords(open_records_store(store, tmp_path), NODE)
        pods = PodNetwork(NODE, ipam, records, FakeDataplane(), 1500)
        _cni(pods, "STATUS", "c1")
        added = _cni(pods, "ADD", "c1")
        _cni(pods, "ADD", "c2")
        _cni(pods, "CHECK", "c1", prevResult=added)
        _cni(pods, "DEL", "c1")
        _cni(pods, "DEL", "c2")
        label_node_objects(store, NODE)  # routing start, before its caches
        desired = desired_of(store, NODE)
        assert desired is not None
        [tor] = [s for s in desired.sessions if str(s.peer_ip) == "192.0.2.254"]
        assert tor.md5_password == TOR_PASSWORD  # read from the Secret
        _watch_briefly(store, api)
    finally:
        store.close()
    return _recorded(api)  # the double is stopped now; its record stays


def test_agent_rbac_is_exactly_what_the_agent_calls(api, admin, tmp_path, chart_objects):
    calls = run_agent_scenario(api, admin, tmp_path)
    grants = grants_of(chart_objects, "l3fabric-agent")
    denied, unused = compare(calls, grants)
    assert denied == [], "calls the chart does not allow"
    assert unused == [], "rules no agent code path uses"
    # The scenario went through the branches the rules are there for.
    verbs = {(c.resource, c.verb) for c in calls}
    assert {
        ("blockaffinities", "delete"),
        ("ipamhandles", "update"),
        ("nodes", "watch"),
        ("nodes", "patch"),
        ("secrets", "get"),
    } <= verbs


def test_an_unreadable_password_secret_holds_the_session_back(api, admin, tmp_path):
    # The Secret is gone: the session waits rather than coming up without MD5.
    admin.core.delete_namespaced_secret("bgp-passwords", NAMESPACE)
    store = KubeStore(str(api.kubeconfig))
    try:
        desired = desired_of(store, NODE)
    finally:
        store.close()
    assert desired is not None
    [tor] = [s for s in desired.sessions if str(s.peer_ip) == "192.0.2.254"]
    assert tor.md5_password is None
    [(peer, why)] = desired.peering.waiting  # so Peering.plan_sessions leaves it out
    assert str(peer) == "192.0.2.254"
    assert f"Secret {NAMESPACE}/bgp-passwords not readable (404)" in why, why


# --- the IPAM GC ---------------------------------------------------------------------------


def _gc_setup(api: KubeApiDouble, admin: KubeStore) -> None:
    """One of everything GC repairs, made long ago."""
    setup = IPAM(admin, clock=lambda: OLD)

    def assign(node: str, handle: str, pod: str) -> IPNetwork:
        (ip,) = setup.auto_assign(AssignRequest(node, handle, pod=pod, namespace="default"))
        return next(b.cidr for b in setup.blocks() if IPAddress(ip) in b.cidr)

    admin.create(Resource("Node", "gone", {}))
    block = assign(NODE, "net.leak", "leaked")  # its pod never existed: a leak
    assign(NODE, "net.live1", "live1")  # alive, but its handle is lost
    assign(NODE, "net.live2", "live2")  # alive, its handle undercounts
    for pod in ("live1", "live2"):
        _create_pod(admin, pod, NODE)
    admin.delete("IPAMHandle", handle_name("net.live1"))
    live2 = admin.get("IPAMHandle", handle_name("net.live2"))
    admin.update(live2.with_spec({**live2.spec, "block": {}}))
    admin.create(
        Resource(
            "IPAMHandle",
            handle_name("net.orphan"),
            {"handleID": "net.orphan", "block": {str(block): 1}},
            annotations={SUSPECT_ANNOTATION: str(int(OLD))},
        )
    )
    # A node that is gone, leaving an empty block behind.
    assign("gone", "net.gone", "gone")
    setup.release_handle("net.gone")
    admin.delete("Node", "gone")
    # An unfinished claim of a block that exists, and one of a block that does not.
    setup._set_affinity_state(NODE, block, AffinityState.PENDING)
    missing = next(b for b in POOL.subnet(26) if b not in {blk.cidr for blk in setup.blocks()})
    admin.create(
        Resource(
            "BlockAffinity",
            affinity_name(NODE, missing),
            {"node": NODE, "cidr": str(missing), "state": AffinityState.PENDING.value},
            {NODE_LABEL: NODE},
            {CLAIMED_AT_ANNOTATION: str(int(OLD))},
        )
    )


def run_gc_scenario(api: KubeApiDouble, admin: KubeStore) -> tuple[list[Call], Any]:
    _gc_setup(api, admin)
    api.requests.clear()
    store = KubeStore(str(api.kubeconfig))  # the collector's own client
    results = []
    try:
        lease = LeaseSettings(NAMESPACE, "l3fabric-ipam-gc", "gc-0")
        elector = LeaderElector(store.lease(NAMESPACE, lease.name), lease)
        assert elector.try_acquire_or_renew()  # get (none yet), create
        stop = __import__("threading").Event()

        def report(result: Any) -> None:
            results.append(result)
            stop.set()

        passes = run_passes(
            IPAM(store), store.owner_liveness(), GCLoopSettings(60, 900, lease), stop,
            elector=elector, report=report,
        )  # fmt: skip
        assert passes == 1
        assert elector.try_acquire_or_renew()  # get, update (renew)
        elector.release()  # update
    finally:
        store.close()
    return _recorded(api), results[0]


def test_gc_rbac_is_exactly_what_the_collector_calls(api, admin, chart_objects):
    calls, result = run_gc_scenario(api, admin)
    # Every repair happened, so every branch that needs a permission ran.
    assert len(result.released_ips) == 1
    assert sorted(result.settled_handles) == ["net.live1", "net.live2", "net.orphan"]
    assert len(result.released_blocks) == 1
    assert len(result.resolved_affinities) == 3
    denied, unused = compare(calls, grants_of(chart_objects, "l3fabric-ipam-gc"))
    assert denied == [], "calls the chart does not allow"
    assert unused == [], "rules no collector code path uses"


def test_notes_commands_run_with_the_collectors_rights(api, admin, chart_objects, capsys):
    """NOTES.txt tells users to run `ipam show` and `ipam check` in the collector's pod."""
    _gc_setup(api, admin)
    api.requests.clear()
    store_url = f"kube:{api.kubeconfig}"
    assert cli_main(["ipam", "show", "--show-blocks", "--store", store_url]) == 0
    assert cli_main(["ipam", "check", "--store", store_url]) == 1  # the leak is there
    denied, _ = compare(_recorded(api), grants_of(chart_objects, "l3fabric-ipam-gc"))
    assert denied == []
    capsys.readouterr()


def test_the_comparison_sees_a_missing_and_an_extra_rule(api, admin, tmp_path, chart_objects):
    calls = run_agent_scenario(api, admin, tmp_path)
    grants = grants_of(chart_objects, "l3fabric-agent")
    watch_nodes = Grant("", "nodes", "watch", None, None)
    denied, _ = compare(calls, grants - {watch_nodes})
    assert [(c.resource, c.verb) for c in denied] == [("nodes", "watch")]
    _, unused = compare(calls, grants | {Grant("", "pods", "list", None, None)})
    assert Grant("", "pods", "list", None, None) in unused
