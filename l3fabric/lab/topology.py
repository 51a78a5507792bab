"""containerlab topology files, parsed once into typed values (pure: no I/O).

The same file must stay valid for real containerlab (tests validate every shipped file against
containerlab's own JSON schema), so everything l3fabric needs is expressed in containerlab's
own vocabulary:

- a node's *role* follows from its kind and image: `kind: bridge` is an L2 segment; a `linux`
  node whose image names `l3fabric` runs the agent, `frr` runs FRR with the bound
  `/etc/frr/frr.conf`, `bird` runs BIRD 2 with the bound `.../bird.conf`; any other image is
  a plain namespace that only runs its `exec` lines.
- per-node l3fabric settings are container labels under `l3fabric.io/` (see `FABRIC_LABELS`);
  every other label becomes a label of the node's Node record (selectors match on them).
- cluster-wide l3fabric objects (BGPPeers, BGPConfiguration, IPPools) live in a YAML file
  beside the topology, bound into the l3fabric nodes at `/etc/l3fabric/objects.yaml`
  (`l3fabric.lab.objects`).
- `defaults`, `kinds` and `groups` are inherited the way containerlab does it: maps (`env`,
  `labels`) merge, `binds` merge by container path, scalars and `exec` take the most
  specific level that sets them (node > group > kind > defaults).

Anything this module cannot realise without Docker (other kinds, host/macvlan/vxlan links,
interface names the kernel refuses) is rejected here with an `InvalidInput` naming the field
by its path in the file, e.g. `topology.links[2].endpoints[1]`.
"""

from __future__ import annotations

import posixpath
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml
from netaddr import AddrFormatError, IPAddress, IPNetwork

from ipam_blocks.errors import InvalidInput
from ipam_blocks.model import check_object_name

__all__ = [
    "FABRIC_LABELS",
    "Bind",
    "Endpoint",
    "FabricSettings",
    "LabNode",
    "Link",
    "Role",
    "Topology",
    "bird_config",
    "parse_lab_name",
    "parse_topology",
    "parse_topology_yaml",
]

IFNAMSIZ = 15  # the kernel's limit on interface names (IFNAMSIZ - 1)
FABRIC_LABEL_PREFIX = "l3fabric.io/"
FABRIC_LABELS = {
    "l3fabric.io/ipv4": "the node's address with prefix length (Node ipv4Address)",
    "l3fabric.io/asn": "the node's AS number (Node asNumber)",
    "l3fabric.io/rr-cluster-id": "route reflector cluster ID (Node routeReflectorClusterID)",
}
FRR_CONFIG = "/etc/frr/frr.conf"
FRR_DAEMONS = "/etc/frr/daemons"
BIRD_CONFIG_NAME = "bird.conf"
# Endpoint "nodes" that containerlab treats specially; they need Docker or the host.
_SPECIAL_ENDPOINTS = ("host", "mgmt-net", "macvlan", "vxlan", "vxlan-stitch", "dummy")
_IFNAME_FORBIDDEN = frozenset("/: \t\n\r\v\f")


class Role(StrEnum):
    """What `lab up` runs in a node."""

    AGENT = "l3fabric"
    FRR = "frr"
    BIRD = "bird"
    LINUX = "linux"
    BRIDGE = "bridge"


@dataclass(frozen=True)
class Bind:
    """`host:container[:mode]`; `host` resolved against the topology file's directory."""

    host: Path
    container: str
    mode: str = ""


@dataclass(frozen=True)
class FabricSettings:
    """The `l3fabric.io/*` labels of an l3fabric node: what its Node record says."""

    ipv4: IPNetwork | None = None
    asn: int | None = None
    rr_cluster_id: str | None = None


@dataclass(frozen=True)
class LabNode:
    name: str
    kind: str
    image: str
    role: Role
    exec: tuple[str, ...] = ()
    binds: tuple[Bind, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)
    """Labels for the Node record: every label except the `l3fabric.io/` settings."""
    fabric: FabricSettings = FabricSettings()

    def bind_for(self, container_path: str) -> Bind | None:
        """The bind mounted at `container_path` (compared normalised), if any."""
        wanted = posixpath.normpath(container_path)
        return next((b for b in self.binds if posixpath.normpath(b.container) == wanted), None)


