"""Reflector nodes whose BIRD 2 reflects, in a real lab (tests/topologies/rr.clab.yml as
shipped: rr1 and rr2 reflectors with one cluster ID from the start, clients c1..c4).

One lab for the module; the tests run in file order and build on each other's state:

- converged: pods reach each other; `node status` on a reflector lists its clients as BIRD's
  sessions, established;
- rr1's BIRD SIGKILLed while pods ping each other: the agent restarts it (restarts +1) and
  its sessions return, and not one ping is lost (rr2 still reflects, and the clients keep
  rr1's routes by graceful restart);
- a BGPPeer for rr1 only (an iBGP router that does not exist) changes rr1's BIRD config:
  one reload, and no other session of rr1's BIRD is reset;
- a TCP MD5 password on the reflector sessions: every session establishes again with it.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ipam_blocks.store.base import Resource
from tests.interop.harness import (
    CONVERGE,
    ContinuousPing,
    InteropLab,
    needs_interop,
    topology_lab,
    wait,
)
from tests.reflection.test_rr_fabric import (
    ADDRESS,
    CLIENTS,
    LOOPBACK,
    NODES,
    REFLECTED,
    REFLECTORS,
    converged,
)

pytestmark = [pytest.mark.root, pytest.mark.slow, needs_interop]

GHOST = "10.0.0.99"
"""An iBGP router on rr1's segment that does not exist."""
PASSWORD = "l3d-rr-md5 secret"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InteropLab]:
    with topology_lab(tmp_path_factory.mktemp("birdrr"), "rr", NODES) as running:
        for node in NODES:
            running.add_pod(node, f"{node}a")
        wait(lambda: converged(running, REFLECTED), "the reflector fabric to converge")
        yield running


def bird_sessions(lab: InteropLab, node: str) -> dict[str, dict]:
    return {a: p for a, p in lab.peers(node).items() if p["speaker"] == "bird"}


def bird_conf(lab: InteropLab, node: str) -> str:
    return (lab.paths.node(node).agent_state / "bird" / "bird.conf").read_text()


def test_converged_and_status_lists_the_clients_as_bird_sessions(lab: InteropLab) -> None:
    failures = lab.ping_failures()
    assert failures == [], (failures, {n: lab.route_table(n) for n in NODES})
    for name in REFLECTORS:
        status = lab.status(name)
        reflector = status["reflector"]
        assert reflector["running"] and reflector["pid"], reflector
        peers = {p["address"]: p for p in status["peers"]}
        other = ADDRESS["rr2" if name == "rr1" else "rr1"]
        assert {a: (p["speaker"], p["type"], p["state"]) for a, p in peers.items()} == {
            LOOPBACK: ("exabgp", "rr", "established"),
            other: ("bird", "node", "established"),
        } | {ADDRESS[c]: ("bird", "rr-client", "established") for c in CLIENTS}
        now = time.time()
        for client in CLIENTS:
            # BIRD's own figures: since (epoch seconds), the client's block in, all others out.
            peer = peers[ADDRESS[client]]
            assert 0 < peer["since"] <= now and peer["received"] == 1, peer
            assert peer["advertised"] == len(NODES) - 1, peer


def test_bird_killed_is_restarted_and_no_ping_is_lost(lab: InteropLab) -> None:
    before = lab.status("rr1")["reflector"]
    pods = {node: lab.pods[f"{node}a"][1] for node in NODES}
    pairs = [("c1", "c2"), ("c3", "c4"), ("c2", "rr1"), ("rr1", "c4"), ("rr2", "c1")]
    pings = [ContinuousPing(lab.pod_netns(f"{a}a"), pods[b]) for a, b in pairs]
    try:
        time.sleep(1)
        os.kill(before["pid"], signal.SIGKILL)

        def restarted() -> list[str]:
            now = lab.status("rr1")["reflector"]
            ok = now["restarts"] == before["restarts"] + 1 and now["running"]
            return [] if ok and now["pid"] != before["pid"] else [f"reflector {now}"]

        wait(restarted, "rr1's BIRD restarted", 30)
        wait(lambda: converged(lab, REFLECTED), "rr1's sessions back", CONVERGE)
        time.sleep(1)
    finally:
        counts = [p.stop() for p in pings]
    for (a, b), (sent, received) in zip(pairs, counts, strict=True):
        assert sent > 20 and received == sent, f"{a} -> {b}: {received} of {sent} answered"
    after = lab.status("rr1")["reflector"]
    assert after["restarts"] == before["restarts"] + 1, after


