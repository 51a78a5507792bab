"""The shipped reflector and peering topologies: their objects files parse with the agent's
own parsers, everything they bind exists, BIRD and FRR accept their configs, and bad objects
are refused naming the field (`l3fabric.lab.objects`)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from ipam_blocks.errors import InvalidInput
from l3fabric.lab.objects import OBJECTS_PATH, objects_file, parse_objects
from l3fabric.lab.topology import Bind, Role, parse_topology
from tests.lab.schema import TOPOLOGIES, schema_errors

NEW = ("rr", "bird-rr", "rr-clients", "leaf-spine")


def load(name: str):
    path = TOPOLOGIES / f"{name}.clab.yml"
    document = yaml.safe_load(path.read_text())
    assert schema_errors(document) == []
    return parse_topology(document, path.parent)


@pytest.mark.parametrize("name", NEW)
def test_objects_parse_and_binds_exist(name: str) -> None:
    topo = load(name)
    path = objects_file(topo)
    assert path == TOPOLOGIES / f"{name}.objects.yaml"
    binds = [b for n in topo.by_role(Role.AGENT) for b in n.binds]
    objects = parse_objects(path.read_text(), path.name, binds)
    assert {o.kind for o in objects} >= {"BGPConfiguration"}
    for node in topo.nodes.values():
        for bind in node.binds:
            assert bind.host.exists(), (name, node.name, bind)
    for obj in objects:  # password files point at the bound host file
        if "password" in obj.spec:
            assert Path(obj.spec["password"]["file"]).exists()


def test_rr_topology_is_two_reflectors_and_four_clients() -> None:
    topo = load("rr")
    agents = {n.name: n for n in topo.by_role(Role.AGENT)}
    assert sorted(agents) == ["c1", "c2", "c3", "c4", "rr1", "rr2"]
    reflectors = [n for n in agents.values() if n.fabric.rr_cluster_id]
    assert sorted(n.name for n in reflectors) == ["rr1", "rr2"]
    assert all(n.labels["route-reflector"] == "true" for n in reflectors)
    assert {n.fabric.rr_cluster_id for n in reflectors} == {"244.0.0.1"}


def test_leaf_spine_racks_and_routers() -> None:
    topo = load("leaf-spine")
    assert sorted(n.name for n in topo.by_role(Role.FRR)) == ["spine1", "spine2", "tor1", "tor2"]
    racks = {n.name: n.labels["rack"] for n in topo.by_role(Role.AGENT)}
    assert racks == {"r1n1": "r1", "r1n2": "r1", "r2n1": "r2", "r2n2": "r2"}
    assert len({n.fabric.asn for n in topo.by_role(Role.AGENT)}) == 4  # an AS per node


@pytest.mark.skipif(shutil.which("bird") is None, reason="needs bird2")
@pytest.mark.parametrize("conf", sorted(TOPOLOGIES.glob("*/bird.conf")), ids=str)
def test_bird_accepts_its_configs(conf: Path) -> None:
    done = subprocess.run(["bird", "-p", "-c", str(conf)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.skipif(shutil.which("vtysh") is None, reason="needs frr")
@pytest.mark.parametrize(
    "conf", sorted([*TOPOLOGIES.glob("*/frr.conf"), *TOPOLOGIES.glob("leaf-spine/*.conf")]),
    ids=str,
)  # fmt: skip
def test_frr_accepts_its_configs(conf: Path) -> None:
    done = subprocess.run(["vtysh", "-C", "-f", str(conf)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize(
    "text, field",
    [
        ("kind: BGPPeer\nmetadata: {name: x}", "objects[0].apiVersion"),
        ("apiVersion: l3fabric.io/v1\nkind: Pod\nmetadata: {name: x}", "objects[0].kind"),
        ("apiVersion: l3fabric.io/v1\nkind: BGPPeer\nspec: {}", "objects[0].metadata.name"),
        ("apiVersion: l3fabric.io/v1\nkind: BGPPeer\nmetadata: {name: x}\n"
         "spec: {peerIP: 10.0.0.1}", "objects[0].BGPPeer/x.asNumber"),
        ("apiVersion: l3fabric.io/v1\nkind: IPPool\nmetadata: {name: p}\n"
         "spec: {cidr: nonsense}", "objects[0].spec.cidr"),
        ("apiVersion: l3fabric.io/v1\nkind: BGPPeer\nmetadata:\n  name: x\n  annotations:\n"
         "    l3fabric.io/accept-prefixes: nope\nspec: {peerIP: 10.0.0.1, asNumber: 1}",
         "objects[0].BGPPeer/x.metadata.annotations.l3fabric.io/accept-prefixes"),
    ],
)  # fmt: skip
def test_bad_objects_name_the_field(text: str, field: str) -> None:
    with pytest.raises(InvalidInput) as err:
        parse_objects(text, "objects")
    assert err.value.field == field


def test_password_files_map_to_the_bound_host_file() -> None:
    text = (
        "apiVersion: l3fabric.io/v1\nkind: BGPPeer\nmetadata: {name: x}\n"
        "spec: {peerIP: 10.0.0.1, asNumber: 1, password: {file: /etc/l3fabric/pw}}"
    )
    bound = [Bind(Path("/host/pw"), "/etc/l3fabric/pw", "ro"), Bind(Path("/o"), OBJECTS_PATH)]
    [peer] = parse_objects(text, "objects", bound)
    assert peer.spec["password"] == {"file": "/host/pw"}
    [unbound] = parse_objects(text, "objects")
    assert unbound.spec["password"] == {"file": "/etc/l3fabric/pw"}
    with pytest.raises(InvalidInput, match="different files"):
        parse_objects(text, "objects", [*bound, Bind(Path("/other"), "/etc/l3fabric/pw")])