@dataclass(frozen=True, order=True)
class Endpoint:
    node: str
    ifname: str

    def __str__(self) -> str:
        return f"{self.node}:{self.ifname}"


@dataclass(frozen=True)
class Link:
    a: Endpoint
    b: Endpoint
    mtu: int | None = None


@dataclass(frozen=True)
class Topology:
    name: str
    nodes: Mapping[str, LabNode]
    links: tuple[Link, ...] = ()

    def netns(self, node: str) -> str:
        """The network namespace that realises `node` (also the FRR instance name)."""
        return f"{self.name}-{node}"

    def by_role(self, role: Role) -> list[LabNode]:
        return [n for n in self.nodes.values() if n.role is role]


# --- parsing ---------------------------------------------------------------------------------


def parse_topology_yaml(text: str, base_dir: Path) -> Topology:
    """Parse the text of a `.clab.yml` file; `base_dir` resolves relative bind paths."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise InvalidInput("file", f"not valid YAML: {err}") from None
    return parse_topology(doc, base_dir)


def parse_lab_name(text: str) -> str:
    """Only the lab's name: what `lab down` and `lab status` need to find its state."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise InvalidInput("file", f"not valid YAML: {err}") from None
    name = doc.get("name") if isinstance(doc, dict) else None
    if not isinstance(name, str) or not name:
        raise InvalidInput("name", "the lab needs a name (a non-empty string)")
    _check_chars(name, "name")
    return name


def parse_topology(doc: Any, base_dir: Path) -> Topology:
    """Parse a loaded topology document (see the module docstring for the rules)."""
    if not isinstance(doc, dict):
        raise InvalidInput("file", "expected a mapping with `name` and `topology`")
    name = doc.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidInput("name", "the lab needs a name (a non-empty string)")
    _check_chars(name, "name")
    topo = _mapping(doc.get("topology"), "topology")
    raw_nodes = _mapping(topo.get("nodes"), "topology.nodes")
    if not raw_nodes:
        raise InvalidInput("topology.nodes", "a lab needs at least one node")
    levels = _Levels(
        defaults=_mapping(topo.get("defaults"), "topology.defaults"),
        kinds=_mapping(topo.get("kinds"), "topology.kinds"),
        groups=_mapping(topo.get("groups"), "topology.groups"),
    )
    nodes = {str(n): _parse_node(str(n), raw, levels, base_dir) for n, raw in raw_nodes.items()}
    raw_links = topo.get("links") or []
    if not isinstance(raw_links, list):
        raise InvalidInput("topology.links", "expected a list of links")
    links = tuple(_parse_link(raw, f"topology.links[{i}]") for i, raw in enumerate(raw_links))
    _check_links(links, nodes)
    return Topology(name, nodes, links)


@dataclass(frozen=True)
class _Levels:
    defaults: dict[str, Any]
    kinds: dict[str, Any]
    groups: dict[str, Any]


def _parse_node(name: str, raw: Any, levels: _Levels, base_dir: Path) -> LabNode:
    where = f"topology.nodes.{name}"
    _check_chars(name, where)
    own = _mapping(raw, where)
    group_name = own.get("group") or levels.defaults.get("group")
    group_raw = levels.groups.get(group_name) if group_name is not None else None
    group = _mapping(group_raw, f"topology.groups.{group_name}")
    kind = own.get("kind") or group.get("kind") or levels.defaults.get("kind")
    if not kind:
        raise InvalidInput(f"{where}.kind", "no kind (set it on the node, its group or defaults)")
    kind_level = _mapping(levels.kinds.get(kind), f"topology.kinds.{kind}")
    # Most specific first: node, group, kind, defaults.
    chain = [own, group, kind_level, levels.defaults]
    image = _first(chain, "image") or ""
    role = _role(str(kind), str(image), where)
    labels = _merged(chain, "labels", f"{where}.labels")
    fabric, node_labels = _fabric_settings(labels, f"{where}.labels")
    if role is Role.AGENT:
        check_object_name(name, where)  # it becomes a Node object's name
    elif fabric != FabricSettings():
        raise InvalidInput(
            f"{where}.labels", "l3fabric.io/ labels only apply to nodes with an l3fabric image"
        )
    if role is Role.BRIDGE:
        _check_ifname(name, where)  # the Linux bridge is named after the node
    node = LabNode(
        name=name,
        kind=str(kind),
        image=str(image),
        role=role,
        exec=_exec_lines(_first(chain, "exec") or [], f"{where}.exec"),
        binds=_binds(chain, base_dir, f"{where}.binds"),
        env=_merged(chain, "env", f"{where}.env"),
        labels=node_labels,
        fabric=fabric,
    )
    _check_role_binds(node, where)
    return node


