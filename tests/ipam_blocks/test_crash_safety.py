"""Allocators SIGKILLed at random points leave no doubled or lost address (DESIGN §10).

Worker processes churn on one SQLite store the way `l3fabric ipam assign --pod` and
`ipam release` do: record the Workload, assign, ... release the handle, forget the Workload.
Each worker appends what it is about to do and what it got to a log (an O_APPEND write per
line, which survives the kill). Several rounds of workers are SIGKILLed after random delays,
so kills land inside claims, between a handle write and its block write, mid-release, ...

After every round, against the logs: every block passes its invariants, no address is
allocated twice, every address a worker was told it got (and had not started releasing) is
held by exactly that handle, nothing a worker finished releasing is held, and handles never
count less than they hold (the write orderings that make a crash leave only over-counts).
Then the real CLI, `l3fabric ipam gc --grace 0`, brings `l3fabric ipam check` to clean, and
deleting some Workload records ("pods gone") makes gc release exactly their addresses.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field

import pytest
from netaddr import IPAddress, IPNetwork

from ipam_blocks import block as blockmath
from ipam_blocks.allocator import IPAM, AssignRequest
from ipam_blocks.check import check
from ipam_blocks.model import IPPool, Node, Workload, parse_handle
from ipam_blocks.pools import add_node, add_pool, forget_workload, record_workload
from ipam_blocks.store.sqlite import SqliteStore
from ipam_blocks.store.workloads import WorkloadRecordLiveness

pytestmark = pytest.mark.slow

POOL = IPNetwork("10.20.0.0/21")
BLOCK_SIZE = 30  # small blocks: claims (and kills inside them) are frequent
NODES = ("node-a", "node-b")
WORKERS = 4  # two per node, racing for the same blocks: one churns, one hoards
ROUNDS = 5
MAX_HELD = 10
NAMESPACE = "default"


class SlowCreates:
    """A store that pauses after creating an affinity or a block, as a loaded API server or a
    descheduled process would; it widens the claim window the kills should hit."""

    def __init__(self, inner: SqliteStore) -> None:
        self.inner = inner

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def create(self, obj):
        created = self.inner.create(obj)
        if obj.kind in ("BlockAffinity", "IPAMBlock"):
            time.sleep(0.005)
        return created


def _churn(path: str, node: str, prefix: str, seed: int, log_path: str, ready, hoard: bool) -> None:
    """Child process: assign/release forever, until SIGKILLed. A hoarder never releases, so
    it claims a new block every few assignments, on a store slowed down while it creates an
    affinity or a block: kills then often land inside a claim."""
    store = SlowCreates(SqliteStore(path)) if hoard else SqliteStore(path)
    ipam = IPAM(store)
    rnd = random.Random(seed)
    log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def note(line: str) -> None:
        os.write(log, f"{line}\n".encode())

    held: list[str] = []
    ready.put(prefix)
    for i in range(1_000_000):
        if held and not hoard and (len(held) >= MAX_HELD or rnd.random() < 0.45):
            handle = held.pop(rnd.randrange(len(held)))
            note(f"r {handle}")
            ipam.release_handle(handle)
            forget_workload(ipam, handle)
            note(f"R {handle}")
        else:
            handle, pod = f"{prefix}-{i}", f"{prefix}-pod-{i}"
            note(f"a {handle}")
            record_workload(ipam, Workload(handle, node, NAMESPACE, pod))
            (ip,) = ipam.auto_assign(
                AssignRequest(node=node, handle_id=handle, pod=pod, namespace=NAMESPACE)
            )
            note(f"A {handle} {ip}")
            held.append(handle)


@dataclass
class Ledger:
    """What the workers' logs say, over all rounds."""

    started: set[str] = field(default_factory=set)
    got: dict[str, IPAddress] = field(default_factory=dict)
    releasing: set[str] = field(default_factory=set)
    released: set[str] = field(default_factory=set)

    def read(self, log_path: str) -> None:
        with open(log_path) as f:
            for line in f:
                if not line.endswith("\n"):
                    continue  # torn by the kill (never seen in practice: one write per line)
                op, handle, *rest = line.split()
                match op:
                    case "a":
                        self.started.add(handle)
                    case "A":
                        self.got[handle] = IPAddress(rest[0])
                    case "r":
                        self.releasing.add(handle)
                    case "R":
                        self.released.add(handle)

    @property
    def live(self) -> dict[str, IPAddress]:
        """Handles told their address and not (yet) being released."""
        return {h: ip for h, ip in self.got.items() if h not in self.releasing}


def _holders(ipam: IPAM) -> dict[IPAddress, str]:
    held: dict[IPAddress, str] = {}
    for blk in ipam.blocks():
        for ip, attr, _ in blockmath.allocated(blk):
            assert ip not in held, f"{ip} allocated in two blocks"
            held[ip] = attr.handle_id
    return held


