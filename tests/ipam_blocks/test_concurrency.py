"""Eight allocator processes on one store: no address twice, blocks and affinities agree.

8 OS processes (spawned, so nothing is shared but the store) x 250 automatic assignments over
4 nodes, 2 processes per node, so processes of one node race for the same blocks and nodes race
for new ones. Runs on the SQLite store, on the Kubernetes store through the API server test
double, and on a real cluster when L3FABRIC_TEST_KUBECONFIG names one.

The assignments carry no pod name. `check.analyze` only calls an allocation of type Pod a
leak when it names a pod that does not exist, so nameless ones are never leak candidates, and
a clean report then means exactly what this test is about: no broken block, no duplicate
address, every handle counting what it holds, every affinity confirmed and matching its block.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections import Counter
from dataclasses import dataclass
from queue import Empty

import pytest
from netaddr import IPAddress, IPNetwork

from ipam_blocks import block as blockmath
from ipam_blocks.allocator import IPAM, AssignRequest
from ipam_blocks.check import analyze, take_snapshot
from ipam_blocks.liveness import PodRef
from ipam_blocks.model import AffinityState, IPPool, Node, parse_handle
from ipam_blocks.pools import add_node, add_pool
from ipam_blocks.store.base import Store
from tests.store.conftest import KUBECONFIG_ENV, kube_backend, real_cluster_kubeconfig

# Fixtures of the store test suite, for the real-cluster run (imported: pytest finds them here).
__all__ = ["kube_backend", "real_cluster_kubeconfig"]

pytestmark = pytest.mark.slow

PROCESSES = 8
PER_PROCESS = 250
NODES = 4
BLOCK_SIZE = 26
TIME_LIMIT = 60.0


@dataclass(frozen=True)
class StoreSpec:
    """How a child process opens the shared store (picklable; each process opens its own)."""

    backend: str  # "sqlite" | "kube"
    location: str  # database path | kubeconfig path
    scope: tuple[str, str] | None = None
    prefix: str = ""  # names of nodes and handles, unique per run on a shared cluster
    pool_cidr: str = "10.0.0.0/16"

    def open(self) -> Store:
        if self.backend == "sqlite":
            from ipam_blocks.store.sqlite import SqliteStore

            return SqliteStore(self.location)
        from ipam_blocks.store.kube import KubeStore

        return KubeStore(kubeconfig=self.location, scope=self.scope)

    def node(self, i: int) -> str:
        return f"{self.prefix}node-{i}"


def _allocate(spec: StoreSpec, worker: int, ready, go, results) -> None:
    """Child process: PER_PROCESS automatic assignments for node worker % NODES."""
    try:
        store = spec.open()
        ipam = IPAM(store)
        node = spec.node(worker % NODES)
        ready.put(worker)
        go.wait(60)
        got = []
        for i in range(PER_PROCESS):
            handle = f"{spec.prefix}w{worker}-{i}"
            (ip,) = ipam.auto_assign(AssignRequest(node=node, handle_id=handle))
            got.append((handle, node, str(ip)))
        store.close()
        results.put((worker, got, None))
    except BaseException as e:  # report, do not hang the parent
        results.put((worker, [], f"{type(e).__name__}: {e}"))


def get_from_children(queue, procs, timeout: float):
    """queue.get, but fail fast when a child process died instead of answering."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return queue.get(timeout=0.5)
        except Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"child processes failed (exit codes {dead})") from None


def run_allocators(spec: StoreSpec) -> tuple[list[tuple[str, str, str]], float]:
    """Start the processes, release them together, return every (handle, node, ip)."""
    ctx = multiprocessing.get_context("spawn")
    ready, go, results = ctx.Queue(), ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(target=_allocate, args=(spec, w, ready, go, results), daemon=True)
        for w in range(PROCESSES)
    ]
    for p in procs:
        p.start()
    try:
        for _ in procs:  # each child has imported everything and opened the store
            get_from_children(ready, procs, 60)
        start = time.monotonic()
        go.set()
        out, errors = [], []
        for _ in procs:
            worker, got, error = get_from_children(results, procs, TIME_LIMIT * 2)
            out += got
            if error:
                errors.append(f"worker {worker}: {error}")
        elapsed = time.monotonic() - start
        assert not errors, errors
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return out, elapsed


def prepare(store: Store, spec: StoreSpec) -> IPAM:
    ipam = IPAM(store)
    add_pool(ipam, IPPool(f"{spec.prefix}pool", IPNetwork(spec.pool_cidr), BLOCK_SIZE))
    for i in range(NODES):
        add_node(ipam, Node(spec.node(i)))
    return ipam