def _role(kind: str, image: str, where: str) -> Role:
    if kind == "bridge":
        return Role.BRIDGE
    if kind != "linux":
        raise InvalidInput(
            f"{where}.kind",
            f"{kind!r} cannot be realised without Docker (use linux or bridge)",
        )
    if not image:
        raise InvalidInput(f"{where}.image", "a linux node needs an image")
    lowered = image.lower()
    for needle, role in (("l3fabric", Role.AGENT), ("frr", Role.FRR), ("bird", Role.BIRD)):
        if needle in lowered:
            return role
    return Role.LINUX


def _check_role_binds(node: LabNode, where: str) -> None:
    if node.role is Role.FRR and node.bind_for(FRR_CONFIG) is None:
        raise InvalidInput(f"{where}.binds", f"an FRR node needs a bind to {FRR_CONFIG}")
    if node.role is Role.BIRD and _bird_bind(node) is None:
        raise InvalidInput(
            f"{where}.binds", f"a BIRD node needs a bind to its config (.../{BIRD_CONFIG_NAME})"
        )


def _bird_bind(node: LabNode) -> Bind | None:
    return next((b for b in node.binds if b.container.endswith(BIRD_CONFIG_NAME)), None)


def bird_config(node: LabNode) -> Bind:
    """The bind holding a BIRD node's configuration (parsing guarantees there is one)."""
    bind = _bird_bind(node)
    assert bind is not None, node.name
    return bind


def _fabric_settings(labels: dict[str, str], where: str) -> tuple[FabricSettings, dict[str, str]]:
    """Split labels into the l3fabric settings and the labels of the Node record."""
    ours = {k: v for k, v in labels.items() if k.startswith(FABRIC_LABEL_PREFIX)}
    rest = {k: v for k, v in labels.items() if k not in ours}
    for key in ours:
        if key not in FABRIC_LABELS:
            raise InvalidInput(
                f"{where}.{key}", f"unknown l3fabric setting (known: {', '.join(FABRIC_LABELS)})"
            )
    ipv4 = _node_address(ours.get("l3fabric.io/ipv4"), f"{where}.l3fabric.io/ipv4")
    asn = _asn(ours.get("l3fabric.io/asn"), f"{where}.l3fabric.io/asn")
    cluster = ours.get("l3fabric.io/rr-cluster-id")
    if cluster is not None:
        try:
            IPAddress(cluster, 4)
        except (AddrFormatError, ValueError):
            raise InvalidInput(
                f"{where}.l3fabric.io/rr-cluster-id", f"expected A.B.C.D, got {cluster!r}"
            ) from None
    return FabricSettings(ipv4, asn, cluster), rest


def _node_address(value: str | None, where: str) -> IPNetwork | None:
    if value is None:
        return None
    try:
        net = IPNetwork(value, version=4)
    except (AddrFormatError, ValueError):
        net = None
    if net is None or "/" not in value:
        raise InvalidInput(where, f"expected A.B.C.D/NN, got {value!r}")
    return net


def _asn(value: str | None, where: str) -> int | None:
    if value is None:
        return None
    if not value.isdigit() or not 1 <= int(value) <= 4294967295:
        raise InvalidInput(where, f"expected an AS number 1..4294967295, got {value!r}")
    return int(value)


