"""Topology files: shipped ones are valid containerlab, parsing yields typed values, and
everything `lab up` cannot realise is refused with the field named."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from netaddr import IPNetwork

from ipam_blocks.errors import InvalidInput
from l3fabric.lab.topology import (
    Bind,
    Endpoint,
    FabricSettings,
    Role,
    parse_lab_name,
    parse_topology,
)
from tests.lab.schema import TOPOLOGIES, schema_errors

BASE = Path("/labs/here")
SHIPPED = sorted(TOPOLOGIES.glob("*.clab.yml"))


def doc(nodes: dict[str, Any], links: list[Any] | None = None, **topology: Any) -> dict:
    body: dict[str, Any] = {"nodes": nodes, **topology}
    if links is not None:
        body["links"] = links
    return {"name": "t", "topology": body}


def field_of(document: dict) -> str:
    with pytest.raises(InvalidInput) as err:
        parse_topology(document, BASE)
    return err.value.field


PLAIN = {"kind": "linux", "image": "alpine:3"}


def test_topologies_are_shipped() -> None:
    assert [p.name for p in SHIPPED] and "mesh3.clab.yml" in [p.name for p in SHIPPED]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_topologies_are_valid_containerlab(path: Path) -> None:
    document = yaml.safe_load(path.read_text())
    assert schema_errors(document) == []
    parse_topology(document, path.parent)  # and `lab up` can realise them


def test_mesh3() -> None:
    path = TOPOLOGIES / "mesh3.clab.yml"
    topo = parse_topology(yaml.safe_load(path.read_text()), path.parent)
    assert topo.name == "mesh3"
    assert [n.name for n in topo.by_role(Role.AGENT)] == ["n1", "n2", "n3"]
    assert topo.nodes["sw"].role is Role.BRIDGE
    n1 = topo.nodes["n1"]
    assert n1.fabric == FabricSettings(IPNetwork("10.0.0.11/24"), 64512)
    assert n1.labels == {"rack": "r1"}  # the l3fabric.io/ settings are not Node labels
    assert n1.image == "ghcr.io/l3fabric/l3fabric:latest"  # inherited from kinds.linux
    assert "ip addr add 10.0.0.11/24 dev eth1" in n1.exec
    assert {(str(lk.a), str(lk.b)) for lk in topo.links} == {
        ("n1:eth1", "sw:eth1"), ("n2:eth1", "sw:eth2"), ("n3:eth1", "sw:eth3"),
    }  # fmt: skip
    assert topo.netns("n1") == "mesh3-n1"


def test_roles_follow_kind_and_image() -> None:
    topo = parse_topology(
        doc({
            "a": {"kind": "linux", "image": "ghcr.io/l3fabric/l3fabric:dev"},
            "f": {"kind": "linux", "image": "quay.io/frrouting/frr:9.1.0",
                  "binds": ["f/frr.conf:/etc/frr/frr.conf"]},
            "b": {"kind": "linux", "image": "ghcr.io/x/bird:2",
                  "binds": ["/abs/bird.conf:/etc/bird/bird.conf:ro"]},
            "p": PLAIN,
            "s": {"kind": "bridge"},
        }),
        BASE,
    )  # fmt: skip
    roles = {n.name: n.role for n in topo.nodes.values()}
    assert roles == {"a": Role.AGENT, "f": Role.FRR, "b": Role.BIRD, "p": Role.LINUX,
                     "s": Role.BRIDGE}  # fmt: skip
    # bind host paths are relative to the topology file's directory
    assert topo.nodes["f"].binds == (Bind(BASE / "f/frr.conf", "/etc/frr/frr.conf"),)
    assert topo.nodes["b"].binds == (Bind(Path("/abs/bird.conf"), "/etc/bird/bird.conf", "ro"),)


def test_inheritance_from_defaults_kinds_and_groups() -> None:
    topo = parse_topology(
        doc(
            {"x": {"group": "g", "env": {"B": 2}, "labels": {"l": "node"}}, "y": None},
            defaults={"kind": "linux", "env": {"A": "d", "B": "d"}, "binds": ["d:/d"]},
            kinds={"linux": {"image": "alpine", "exec": ["echo kind"], "labels": {"l": "k"}}},
            groups={"g": {"exec": ["echo group"], "binds": ["g:/d", "g2:/g"]}},
        ),
        BASE,
    )
    x, y = topo.nodes["x"], topo.nodes["y"]
    assert (x.kind, x.image, y.kind, y.image) == ("linux", "alpine", "linux", "alpine")
    assert x.env == {"A": "d", "B": "2"} and y.env == {"A": "d", "B": "d"}
    assert x.labels == {"l": "node"} and y.labels == {"l": "k"}
    assert x.exec == ("echo group",) and y.exec == ("echo kind",)
    # binds merge by container path; the most specific level wins
    assert {b.container: b.host for b in x.binds} == {"/d": BASE / "g", "/g": BASE / "g2"}
    assert y.binds == (Bind(BASE / "d", "/d"),)


def test_extended_links_and_mtu() -> None:
    topo = parse_topology(
        doc(
            {"a": PLAIN, "b": PLAIN},
            [{"type": "veth", "mtu": 9000, "endpoints": [
                {"node": "a", "interface": "e1"}, {"node": "b", "interface": "e1"}]}],
        ),
        BASE,
    )  # fmt: skip
    [link] = topo.links
    assert (link.a, link.b, link.mtu) == (Endpoint("a", "e1"), Endpoint("b", "e1"), 9000)


@pytest.mark.parametrize(
    ("document", "field"),
    [
        ({"topology": {"nodes": {"a": PLAIN}}}, "name"),
        ({"name": "t"}, "topology.nodes"),
        ({"name": "a/b", "topology": {"nodes": {"a": PLAIN}}}, "name"),
        (doc({"a": {"image": "alpine"}}), "topology.nodes.a.kind"),
        (doc({"a": {"kind": "nokia_srlinux", "image": "srl"}}), "topology.nodes.a.kind"),
        (doc({"a": {"kind": "linux"}}), "topology.nodes.a.image"),
        (doc({"a": PLAIN}, [{"endpoints": ["a:eth1", "zz:eth1"]}]),
         "topology.links[0].endpoints[1]"),
        (doc({"a": PLAIN, "b": PLAIN},
             [{"endpoints": ["a:eth1", "b:eth1"]}, {"endpoints": ["b:eth2", "a:eth1"]}]),
         "topology.links[1].endpoints[1]"),
        (doc({"a": PLAIN, "b": PLAIN}, [{"endpoints": ["a:averyveryverylong1", "b:eth1"]}]),
         "topology.links[0].endpoints[0]"),
        (doc({"a": PLAIN, "b": PLAIN}, [{"endpoints": ["a:eth1", "b"]}]),
         "topology.links[0].endpoints[1]"),
        (doc({"a": PLAIN}, [{"endpoints": ["a:eth1", "host:veth9"]}]),
         "topology.links[0].endpoints[1]"),
        (doc({"a": PLAIN}, [{"type": "macvlan", "endpoints": []}]), "topology.links[0].type"),
        (doc({"a": PLAIN, "b": PLAIN}, [{"endpoints": ["a:e", "b:e"], "mtu": 10}]),
         "topology.links[0].mtu"),
        (doc({"averyveryverylongbridge": {"kind": "bridge"}}),
         "topology.nodes.averyveryverylongbridge"),
        (doc({"Agent_1": {"kind": "linux", "image": "l3fabric"}}), "topology.nodes.Agent_1"),
        (doc({"a": {"kind": "linux", "image": "l3fabric",
                    "labels": {"l3fabric.io/ipv4": "10.0.0.1"}}}),
         "topology.nodes.a.labels.l3fabric.io/ipv4"),
        (doc({"a": {"kind": "linux", "image": "l3fabric",
                    "labels": {"l3fabric.io/asn": "AS1"}}}),
         "topology.nodes.a.labels.l3fabric.io/asn"),
        (doc({"a": {"kind": "linux", "image": "l3fabric",
                    "labels": {"l3fabric.io/color": "red"}}}),
         "topology.nodes.a.labels.l3fabric.io/color"),
        (doc({"a": {**PLAIN, "labels": {"l3fabric.io/asn": 1}}}), "topology.nodes.a.labels"),
        (doc({"a": {"kind": "linux", "image": "frr"}}), "topology.nodes.a.binds"),
        (doc({"a": {"kind": "linux", "image": "bird", "binds": ["x:/etc/other"]}}),
         "topology.nodes.a.binds"),
        (doc({"a": {**PLAIN, "binds": ["nocolon"]}}), "topology.nodes.a.binds[0]"),
        (doc({"a": {**PLAIN, "exec": "ip link"}}), "topology.nodes.a.exec"),
    ],
)  # fmt: skip
def test_errors_name_the_field(document: dict, field: str) -> None:
    assert field_of(document) == field


def test_error_messages_say_what_is_wrong() -> None:
    with pytest.raises(InvalidInput, match="unknown node 'zz' in zz:eth1"):
        parse_topology(doc({"a": PLAIN}, [{"endpoints": ["a:eth1", "zz:eth1"]}]), BASE)
    with pytest.raises(InvalidInput, match="longer than 15 characters"):
        parse_topology(doc({"a": PLAIN, "b": PLAIN},
                           [{"endpoints": ["a:averyveryverylong1", "b:e"]}]), BASE)  # fmt: skip
    with pytest.raises(InvalidInput, match=r"a:eth1 is already used by topology.links\[0\]"):
        parse_topology(doc({"a": PLAIN, "b": PLAIN},
                           [{"endpoints": ["a:eth1", "b:eth1"]},
                            {"endpoints": ["a:eth1", "b:eth2"]}]), BASE)  # fmt: skip


def test_lab_name_alone() -> None:
    assert parse_lab_name("name: x\ntopology: {nodes: {a: {kind: foo}}}") == "x"
    with pytest.raises(InvalidInput) as err:
        parse_lab_name("[1, 2]")
    assert err.value.field == "name"


def test_vendored_schema_is_shared_one() -> None:
    from tests.lab.schema import SCHEMA, SHARED_SCHEMA

    if not SHARED_SCHEMA.exists():
        pytest.skip(f"no shared checkout at {SHARED_SCHEMA.parent} to compare the copy with")
    assert SCHEMA.read_bytes() == SHARED_SCHEMA.read_bytes()
