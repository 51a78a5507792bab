"""The chart's GC Deployment: Lease leader election (`ipam_blocks.leader`) against the API test
double, the collection loop (`ipam_blocks.gc_controller`) and `ipam gc --continuous`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from ipam_blocks.allocator import IPAM
from ipam_blocks.errors import Conflict, InvalidInput, StoreUnavailable
from ipam_blocks.gc_controller import GCLoopSettings, run_passes
from ipam_blocks.leader import LeaderElector, LeaseSettings, Observed, decide
from ipam_blocks.lease import LeaseRecord
from ipam_blocks.store.kube import KubeStore
from ipam_blocks.store.sqlite import SqliteStore
from ipam_blocks.store.workloads import WorkloadRecordLiveness
from l3fabric.cli import main as cli_main
from tests.kube_api_double import KubeApiDouble

NS = "l3fabric-system"
LEASE = "l3fabric-ipam-gc"
WALL = datetime(2024, 5, 1, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def api() -> Iterator[KubeApiDouble]:
    with KubeApiDouble() as double:
        yield double


@pytest.fixture
def store(api: KubeApiDouble) -> Iterator[KubeStore]:
    s = KubeStore(str(api.kubeconfig))
    yield s
    s.close()


def contender(store: KubeStore, identity: str, clock: Clock) -> LeaderElector:
    settings = LeaseSettings(NS, LEASE, identity)
    return LeaderElector(
        store.lease(NS, LEASE),
        settings,
        clock=clock,
        wall=lambda: WALL + timedelta(seconds=clock.now),
    )


def lease_spec(api: KubeApiDouble) -> dict:
    (lease,) = api.objects("leases")
    return lease["spec"]


# --- the pure decision ---------------------------------------------------------------------


def test_decide_creates_renews_respects_and_takes_over():
    held = Observed(LeaseRecord("b", 15, WALL, WALL, 3), "7", seen_at=100.0)
    assert decide(None, "a", 15, 0.0, WALL) == LeaseRecord("a", 15, WALL, WALL, 0)
    assert decide(held, "a", 15, 114.9, WALL) is None  # b's lease has not run out on our clock
    taken = decide(held, "a", 15, 115.0, WALL)
    assert taken == LeaseRecord("a", 15, WALL, WALL, 4)
    mine = Observed(LeaseRecord("a", 15, WALL, WALL, 4), "8", seen_at=0.0)
    later = WALL + timedelta(seconds=5)
    assert decide(mine, "a", 15, 500.0, later) == LeaseRecord("a", 15, WALL, later, 4)
    released = Observed(LeaseRecord("", 1, WALL, WALL, 4), "9", seen_at=100.0)
    assert decide(released, "a", 15, 100.0, WALL) == LeaseRecord("a", 15, WALL, WALL, 5)


def test_settings_refuse_timings_that_allow_two_leaders():
    with pytest.raises(InvalidInput, match="renew deadline < lease duration"):
        LeaseSettings(NS, LEASE, "a", lease_duration=10, renew_deadline=10)
    with pytest.raises(InvalidInput):
        LeaseSettings(NS, "Not A Name", "a")


# --- two contenders on the API double ------------------------------------------------------


def test_one_leads_the_other_waits_then_takes_over_after_expiry(api, store):
    clock_a, clock_b = Clock(), Clock()
    a, b = contender(store, "gc-a", clock_a), contender(store, "gc-b", clock_b)
    assert a.try_acquire_or_renew() is True
    assert b.try_acquire_or_renew() is False
    assert lease_spec(api)["holderIdentity"] == "gc-a"
    assert lease_spec(api)["leaseDurationSeconds"] == 15
    assert lease_spec(api)["renewTime"].endswith("Z")

    # a keeps renewing: every renewal is a new resourceVersion, so b's wait starts over.
    for _ in range(10):
        clock_a.now += 5
        clock_b.now += 5
        assert a.try_acquire_or_renew() is True
        assert b.try_acquire_or_renew() is False
    # a stops (crashed, partitioned); b takes over once 15 s pass on b's own clock.
    clock_b.now += 14
    assert b.try_acquire_or_renew() is False
    clock_b.now += 1
    assert b.try_acquire_or_renew() is True
    spec = lease_spec(api)
    assert (spec["holderIdentity"], spec["leaseTransitions"]) == ("gc-b", 1)
    # a comes back: it sees b holding the Lease and stops leading at once.
    clock_a.now += 1
    assert a.try_acquire_or_renew() is False
    assert not a.leading.is_set()


def test_a_released_lease_is_taken_at_once(api, store):
    clock = Clock()
    a, b = contender(store, "gc-a", clock), contender(store, "gc-b", clock)
    assert a.try_acquire_or_renew()
    assert not b.try_acquire_or_renew()
    a.release()
    assert not a.leading.is_set()
    assert lease_spec(api)["holderIdentity"] == ""
    assert b.try_acquire_or_renew()  # no waiting for the 15 s
    assert lease_spec(api)["holderIdentity"] == "gc-b"


def test_writes_are_compare_and_swap(api, store):
    clock = Clock()
    a, b = contender(store, "gc-a", clock), contender(store, "gc-b", clock)
    client = store.lease(NS, LEASE)
    # Both read "no Lease"; b creates it first; a's create must lose.
    assert client.get() is None
    assert b.try_acquire_or_renew()
    with pytest.raises(Conflict):
        client.create(LeaseRecord("gc-a", 15, WALL, WALL))
    # A replace at a stale resourceVersion loses too, and leaves b's record alone.
    _, revision = client.get()
    clock.now += 1
    assert b.try_acquire_or_renew()  # b renews: new resourceVersion
    with pytest.raises(Conflict):
        client.replace(LeaseRecord("gc-a", 15, WALL, WALL), revision)
    assert lease_spec(api)["holderIdentity"] == "gc-b"
    assert not a.try_acquire_or_renew()


def test_leader_steps_down_when_it_cannot_renew_within_the_deadline(api, store):
    clock = Clock()
    a = contender(store, "gc-a", clock)
    assert a.try_acquire_or_renew()
    api.fail_next(503, count=100)
    clock.now += 5
    assert a.try_acquire_or_renew() is True  # one failed renewal: still within 10 s
    clock.now += 5
    assert a.try_acquire_or_renew() is False  # 10 s without a renewal: stop leading
    assert not a.leading.is_set()


def test_lease_client_reports_an_unreachable_api(api, store):
    client = store.lease(NS, LEASE)
    api.stop()
    with pytest.raises(StoreUnavailable):
        client.get()


def test_elector_thread_acquires_and_releases_on_stop(api, store):
    settings = LeaseSettings(NS, LEASE, "gc-a", 3.0, 2.0, 0.1)
    elector = LeaderElector(store.lease(NS, LEASE), settings).start()
    assert elector.leading.wait(5)
    elector.stop()
    assert lease_spec(api)["holderIdentity"] == ""


# --- the collection loop -------------------------------------------------------------------


class FakeElector:
    def __init__(self, leading: bool) -> None:
        self.leading = threading.Event()
        if leading:
            self.leading.set()
        self.settings = LeaseSettings(NS, LEASE, "x", 1.0, 0.5, 0.01)


def _loop(tmp_path: Path, elector: FakeElector | None, stop_after: float, store=None) -> int:
    sqlite = store or SqliteStore(tmp_path / "s.db")
    stop = threading.Event()
    timer = threading.Timer(stop_after, stop.set)
    timer.start()
    try:
        return run_passes(
            IPAM(sqlite), WorkloadRecordLiveness(sqlite), GCLoopSettings(1, 0), stop,
            elector=elector,  # type: ignore[arg-type]
        )  # fmt: skip
    finally:
        timer.cancel()


def test_passes_run_only_while_leading(tmp_path):
    assert _loop(tmp_path, FakeElector(leading=False), 0.3) == 0
    assert _loop(tmp_path, FakeElector(leading=True), 0.3) == 1  # then waits the interval
    assert _loop(tmp_path, None, 0.3) == 1


def test_a_failing_pass_does_not_end_the_loop(tmp_path):
    class Down:
        def __getattr__(self, name):
            def fail(*args, **kwargs):
                raise StoreUnavailable("connection refused")

            return fail

    assert _loop(tmp_path, None, 0.3, store=Down()) == 0


# --- `ipam gc --continuous` ----------------------------------------------------------------


def _l3fabric(*args: str) -> list[str]:
    return [sys.executable, "-c", "from l3fabric.cli import main; raise SystemExit(main())", *args]


def test_continuous_gc_elects_collects_and_releases_on_sigterm(api):
    env = {**os.environ, "POD_NAME": "gc-7"}
    proc = subprocess.Popen(
        _l3fabric(
            *("ipam", "gc", "--store", f"kube:{api.kubeconfig}", "--continuous"),
            *("--interval", "1", "--lease-namespace", NS, "--log-level", "info"),
        ),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            leases = api.objects("leases")
            passes = [r for r in api.requests if r.path.endswith("/ipamblocks")]
            if leases and leases[0]["spec"]["holderIdentity"] == "gc-7" and passes:
                break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        else:
            pytest.fail("no leader and pass within 20 s")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert out == ""  # nothing to collect: passes are logged, not printed
    assert "became leader" in err and "gc pass done" in err
    assert lease_spec(api)["holderIdentity"] == ""  # released on the way out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--continuous", "--lease-namespace", NS], "lease-namespace: leader election needs"),
        (["--lease-namespace", NS], "lease-namespace: leader election needs --continuous"),
        (["--continuous", "--interval", "0"], "interval: must be a positive number"),
    ],
)
def test_continuous_gc_refuses_bad_options(tmp_path, capsys, args, message):
    assert cli_main(["ipam", "gc", "--store", f"sqlite:{tmp_path / 's.db'}", *args]) == 2
    assert message in capsys.readouterr().err
