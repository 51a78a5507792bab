"""An external (eBGP) FRR router peering with an l3fabric node: TCP MD5 passwords and the
maximum prefix limit. The topology is built here (one node, one router, one veth).

- MD5: with the router's password the session establishes and routes flow both ways (a pod
  reaches the router's network); with a wrong password it never establishes; back with the
  right one it does again.
- maxPrefixes: a router announcing more prefixes than its BGPPeer allows is cut off, and
  nothing it announced ever reaches the node's kernel (watched with `ip monitor route`).
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator
from typing import Any

import pytest

from bgp_speaker.bgp.md5_diagnosis import MD5_MISMATCH
from ipam_blocks.errors import NotFound
from ipam_blocks.store.base import Resource
from tests.fabric.harness import RouteMonitor
from tests.interop.harness import CONVERGE, InteropLab, document_lab, needs_interop, wait

pytestmark = [pytest.mark.root, pytest.mark.slow, needs_interop]

N1, EXT = "10.0.0.11", "10.0.0.254"
EXT_NET, EXT_HOST = "10.250.9.0/26", "10.250.9.1"
FLOOD = [f"10.250.{64 + i // 4}.{(i % 4) * 64}/26" for i in range(150)]
LIMIT = 100

FRR_CONF = f"""frr defaults traditional
hostname ext
ip route {EXT_NET} blackhole
!
router bgp 65009
 bgp router-id {EXT}
 no bgp ebgp-requires-policy
 neighbor {N1} remote-as 64512
 neighbor {N1} password right-pw
 neighbor {N1} timers 3 9
 neighbor {N1} timers connect 2
 !
 address-family ipv4 unicast
  redistribute static
 exit-address-family
!
"""

OBJECTS = """apiVersion: l3fabric.io/v1
kind: IPPool
metadata: {name: default}
spec: {cidr: 10.244.0.0/16, blockSize: 26}
---
apiVersion: l3fabric.io/v1
kind: IPPool
metadata: {name: routers}
spec:
  cidr: 10.250.0.0/16
  blockSize: 26
  nodeSelector: {matchExpressions: [{key: external-router, operator: Exists}]}
