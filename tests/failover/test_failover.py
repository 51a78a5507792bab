"""Failover end to end on the two-subnets topology with the VXLAN fallback (CrossSubnet):

- graceful restart: pods keep talking at 10 packets/s, across the router and beside it,
  while n1's agent is restarted three times — not one packet lost; the same when n1's
  ExaBGP crashes (the agent restarts it);
- a node that dies without graceful restart (its uplink cut, then every process in its
  namespace killed, so no TCP FIN ever reaches the peers) is forgotten by every other
  node within hold time + 1 s.

One lab for the module, tests in file order (the last kills n3).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator

import pytest

from bgp_speaker.overlay.encap import VXLAN_DEVICE
from l3fabric.lab import host
from tests.encap.overlay_lab import (
    ADDRESS,
    CONVERGE,
    NODES,
    OverlayFabric,
    two_subnets_document,
)
from tests.fabric.harness import HOLD, eventually, fast_failure_config, needs_fabric, running_lab

pytestmark = [pytest.mark.root, pytest.mark.slow, needs_fabric]

RESTARTS = 3


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OverlayFabric]:
    tmp = tmp_path_factory.mktemp("failover")
    with running_lab(tmp, two_subnets_document(), nodes=NODES) as fabric:
        net = OverlayFabric(fabric)
        net.set_pool(vxlanMode="CrossSubnet")
        eventually(net.sessions_up, CONVERGE, "sessions across the router")
        for node, pod in (("n1", "a1"), ("n2", "a2"), ("n3", "b1")):
            fabric.add_pod(node, pod)
        net.wait_routes({n: net.expected(n, "CrossSubnet", VXLAN_DEVICE) for n in NODES},
                        "the VXLAN fabric")  # fmt: skip
        yield net


class Pinger:
    """`ping -i 0.1` (10/s) from a pod, stopped with SIGINT for its summary."""

    def __init__(self, lab: OverlayFabric, pod: str, address: str) -> None:
        self.what = f"{pod} -> {address}"
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", lab.pod_netns(pod), "ping", "-i", "0.1", "-W", "1", address],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip

    def stop(self) -> tuple[int, int]:
        """(transmitted, received)."""
        self.proc.send_signal(signal.SIGINT)
        out, _ = self.proc.communicate(timeout=15)
        found = re.search(r"(\d+) packets transmitted, (\d+) received", out)
        assert found, out
        return int(found[1]), int(found[2])


def test_three_agent_restarts_lose_no_packet(lab: OverlayFabric) -> None:
    a1_to = {"b1": lab.pods["b1"][1], "a2": lab.pods["a2"][1]}
    pingers = [Pinger(lab, "a1", a1_to["b1"]), Pinger(lab, "a1", a1_to["a2"]),
               Pinger(lab, "b1", a1_to["a2"])]  # fmt: skip
    started = time.monotonic()
    try:
        time.sleep(1)
        for _ in range(RESTARTS):
            lab.stop_agent("n1")
            restarted = time.time()
            lab.restart_agent("n1")
            lab.wait_sessions_after(restarted, nodes=("n1",))
            eventually(
                lambda: [] if lab.status("n1")["synced"] else ["n1 not synced"],
                CONVERGE,
                "n1's initial sync",
            )
            assert lab.status("n1")["overlay"]["devices"] == {VXLAN_DEVICE: 1450}
        time.sleep(1)
    finally:
        counts = {p.what: p.stop() for p in pingers}
    took = time.monotonic() - started
    print(f"\n{RESTARTS} restarts of n1's agent in {took:.1f} s; pings (sent, answered): {counts}")
    for what, (sent, received) in counts.items():
        assert sent >= 10 * took * 0.5, (what, sent, took)  # it really ran at ~10/s
        assert received == sent, f"{what}: {sent - received} of {sent} lost"
    # n1's kernel is exactly what the fabric says, again.
    lab.wait_routes({"n1": lab.expected("n1", "CrossSubnet", VXLAN_DEVICE)}, "n1's routes")


def test_a_crashed_exabgp_is_restarted_and_forwarding_goes_on(lab: OverlayFabric) -> None:
    """Treated like a graceful restart of ourselves: n1 keeps what its ExaBGP had learned,
    the peers keep n1's routes, the agent notices the death at once and starts another."""
    restarts = lab.status("n1")["speaker_restarts"]
    exabgp = lab.exabgp_pid("n1")
    pinger = Pinger(lab, "a1", lab.pods["b1"][1])
    try:
        time.sleep(0.5)
        killed = time.time()
        os.kill(exabgp, signal.SIGKILL)
        eventually(
            lambda: [] if lab.status("n1")["speaker_restarts"] == restarts + 1 else ["not yet"],
            CONVERGE,
            "n1's agent to start ExaBGP again",
        )
        lab.wait_sessions_after(killed, nodes=("n1",))
        time.sleep(1)
    finally:
        sent, received = pinger.stop()
    assert lab.exabgp_pid("n1") != exabgp
    assert received == sent, f"{sent - received} of {sent} lost"
    lab.wait_routes({n: lab.expected(n, "CrossSubnet", VXLAN_DEVICE) for n in NODES}, "routes")


def test_a_dead_node_is_forgotten_within_hold_time(lab: OverlayFabric) -> None:
    changed = time.time()
    with lab.store() as store:
        store.create(fast_failure_config())
    lab.wait_sessions_after(changed)  # renegotiated with the new timers, without GR
    n3_block = lab.block_of("n3")
    for node in ("n1", "n2"):
        assert n3_block in lab.routes(node)

    ns = lab.netns("n3")
    died = time.monotonic()
    host.ip("-n", ns, "link", "set", "eth1", "down")  # power cut: not even a FIN gets out
    for pid in host.netns_pids(ns):
        os.kill(pid, signal.SIGKILL)
    gone: dict[str, float] = {}
    while len(gone) < 2 and time.monotonic() - died < HOLD + 10:
        for node in ("n1", "n2"):
            if node not in gone and n3_block not in lab.routes(node):
                gone[node] = time.monotonic() - died
        time.sleep(0.02)
    print(f"\nn3 died: its block left n1 after {gone.get('n1', -1):.2f} s, n2 after "
          f"{gone.get('n2', -1):.2f} s (hold time {HOLD} s)")  # fmt: skip
    assert set(gone) == {"n1", "n2"}, gone
    assert max(gone.values()) <= HOLD + 1, gone
    # The survivors still reach each other.
    assert lab.pings("a1", lab.pods["a2"][1])
    for node in ("n1", "n2"):
        peer = lab.peers(node)[ADDRESS["n3"]]
        assert peer["state"] != "established" and peer["received"] == 0, peer
