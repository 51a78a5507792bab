"""Typed IPAM objects, parsed once from store resources (CRD field names) and rendered back.

Everything past this module sees `netaddr` networks, enums and ints, never raw spec dicts.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from netaddr import AddrFormatError, IPAddress, IPNetwork

from ipam_blocks.errors import InvalidInput
from ipam_blocks.selector import EVERYTHING, LabelSelector, parse_selector_dict
from ipam_blocks.store.base import Resource

# The node an IPAMBlock (its affinity), BlockAffinity or IPAMHandle (its allocations) belongs
# to, as a label: an agent lists and watches only its own node's objects by it (and admission
# checks it on affinities). Written by every render below; metadata, so no CRD schema names it.
NODE_LABEL = "l3fabric.io/node"

DEFAULT_BLOCK_SIZE = {4: 26, 6: 122}
BLOCK_SIZE_RANGE = {4: (20, 32), 6: (116, 128)}
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")


class EncapMode(StrEnum):
    NEVER = "Never"
    ALWAYS = "Always"
    CROSS_SUBNET = "CrossSubnet"


class AffinityState(StrEnum):
    PENDING = "pending"
    CONFIRMED = "confirmed"
    PENDING_DELETION = "pendingDeletion"


class AllocationType(StrEnum):
    POD = "Pod"
    TUNNEL = "Tunnel"
    MANUAL = "Manual"


# --- names (DESIGN §3: derived deterministically, never re-encoded) -------------------------


def block_name(cidr: IPNetwork) -> str:
    return str(cidr).replace(".", "-").replace(":", "-").replace("/", "-").lower()


def affinity_name(node: str, cidr: IPNetwork) -> str:
    return f"{node}-{block_name(cidr)}"


def check_object_name(value: str, field_name: str) -> str:
    if not value or len(value) > 253 or not _DNS_SUBDOMAIN.match(value):
        raise InvalidInput(
            field_name,
            f"{value!r} is not a valid name (lowercase letters, digits, '-' and '.', "
            "starting and ending with a letter or digit, at most 253 characters)",
        )
    return value


_HANDLE_DIGEST_CHARS = 16  # 64 bits of SHA-256: distinct ids never meet by accident


def handle_name(handle_id: str) -> str:
    """The object name of a handle (and of its Workload record): the id itself when it is
    already a valid name, so names stored before ids with capitals were told apart keep
    theirs; otherwise the lowercased id plus a digest of the exact id, so ids that differ
    only in case get different names. Names alone cannot be collision-free (an id may spell
    another's derived name): readers compare the spec's exact `handleID` too
    (`ipam_blocks.handles`)."""
    lowered = check_object_name(handle_id.lower(), "handle")
    if lowered == handle_id:
        return handle_id
    digest = hashlib.sha256(handle_id.encode()).hexdigest()[:_HANDLE_DIGEST_CHARS]
    stem = lowered[: 253 - _HANDLE_DIGEST_CHARS - 1].rstrip("-.")
    return f"{stem}-{digest}"


def handle_names(handle_id: str) -> tuple[str, ...]:
    """Where an object of this handle may be stored: its name, then the lowercased id under
    which releases before per-case names stored ids with capitals."""
    name = handle_name(handle_id)
    legacy = handle_id.lower()
    return (name,) if legacy == name else (name, legacy)


# --- parsing helpers -------------------------------------------------------------------------


def parse_cidr(value: Any, field_name: str = "cidr") -> IPNetwork:
    """A network in canonical form; host bits set is an error (it usually hides a typo)."""
    if not isinstance(value, str) or "/" not in value:
        raise InvalidInput(field_name, f"expected a CIDR like 10.244.0.0/16, got {value!r}")
    try:
        net = IPNetwork(value)
    except (AddrFormatError, ValueError, TypeError):
        raise InvalidInput(field_name, f"{value!r} is not a valid CIDR") from None
    if net.ip != net.network:
        raise InvalidInput(field_name, f"{value} has host bits set; did you mean {net.cidr}?")
    return net


def parse_ip(value: Any, field_name: str = "ip") -> IPAddress:
    try:
        return IPAddress(str(value))
    except (AddrFormatError, ValueError, TypeError):
        raise InvalidInput(field_name, f"{value!r} is not a valid IP address") from None


def _enum(enum_type: type[StrEnum], value: Any, field_name: str, default: StrEnum) -> Any:
    if value is None:
        return default
    try:
        return enum_type(value)
    except ValueError:
        choices = ", ".join(e.value for e in enum_type)
        raise InvalidInput(field_name, f"{value!r} is not one of {choices}") from None


def _bool(value: Any, field_name: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidInput(field_name, f"expected true or false, got {value!r}")
    return value


def _int(value: Any, field_name: str, default: int, lo: int, hi: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise InvalidInput(field_name, f"expected an integer in {lo}..{hi}, got {value!r}")
    return value


# --- IPPool ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class IPPool:
    name: str
    cidr: IPNetwork
    block_size: int
    ipip_mode: EncapMode = EncapMode.NEVER
    vxlan_mode: EncapMode = EncapMode.NEVER
    nat_outgoing: bool = False
    disabled: bool = False
    node_selector: LabelSelector = EVERYTHING
    revision: str | None = None

    @property
    def version(self) -> int:
        return self.cidr.version

    @property
    def block_count(self) -> int:
        return 1 << (self.block_size - self.cidr.prefixlen)

    def block_at(self, index: int) -> IPNetwork:
        step = 1 << ((32 if self.version == 4 else 128) - self.block_size)
        return IPNetwork(
            f"{IPAddress(self.cidr.first + index * step, self.version)}/{self.block_size}"
        )


def parse_pool(res: Resource) -> IPPool:
    spec = res.spec
    check_object_name(res.name, "name")
    cidr = parse_cidr(spec.get("cidr"), "cidr")
    lo, hi = BLOCK_SIZE_RANGE[cidr.version]
    block_size = _int(spec.get("blockSize"), "blockSize", DEFAULT_BLOCK_SIZE[cidr.version], lo, hi)
    if cidr.prefixlen > block_size:
        raise InvalidInput(
            "cidr", f"pool {cidr} is smaller than one /{block_size} block (blockSize)"
        )
    ipip = _enum(EncapMode, spec.get("ipipMode"), "ipipMode", EncapMode.NEVER)
    vxlan = _enum(EncapMode, spec.get("vxlanMode"), "vxlanMode", EncapMode.NEVER)
    if ipip is not EncapMode.NEVER and vxlan is not EncapMode.NEVER:
        raise InvalidInput("vxlanMode", "ipipMode and vxlanMode cannot both be enabled on one pool")
    if ipip is not EncapMode.NEVER and cidr.version == 6:
        raise InvalidInput("ipipMode", "IP-in-IP carries IPv4 only; use Never for IPv6 pools")
    return IPPool(
        name=res.name,
        cidr=cidr,
        block_size=block_size,
        ipip_mode=ipip,
        vxlan_mode=vxlan,
        nat_outgoing=_bool(spec.get("natOutgoing"), "natOutgoing"),
        disabled=_bool(spec.get("disabled"), "disabled"),
        node_selector=parse_selector_dict(spec.get("nodeSelector"), "nodeSelector"),
        revision=res.revision,
    )


def render_pool(pool: IPPool) -> Resource:
    spec: dict[str, Any] = {
        "cidr": str(pool.cidr),
        "blockSize": pool.block_size,
        "ipipMode": pool.ipip_mode.value,
        "vxlanMode": pool.vxlan_mode.value,
        "natOutgoing": pool.nat_outgoing,
        "disabled": pool.disabled,
    }
    if not pool.node_selector.is_empty:
        spec["nodeSelector"] = pool.node_selector.to_dict()
    return Resource("IPPool", pool.name, spec, revision=pool.revision)


# --- IPAMBlock -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Attribute:
    """Who holds an allocation. Several ordinals may share one attribute entry."""

    handle_id: str
    pod: str = ""
    namespace: str = ""
    node: str = ""
    type: AllocationType = AllocationType.POD
    allocated_at: int = 0


@dataclass(frozen=True)
class Block:
    cidr: IPNetwork
    affinity: str | None  # node name; stored as "host:<node>"
    allocations: tuple[int | None, ...]
    unallocated: tuple[int, ...]
    attributes: tuple[Attribute, ...]
    sequence_number: int = 0
    seq_for_allocation: Mapping[int, int] = field(default_factory=dict)
    revision: str | None = None

    @property
    def name(self) -> str:
        return block_name(self.cidr)

    @property
    def size(self) -> int:
        return len(self.allocations)


def parse_block(res: Resource) -> Block:
    spec = res.spec
    affinity = spec.get("affinity") or None
    node = affinity.removeprefix("host:") if affinity and affinity.startswith("host:") else None
    return Block(
        cidr=parse_cidr(spec["cidr"]),
        affinity=node,
        allocations=tuple(spec["allocations"]),
        unallocated=tuple(spec["unallocated"]),
        attributes=tuple(
            Attribute(
                handle_id=a["handleID"],
                pod=a.get("pod", ""),
                namespace=a.get("namespace", ""),
                node=a.get("node", ""),
                type=AllocationType(a.get("type", "Pod")),
                allocated_at=a.get("allocatedAt", 0),
            )
            for a in spec["attributes"]
        ),
        sequence_number=spec["sequenceNumber"],
        seq_for_allocation={
            int(k): v for k, v in (spec.get("sequenceNumberForAllocation") or {}).items()
        },
        revision=res.revision,
    )


def node_labels(node: str | None) -> dict[str, str]:
    return {NODE_LABEL: node} if node else {}


def render_block(block: Block) -> Resource:
    spec: dict[str, Any] = {
        "cidr": str(block.cidr),
        "allocations": list(block.allocations),
        "unallocated": list(block.unallocated),
        "attributes": [
            {
                "handleID": a.handle_id,
                "pod": a.pod,
                "namespace": a.namespace,
                "node": a.node,
                "type": a.type.value,
                "allocatedAt": a.allocated_at,
            }
            for a in block.attributes
        ],
        "sequenceNumber": block.sequence_number,
        "sequenceNumberForAllocation": {str(k): v for k, v in block.seq_for_allocation.items()},
    }
    if block.affinity:
        spec["affinity"] = f"host:{block.affinity}"
    labels = node_labels(block.affinity)
    return Resource("IPAMBlock", block.name, spec, labels, revision=block.revision)


# --- BlockAffinity ---------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockAffinity:
    node: str
    cidr: IPNetwork
    state: AffinityState
    revision: str | None = None

    @property
    def name(self) -> str:
        return affinity_name(self.node, self.cidr)


def parse_affinity(res: Resource) -> BlockAffinity:
    return BlockAffinity(
        node=res.spec["node"],
        cidr=parse_cidr(res.spec["cidr"]),
        state=AffinityState(res.spec["state"]),
        revision=res.revision,
    )


def render_affinity(aff: BlockAffinity) -> Resource:
    spec = {"node": aff.node, "cidr": str(aff.cidr), "state": aff.state.value}
    return Resource("BlockAffinity", aff.name, spec, node_labels(aff.node), revision=aff.revision)


# --- IPAMHandle ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Handle:
    handle_id: str
    blocks: Mapping[str, int]  # block CIDR -> addresses held there
    revision: str | None = None
    stored_as: str | None = field(default=None, compare=False)
    """The name it was read under (one stored before per-case names may differ)."""
    node: str | None = field(default=None, compare=False)
    """The node its addresses were allocated for (its label); None on one written before
    handles were labelled, until `node_labels.label_node_objects` labels it."""

    @property
    def name(self) -> str:
        return self.stored_as or handle_name(self.handle_id)

    @property
    def total(self) -> int:
        return sum(self.blocks.values())


def parse_handle(res: Resource) -> Handle:
    return Handle(
        res.spec["handleID"],
        dict(res.spec.get("block") or {}),
        res.revision,
        res.name,
        res.labels.get(NODE_LABEL),
    )


def render_handle(handle: Handle) -> Resource:
    spec = {"handleID": handle.handle_id, "block": dict(handle.blocks)}
    labels = node_labels(handle.node)
    return Resource("IPAMHandle", handle.name, spec, labels, revision=handle.revision)


# --- IPAMConfig ------------------------------------------------------------------------------

IPAM_CONFIG_NAME = "default"


@dataclass(frozen=True)
class IPAMConfig:
    strict_affinity: bool = False
    max_blocks_per_host: int = 0  # 0 = unlimited
    auto_allocate_blocks: bool = True
    revision: str | None = None


def parse_ipam_config(res: Resource) -> IPAMConfig:
    spec = res.spec
    auto = spec.get("autoAllocateBlocks")
    return IPAMConfig(
        strict_affinity=_bool(spec.get("strictAffinity"), "strictAffinity"),
        max_blocks_per_host=_int(spec.get("maxBlocksPerHost"), "maxBlocksPerHost", 0, 0, 1 << 31),
        auto_allocate_blocks=True if auto is None else _bool(auto, "autoAllocateBlocks"),
        revision=res.revision,
    )


def render_ipam_config(cfg: IPAMConfig) -> Resource:
    spec = {
        "strictAffinity": cfg.strict_affinity,
        "maxBlocksPerHost": cfg.max_blocks_per_host,
        "autoAllocateBlocks": cfg.auto_allocate_blocks,
    }
    return Resource("IPAMConfig", IPAM_CONFIG_NAME, spec, revision=cfg.revision)


# --- Node ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Node:
    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    ipv4_address: IPNetwork | None = None  # the node's address *with* its prefix length
    as_number: int | None = None
    route_reflector_cluster_id: str | None = None
    revision: str | None = None


def parse_node(res: Resource) -> Node:
    spec = res.spec
    address = spec.get("ipv4Address")
    ipv4: IPNetwork | None = None
    if address:
        try:
            ipv4 = IPNetwork(address)
        except (AddrFormatError, ValueError):
            raise InvalidInput("ipv4Address", f"{address!r} is not an address/prefix") from None
        if ipv4.version != 4 or "/" not in str(address):
            raise InvalidInput("ipv4Address", f"expected A.B.C.D/NN, got {address!r}")
    asn = spec.get("asNumber")
    return Node(
        name=res.name,
        labels=dict(res.labels),
        ipv4_address=ipv4,
        as_number=None if asn is None else _int(asn, "asNumber", 0, 1, 4294967295),
        route_reflector_cluster_id=spec.get("routeReflectorClusterID") or None,
        revision=res.revision,
    )


def render_node(node: Node) -> Resource:
    spec: dict[str, Any] = {}
    if node.ipv4_address is not None:
        spec["ipv4Address"] = str(node.ipv4_address)
    if node.as_number is not None:
        spec["asNumber"] = node.as_number
    if node.route_reflector_cluster_id:
        spec["routeReflectorClusterID"] = node.route_reflector_cluster_id
    return Resource("Node", node.name, spec, dict(node.labels), revision=node.revision)


# --- Workload (embedded liveness record) -----------------------------------------------------


@dataclass(frozen=True)
class Workload:
    handle_id: str
    node: str
    namespace: str = ""
    pod: str = ""
    container_id: str = ""
    ifname: str = ""
    netns: str = ""
    addresses: tuple[str, ...] = ()
    revision: str | None = None
    stored_as: str | None = field(default=None, compare=False)
    """The name it was read under (one stored before per-case names may differ)."""

    @property
    def name(self) -> str:
        return self.stored_as or handle_name(self.handle_id)


def parse_workload(res: Resource) -> Workload:
    s = res.spec
    return Workload(
        handle_id=s["handleID"],
        node=s.get("node", ""),
        namespace=s.get("namespace", ""),
        pod=s.get("pod", ""),
        container_id=s.get("containerID", ""),
        ifname=s.get("ifname", ""),
        netns=s.get("netns", ""),
        addresses=tuple(s.get("addresses", ())),
        revision=res.revision,
        stored_as=res.name,
    )


def render_workload(w: Workload) -> Resource:
    spec = {
        "handleID": w.handle_id,
        "node": w.node,
        "namespace": w.namespace,
        "pod": w.pod,
        "containerID": w.container_id,
        "ifname": w.ifname,
        "netns": w.netns,
        "addresses": list(w.addresses),
    }
    return Resource("Workload", w.name, spec, revision=w.revision)