---
apiVersion: l3fabric.io/v1
kind: BGPConfiguration
metadata: {name: default}
spec: {nodeToNodeMeshEnabled: false, gracefulRestartTime: 0}
"""


def document() -> tuple[dict[str, Any], dict[str, str]]:
    doc = {
        "name": "ext",
        "topology": {
            "nodes": {
                "n1": {
                    "kind": "linux", "image": "ghcr.io/l3fabric/l3fabric:latest",
                    "labels": {"l3fabric.io/ipv4": f"{N1}/24"},
                    "binds": ["ext.objects.yaml:/etc/l3fabric/objects.yaml:ro"],
                    "exec": [f"ip addr add {N1}/24 dev eth1", "ip route add default dev eth1"],
                },
                "ext": {
                    "kind": "linux", "image": "quay.io/frrouting/frr:8.4.4",
                    "binds": ["ext/frr.conf:/etc/frr/frr.conf:ro"],
                    "exec": [f"ip addr add {EXT}/24 dev eth1", f"ip addr add {EXT_HOST}/32 dev lo"],
                },
            },
            "links": [{"endpoints": ["n1:eth1", "ext:eth1"]}],
        },
    }  # fmt: skip
    return doc, {"ext.objects.yaml": OBJECTS, "ext/frr.conf": FRR_CONF}


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InteropLab]:
    tmp = tmp_path_factory.mktemp("ext")
    doc, files = document()
    with document_lab(tmp, doc, files, ("n1",)) as running:
        running.add_pod("n1", "n1a")
        for name, text in (("right.pw", "right-pw\n"), ("wrong.pw", "wrong-pw\n")):
            (tmp / name).write_text(text)
        running.secrets = tmp  # type: ignore[attr-defined]
        yield running


def set_peer(lab: InteropLab, name: str, password: str | None, **spec: Any) -> None:
    """Create or replace the BGPPeer `name` to the router (others deleted)."""
    full: dict[str, Any] = {"peerIP": EXT, "asNumber": 65009, "keepaliveTime": 3, "holdTime": 9}
    if password:
        full["password"] = {"file": str(lab.secrets / password)}  # type: ignore[attr-defined]
    full.update(spec)
    with lab.store() as store:
        for res in store.list("BGPPeer").items:
            if res.name != name:
                store.delete("BGPPeer", res.name)
        try:
            current = store.get("BGPPeer", name)
            store.update(Resource("BGPPeer", name, full, revision=current.revision))
        except NotFound:
            store.create(Resource("BGPPeer", name, full))


def session(lab: InteropLab) -> tuple[str, str]:
    """(the node's view, the router's view) of the session."""
    peer = lab.peers("n1").get(EXT, {})
    return str(peer.get("state", "-")), lab.frr_state("ext", N1)


def up_with_routes(lab: InteropLab) -> list[str]:
    problems = []
    if session(lab) != ("established", "Established"):
        problems.append(f"session {session(lab)}")
    if lab.route_table("n1").get(EXT_NET) != f"via {EXT}":
        problems.append(f"n1 kernel {lab.route_table('n1')}")
    return problems


def test_md5_right_password_establishes_wrong_one_never_does(lab: InteropLab) -> None:
    set_peer(lab, "ext", "right.pw")
    wait(lambda: up_with_routes(lab), "the MD5 session and the router's route")
    [path] = lab.rib("n1")[EXT_NET]
    assert path["as_path"] == [65009] and path["next_hop"] == EXT and path["ebgp"], path
    n1_block = lab.block_of("n1")
    [frr_path] = lab.frr_paths("ext", n1_block)
    assert frr_path["aspath"]["string"] == "64512" and frr_path["nexthops"][0]["ip"] == N1
    assert lab.ping_from("n1a", EXT_HOST)

    changed = time.time()
    set_peer(lab, "ext", "wrong.pw")
    wait(lambda: [] if lab.peers("n1")[EXT]["since"] > changed else ["not reconfigured"],
         "the session to be re-established with the new password")  # fmt: skip
    log_path = lab.paths.node("n1").log("agent")
    logged_before = log_path.read_text().count(MD5_MISMATCH)
    deadline = time.monotonic() + 20  # two hold times and more: it must never come up
    while time.monotonic() < deadline:
        assert session(lab)[0] != "established" and session(lab)[1] != "Established"
        time.sleep(0.5)
    # Only the kernel sees why (it drops the badly signed SYNs): node status and the log
    # name it, the log once for 20 s of the router retrying every 2 s.
    assert lab.peers("n1")[EXT]["reason"] == MD5_MISMATCH, lab.peers("n1")[EXT]
    assert lab.status_cli("n1")["peers"][0]["reason"] == MD5_MISMATCH
    assert log_path.read_text().count(MD5_MISMATCH) - logged_before == 1

    set_peer(lab, "ext", "right.pw")
    wait(lambda: up_with_routes(lab), "the session with the right password again")
    assert lab.ping_from("n1a", EXT_HOST)


def test_max_prefixes_cuts_the_router_off_and_installs_nothing(lab: InteropLab) -> None:
    with lab.store() as store, contextlib.suppress(NotFound):
        store.delete("BGPPeer", "ext")
    wait(lambda: [] if EXT_NET not in lab.route_table("n1") else ["route still there"],
         "the router's routes to go with its BGPPeer")  # fmt: skip
    statics = [f"ip route {prefix} blackhole" for prefix in FLOOD]
    lab.vtysh("ext", "configure terminal\n" + "\n".join(statics))
    wait(lambda: [] if len(lab.vtysh_json("ext", "show bgp ipv4 unicast").get("routes", {}))
         == len(FLOOD) + 1 else ["statics not in BGP yet"], "the router's statics")  # fmt: skip

    monitor = RouteMonitor(lab.netns("n1"))
    try:
        set_peer(lab, "ext-limited", "right.pw", maxPrefixes=LIMIT)

        def cut_off() -> list[str]:
            peer = lab.peers("n1").get(EXT, {})
            if "max-prefixes" not in peer.get("reason", ""):
                return [f"peer {peer}"]
            return []

        wait(cut_off, "the router to be cut off", CONVERGE)
        peer = lab.peers("n1")[EXT]
        assert peer["state"] == "down"
        # Everything it sent at once (its routes, and n1's own block echoed back) counts.
        m = re.fullmatch(rf"max-prefixes {LIMIT} exceeded \((\d+) received\)", peer["reason"])
        assert m and int(m.group(1)) > LIMIT, peer
        assert peer["received"] == 0
        time.sleep(3)  # anything that would still trickle in
        assert not [line for line in monitor.lines if "10.250." in line], monitor.lines
        assert not [p for p in lab.route_table("n1") if p.startswith("10.250.")]
        conf = (lab.paths.node("n1").agent_state / "exabgp" / "exabgp.conf").read_text()
        assert f"neighbor {EXT} " not in conf  # the session is gone from ExaBGP
        assert lab.frr_state("ext", N1) != "Established"
        log = lab.paths.node("n1").log("agent").read_text()
        assert "session torn down" in log and "max-prefixes" in log
    finally:
        monitor.close()

    # A higher limit forgives the peer: the session comes back with every route.
    set_peer(lab, "ext-limited", "right.pw", maxPrefixes=1000)
    wait(lambda: up_with_routes(lab), "the session with the higher limit")
    wait(lambda: [] if sum(p.startswith("10.250.") for p in lab.route_table("n1")) == 151
         else ["not all routes yet"], "every route of the router")  # fmt: skip


def test_a_restarted_agent_does_not_wait_for_an_end_of_rib_the_router_never_sends(
    lab: InteropLab,
) -> None:
    """No graceful restart on the session (gracefulRestartTime 0): the router owes no
    End-of-RIB, so the restarted agent sweeps what it adopted from the kernel as soon as the
    session is up instead of after a wait for one (issue 15, item 11)."""
    set_peer(lab, "ext", "right.pw")
    wait(lambda: up_with_routes(lab), "the session to the router")
    lab.stop_agent("n1")
    started = time.monotonic()
    lab.restart_agent("n1")
    up: list[float] = []

    def session_up() -> list[str]:
        with contextlib.suppress(Exception):  # the agent may still be starting
            if session(lab)[0] == "established":
                up.append(time.monotonic())
                return []
        return ["session not up"]

    wait(session_up, "the session after the restart")
    wait(lambda: [] if lab.status("n1")["synced"] else ["not synced"], "the kernel sync")
    synced = time.monotonic()
    print(f"\nn1 restarted: session up after {up[0] - started:.2f} s, kernel synced after "
          f"{synced - started:.2f} s")  # fmt: skip
    assert synced - up[0] < 3, (up[0] - started, synced - started)
    wait(lambda: up_with_routes(lab), "the router's route again")