def verify_after_crash(ipam: IPAM, ledger: Ledger) -> None:
    report = check(ipam, WorkloadRecordLiveness(ipam.store))
    assert report.broken_blocks == {}
    assert report.duplicate_addresses == []
    assert report.missing_handles == []  # never an address without a handle
    assert report.leaks == []  # workloads are recorded before, and forgotten after
    assert report.outside_pools == [] and report.blocks_of_gone_nodes == []

    held = _holders(ipam)
    by_handle: dict[str, list[IPAddress]] = {}
    for ip, handle in held.items():
        by_handle.setdefault(handle, []).append(ip)
    # Every allocation belongs to a handle some worker started, and one address per handle.
    assert set(by_handle) <= ledger.started
    assert all(len(ips) == 1 for ips in by_handle.values()), by_handle
    # What a worker was told it holds, it holds: nobody else was handed that address.
    for handle, ip in ledger.live.items():
        assert held.get(ip) == handle, f"{handle} was given {ip}, now held by {held.get(ip)}"
    # What a worker finished releasing is free (unless handed to someone else since).
    for handle in ledger.released:
        assert handle not in by_handle
    # Handles are counted before the block is written and released after it: a crash can
    # leave a handle counting too many, never too few.
    for res in ipam.store.list("IPAMHandle").items:
        handle = parse_handle(res)
        actual: dict[str, int] = {}
        for ip in by_handle.get(handle.handle_id, []):
            cidr = str(IPNetwork(f"{ip}/{BLOCK_SIZE}").cidr)
            actual[cidr] = actual.get(cidr, 0) + 1
        for cidr, n in actual.items():
            assert handle.blocks.get(cidr, 0) >= n, (handle, actual)


def _cli(store_path: str, *args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("l3fabric")
    cmd = [exe] if exe else [sys.executable, "-m", "l3fabric.cli"]
    return subprocess.run(
        [*cmd, "ipam", *args, "--store", f"sqlite:{store_path}"],
        capture_output=True,
        text=True,
        timeout=60,
    )


def _check_report(store_path: str) -> tuple[int, dict]:
    done = _cli(store_path, "check", "-o", "json")
    assert done.returncode in (0, 1), done.stderr
    return done.returncode, json.loads(done.stdout)


def test_sigkilled_allocators_leave_nothing_gc_cannot_settle(tmp_path) -> None:
    path = str(tmp_path / "ipam.db")
    store = SqliteStore(path)
    ipam = IPAM(store)
    add_pool(ipam, IPPool("crash", POOL, BLOCK_SIZE))
    for node in NODES:
        add_node(ipam, Node(node))

    ctx = multiprocessing.get_context("spawn")
    rnd = random.Random(int(os.environ.get("L3FABRIC_TEST_SEED", "0")) or None)
    ledger = Ledger()
    kills_inside_work = 0
    for round_ in range(ROUNDS):
        ready = ctx.Queue()
        logs = [str(tmp_path / f"round{round_}-w{w}.log") for w in range(WORKERS)]
        procs = [
            ctx.Process(
                target=_churn,
                args=(
                    path,
                    NODES[w % len(NODES)],
                    f"r{round_}w{w}",
                    rnd.randrange(1 << 30),
                    logs[w],
                    ready,
                    w >= len(NODES),
                ),
                daemon=True,
            )
            for w in range(WORKERS)
        ]
        for p in procs:
            p.start()
        for _ in procs:
            ready.get(timeout=60)
        # Kill each at its own random moment, 20..600 ms into its work.
        deadlines = sorted((rnd.uniform(0.02, 0.6), i) for i in range(WORKERS))
        start = time.monotonic()
        for delay, i in deadlines:
            time.sleep(max(0.0, start + delay - time.monotonic()))
            assert procs[i].is_alive(), f"worker {i} died on its own (exit {procs[i].exitcode})"
            procs[i].kill()
        for p in procs:
            p.join(timeout=10)
            assert p.exitcode == -9
        for log in logs:
            ledger.read(log)
            with open(log) as f:
                last = f.read().splitlines()[-1:]
            kills_inside_work += bool(last and last[0].split()[0] in "ar")
        verify_after_crash(ipam, ledger)

    assert len(ledger.got) > 100, "the workers hardly ran; the kills proved little"
    assert kills_inside_work > 0, "no kill landed inside an assign or release"

    # The real CLI settles whatever the kills left (over-counted handles, pending claims).
    live_before = dict(ledger.live)
    gc = _cli(path, "gc", "--grace", "0")
    assert gc.returncode == 0, gc.stdout + gc.stderr
    code, report = _check_report(path)
    assert (code, report["clean"]) == (0, True), report
    held = _holders(ipam)
    for handle, ip in live_before.items():
        assert held.get(ip) == handle  # gc released nothing that is alive

    # Pods gone: their Workload records disappear; gc releases exactly their addresses.
    gone = dict(random.Random(1).sample(sorted(live_before.items()), 5))
    for handle in gone:
        forget_workload(ipam, handle)
    code, report = _check_report(path)
    assert code == 1
    assert {leak["ip"] for leak in report["leaks"]} == {str(ip) for ip in gone.values()}
    gc = _cli(path, "gc", "--grace", "0")
    assert gc.returncode == 0, gc.stdout + gc.stderr
    after = _holders(ipam)
    assert set(held) - set(after) == set(gone.values())
    assert set(after) - set(held) == set()
    handles = {r.name for r in store.list("IPAMHandle").items}
    assert not handles & set(gone)
    code, report = _check_report(path)
    assert (code, report["clean"]) == (0, True), report
    store.close()