def verify(ipam: IPAM, spec: StoreSpec, assigned: list[tuple[str, str, str]]) -> None:
    pool = IPNetwork(spec.pool_cidr)
    total = PROCESSES * PER_PROCESS
    ips = [IPAddress(ip) for _, _, ip in assigned]
    assert len(ips) == total
    dupes = [ip for ip, n in Counter(ips).items() if n > 1]
    assert not dupes, f"handed out twice: {dupes[:10]}"
    assert all(ip in pool for ip in ips)

    blocks = {b.cidr: b for b in ipam.blocks()}
    affinities = ipam.affinities()
    # Every block is affine to exactly one node, and affinities and blocks agree.
    assert all(b.affinity in {spec.node(i) for i in range(NODES)} for b in blocks.values())
    per_cidr = Counter(a.cidr for a in affinities)
    assert [c for c, n in per_cidr.items() if n > 1] == []
    assert {(a.cidr, a.node) for a in affinities} == {(c, b.affinity) for c, b in blocks.items()}
    assert {a.state for a in affinities} == {AffinityState.CONFIRMED}

    # Each address is held by the handle that was told it got it, in its node's own block
    # (the pool is far from full, so nobody had to borrow).
    in_use = sum(blockmath.in_use_count(b) for b in blocks.values())
    assert in_use == total
    for handle, node, ip_text in assigned:
        ip = IPAddress(ip_text)
        blk = blocks[IPNetwork(f"{ip}/{BLOCK_SIZE}").cidr]
        index = blk.allocations[blockmath.ordinal_of(blk, ip)]
        assert index is not None, f"{ip} of {handle} is not allocated"
        assert blk.attributes[index].handle_id == handle
        assert blk.affinity == node

    handles = {
        h.handle_id: h for h in (parse_handle(r) for r in ipam.store.list("IPAMHandle").items)
    }
    assert len(handles) == total
    for handle, _, ip_text in assigned:
        cidr = IPNetwork(f"{ip_text}/{BLOCK_SIZE}").cidr
        assert dict(handles[handle].blocks) == {str(cidr): 1}, handle

    class NoPods:
        def live_pods(self) -> frozenset[PodRef]:
            return frozenset()

    report = analyze(take_snapshot(ipam, NoPods()))
    assert report.clean, report.to_dict()


def _run(store: Store, spec: StoreSpec) -> float:
    ipam = prepare(store, spec)
    assigned, elapsed = run_allocators(spec)
    verify(ipam, spec, assigned)
    assert elapsed < TIME_LIMIT, f"{PROCESSES}x{PER_PROCESS} assignments took {elapsed:.1f}s"
    return elapsed


def test_eight_allocators_on_one_sqlite_store(tmp_path) -> None:
    from ipam_blocks.store.sqlite import SqliteStore

    spec = StoreSpec("sqlite", str(tmp_path / "ipam.db"))
    store = SqliteStore(spec.location)
    try:
        _run(store, spec)
    finally:
        store.close()


# --- Kubernetes --------------------------------------------------------------------------------


@pytest.mark.kube
def test_eight_allocators_on_the_kube_store_via_the_api_double(tmp_path) -> None:
    from ipam_blocks.store.kube import KubeStore
    from tests.kube_api_double import KubeApiDouble

    # The double serves from this process's threads; the scope label is on, as on a cluster.
    with KubeApiDouble(kubeconfig=tmp_path / "kubeconfig") as double:
        spec = StoreSpec("kube", str(double.kubeconfig), scope=("test.l3fabric.io/run", "conc"))
        store = spec.open()
        assert isinstance(store, KubeStore)
        try:
            _run(store, spec)
        finally:
            store.close()


@pytest.mark.kube
@pytest.mark.skipif(
    not os.environ.get(KUBECONFIG_ENV), reason=f"{KUBECONFIG_ENV} names no real cluster"
)
def test_eight_allocators_on_a_real_cluster(request: pytest.FixtureRequest) -> None:
    """Against the real API server: `kube_backend` (tests/store/conftest.py) applies the CRDs,
    scopes every object with a run-unique label and deletes them afterwards; names and the
    pool are run-unique too, so nothing collides with what the cluster really runs."""
    backend = request.getfixturevalue("kube_backend")
    assert backend.real_cluster
    run = backend.scope[1]
    spec = StoreSpec(
        "kube",
        str(backend.kubeconfig),
        scope=backend.scope,
        prefix=f"l3f-test-{run}-",
        pool_cidr="198.18.0.0/16",  # the benchmarking range (RFC 2544): no real pool uses it
    )
    _run(backend.store, spec)
