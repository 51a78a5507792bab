"""bench/scale.py's node under test: an l3fabric agent (embedded SQLite store) or BIRD 2
configured as Calico's confd template configures it, as a route reflector or a mesh node."""

from __future__ import annotations

import subprocess
from pathlib import Path

from netaddr import IPNetwork
from scale_sim import ASN, CLUSTER_ID, DUT, DUT_IP, POOL, PROTO, SUBNET, python, sh, sim_ip, spawn

from ipam_blocks.allocator import IPAM
from ipam_blocks.model import IPPool, Node
from ipam_blocks.pools import add_node, add_pool
from ipam_blocks.store import open_store
from ipam_blocks.store.base import Resource

KINDS = ("bird", "l3fabric")
RR_LABEL = {"route-reflector": "true"}


def bird_config(reflector: bool, peers: int) -> str:
    """Calico's bird.cfg (calico/confd templates) in BIRD 2 syntax: device scan 2 s, direct
    routes, a kernel protocol that learns and programs the pool's routes (persist, graceful
    restart, merge paths), one `bgp_template` session per peer with `gateway recursive`,
    graceful restart and Calico's timers; a reflector adds `rr client; rr cluster id`."""
    rr = f" rr client; rr cluster id {CLUSTER_ID};" if reflector else ""
    sessions = "".join(
        f"protocol bgp Node_{i} from bgp_template {{ neighbor {sim_ip(i)} as {ASN};{rr} }}\n"
        for i in range(peers)
    )
    return f"""\
router id {DUT_IP};
filter calico_pools {{ if net ~ [ {POOL}+ ] then accept; reject; }}
protocol device {{ scan time 2; }}
protocol direct {{ ipv4; interface -"cali*", -"kube-ipvs*", "*"; }}
protocol kernel {{
  ipv4 {{ import all; export filter calico_pools; }};
  learn; persist; scan time 2; graceful restart; merge paths on;
}}
template bgp bgp_template {{
  local {DUT_IP} as {ASN};
  multihop;
  strict bind yes;
  graceful restart;
  connect delay time 2;
  connect retry time 5;
  error wait time 5, 30;
  ipv4 {{ gateway recursive; import all; export filter calico_pools; }};
}}
{sessions}"""


def setup_store(url: str, reflector: bool, peers: int) -> None:
    """The cluster as l3fabric sees it: the pool, one Node per simulated node, the node under
    test `dut`; a reflector cluster (mesh off, the rr.objects.yaml BGPPeer) or a full mesh."""
    store = open_store(url)
    try:
        ipam = IPAM(store)
        add_pool(ipam, IPPool("scale", IPNetwork(str(POOL)), 26))
        labels, cluster = (RR_LABEL, CLUSTER_ID) if reflector else ({}, None)
        add_node(ipam, Node("dut", dict(labels), IPNetwork(f"{DUT_IP}/{SUBNET}"), ASN, cluster))
        for i in range(peers):
            add_node(ipam, Node(f"s{i}", {}, IPNetwork(f"{sim_ip(i)}/{SUBNET}"), ASN, None))
        store.create(
            Resource("BGPConfiguration", "default", {"nodeToNodeMeshEnabled": not reflector})
        )
        if reflector:
            spec = {"nodeSelector": {}, "peerSelector": {"matchLabels": dict(RR_LABEL)}}
            store.create(Resource("BGPPeer", "peer-with-route-reflectors", spec))
    finally:
        store.close()


def start(kind: str, reflector: bool, peers: int, run_dir: Path) -> subprocess.Popen[bytes]:
    run_dir.mkdir(parents=True)
    flush_kernel()
    if kind == "bird":
        conf = run_dir / "bird.conf"
        conf.write_text(bird_config(reflector, peers))
        argv = ["bird", "-f", "-c", str(conf), "-s", str(run_dir / "bird.ctl"),
                "-P", str(run_dir / "bird.pid")]  # fmt: skip
    else:
        url = f"sqlite:{run_dir / 'store.db'}"
        setup_store(url, reflector, peers)
        argv = [python(), "-m", "l3fabric.cli", "--log-level", "info", "agent",
                "--node", "dut", "--store", url, "--socket", str(run_dir / "agent.sock"),
                "--state-dir", str(run_dir / "state")]  # fmt: skip
    return spawn(DUT, argv, run_dir / f"{kind}.log")


def flush_kernel() -> None:
    """BIRD's kernel protocol persists its routes: clear both kinds' between runs."""
    for proto in PROTO.values():
        subprocess.run(["ip", "-n", DUT, "route", "flush", "proto", str(proto)],
                       capture_output=True, check=False)  # fmt: skip


def versions() -> str:
    bird = subprocess.run(["bird", "--version"], capture_output=True, text=True)
    exabgp = sh(python(), "-c", "import exabgp.version as v; print(v.version)").strip()
    # the l3fabric side is whatever the checkout holds, uncommitted changes included
    tree = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                          text=True, cwd=Path(__file__).parent)  # fmt: skip
    return f"{(bird.stdout + bird.stderr).strip()}, ExaBGP {exabgp}, l3fabric {tree.stdout.strip()}"