def _exec_lines(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise InvalidInput(where, "expected a list of command lines")
    return tuple(value)


def _binds(chain: list[dict[str, Any]], base_dir: Path, where: str) -> tuple[Bind, ...]:
    by_target: dict[str, Bind] = {}
    for level in chain:  # most specific first: the first bind for a target wins
        raw = level.get("binds") or []
        if not isinstance(raw, list):
            raise InvalidInput(where, "expected a list of host:container[:mode] strings")
        for i, spec in enumerate(raw):
            bind = _parse_bind(spec, base_dir, f"{where}[{i}]")
            by_target.setdefault(posixpath.normpath(bind.container), bind)
    return tuple(by_target.values())


def _parse_bind(spec: Any, base_dir: Path, where: str) -> Bind:
    parts = spec.split(":") if isinstance(spec, str) else []
    if len(parts) not in (2, 3) or not all(parts[:2]):
        raise InvalidInput(where, f"expected host:container[:mode], got {spec!r}")
    if not parts[1].startswith("/"):
        raise InvalidInput(where, f"the container path {parts[1]!r} must be absolute")
    host = Path(parts[0]).expanduser()
    return Bind(host if host.is_absolute() else base_dir / host, parts[1], "".join(parts[2:]))


def _parse_link(raw: Any, where: str) -> Link:
    link = _mapping(raw, where)
    kind = link.get("type")
    endpoints = link.get("endpoints")
    if kind not in (None, "veth"):
        raise InvalidInput(f"{where}.type", f"{kind!r} links need Docker or the host (use veth)")
    if not isinstance(endpoints, list) or len(endpoints) != 2:
        raise InvalidInput(f"{where}.endpoints", "expected exactly two endpoints")
    a, b = (_parse_endpoint(e, f"{where}.endpoints[{i}]") for i, e in enumerate(endpoints))
    mtu = link.get("mtu")
    if mtu is not None and (not isinstance(mtu, int) or not 68 <= mtu <= 65535):
        raise InvalidInput(f"{where}.mtu", f"expected 68..65535, got {mtu!r}")
    return Link(a, b, mtu)


def _parse_endpoint(raw: Any, where: str) -> Endpoint:
    if isinstance(raw, dict):  # extended form: {node: n1, interface: eth1}
        node, ifname = raw.get("node"), raw.get("interface")
    elif isinstance(raw, str) and ":" in raw:
        node, _, ifname = raw.partition(":")
    else:
        raise InvalidInput(where, f"expected node:interface, got {raw!r}")
    if not isinstance(node, str) or not node or not isinstance(ifname, str) or not ifname:
        raise InvalidInput(where, f"expected node:interface, got {raw!r}")
    if node in _SPECIAL_ENDPOINTS:
        raise InvalidInput(where, f"{node!r} endpoints need Docker or the host")
    _check_ifname(ifname, where)
    return Endpoint(node, ifname)


def _check_links(links: tuple[Link, ...], nodes: Mapping[str, LabNode]) -> None:
    seen: dict[Endpoint, str] = {}
    for i, link in enumerate(links):
        for j, end in enumerate((link.a, link.b)):
            where = f"topology.links[{i}].endpoints[{j}]"
            if end.node not in nodes:
                raise InvalidInput(where, f"unknown node {end.node!r} in {end}")
            if end in seen:
                raise InvalidInput(where, f"{end} is already used by {seen[end]}")
            seen[end] = where


def _check_ifname(name: str, where: str) -> None:
    if len(name) > IFNAMSIZ:
        raise InvalidInput(where, f"interface name {name!r} is longer than {IFNAMSIZ} characters")
    if name in (".", "..", "lo") or any(c in _IFNAME_FORBIDDEN for c in name):
        raise InvalidInput(where, f"{name!r} cannot be an interface name")


def _check_chars(name: str, where: str) -> None:
    # Names become network namespace names (files under /var/run/netns) and FRR instance
    # names (directories under /var/run/frr).
    if "/" in name or name.startswith(".") or any(c.isspace() for c in name):
        raise InvalidInput(where, f"{name!r} cannot name a network namespace")


# --- small helpers ---------------------------------------------------------------------------


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInput(where, "expected a mapping")
    return value


def _first(chain: list[dict[str, Any]], key: str) -> Any:
    return next((level[key] for level in chain if level.get(key) not in (None, "", [])), None)


def _merged(chain: list[dict[str, Any]], key: str, where: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for level in reversed(chain):  # least specific first, so the node's own values win
        values = _mapping(level.get(key), where)
        out.update({str(k): _scalar(v, f"{where}.{k}") for k, v in values.items()})
    return out


def _scalar(value: Any, where: str) -> str:
    if isinstance(value, bool):  # before int: bool is an int
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return str(value)
    raise InvalidInput(where, f"expected a string or number, got {value!r}")