def test_a_config_change_reloads_bird_and_resets_no_other_session(lab: InteropLab) -> None:
    before = lab.status("rr1")["reflector"]
    sessions = bird_sessions(lab, "rr1")
    assert all(p["state"] == "established" for p in sessions.values()), sessions
    since = {a: p["since"] for a, p in sessions.items()}
    with lab.store() as store:
        store.create(Resource("BGPPeer", "l3d-ghost", {"node": "rr1", "peerIP": GHOST,
                                                       "asNumber": 64512}))  # fmt: skip

    def reloaded() -> list[str]:
        now = lab.status("rr1")["reflector"]
        return [] if now["reloads"] > before["reloads"] else [f"reflector {now}"]

    wait(reloaded, "rr1's BIRD reloaded", 30)
    time.sleep(3)  # a reset session would have left "established" or changed its since by now
    after = lab.status("rr1")["reflector"]
    assert after["reloads"] == before["reloads"] + 1, after
    assert (after["restarts"], after["pid"]) == (before["restarts"], before["pid"]), after
    assert "protocol bgp peer_10_0_0_99 {" in bird_conf(lab, "rr1")
    now = bird_sessions(lab, "rr1")
    assert now[GHOST]["state"] != "established", now[GHOST]
    assert {a: (p["state"], p["since"]) for a, p in now.items() if a != GHOST} == {
        a: ("established", s) for a, s in since.items()
    }
    # rr2 was not concerned.
    assert GHOST not in bird_conf(lab, "rr2")
    with lab.store() as store:
        store.delete("BGPPeer", "l3d-ghost")
    wait(lambda: [] if GHOST not in bird_conf(lab, "rr1") else ["ghost"], "the ghost gone", 30)


def test_md5_on_the_reflector_sessions(lab: InteropLab, tmp_path: Path) -> None:
    since = {a: p["since"] for a, p in bird_sessions(lab, "rr1").items()}
    secret = tmp_path / "rr.pw"
    secret.write_text(PASSWORD + "\n")
    with lab.store() as store:
        peer = store.get("BGPPeer", "peer-with-route-reflectors")
        spec = {**peer.spec, "password": {"file": str(secret)}}
        store.update(Resource("BGPPeer", peer.name, spec, peer.labels, peer.annotations,
                              peer.revision))  # fmt: skip
    for name in REFLECTORS:
        wait(lambda name=name: [] if PASSWORD in bird_conf(lab, name) else [f"{name} conf"],
             f"{name}'s BIRD to carry the password", 30)  # fmt: skip
        conf = bird_conf(lab, name)
        # Every fabric session carries it; the loopback session to the node's ExaBGP does not.
        assert conf.count(f'password "{PASSWORD}";') == len(NODES) - 1, conf

    def renewed() -> list[str]:
        now = bird_sessions(lab, "rr1")
        return [f"{a}: {p['state']} since {p['since']}" for a, p in now.items()
                if p["state"] != "established" or p["since"] <= since[a]]  # fmt: skip

    # The password changes every session of rr1's BIRD: each one anew, with MD5.
    wait(renewed, "rr1's sessions re-established with MD5", CONVERGE)
    wait(lambda: converged(lab, REFLECTED), "every session established with MD5", CONVERGE)
    for client in CLIENTS:  # the clients' ExaBGP signs its sessions to both reflectors
        exabgp = (lab.paths.node(client).agent_state / "exabgp" / "exabgp.conf").read_text()
        assert exabgp.count("md5-password") == len(REFLECTORS), exabgp
    assert lab.ping_failures() == []
