"""BGPConfiguration and BGPPeer resources parsed once into typed values."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from ipaddress import IPv4Address, ip_address
from typing import Any

from bgp_speaker.bgp.routes import IPAddr
from ipam_blocks.errors import InvalidInput
from ipam_blocks.selector import LabelSelector, parse_selector_dict
from ipam_blocks.store.base import Resource

BGP_CONFIG_NAME = "default"
DEFAULT_AS = 64512
DEFAULT_HOLD = 90
DEFAULT_GRACEFUL_RESTART = 120
DEFAULT_VXLAN_VNI = 4096
DEFAULT_VXLAN_PORT = 4789


class NextHopMode(StrEnum):
    AUTO = "Auto"
    SELF = "Self"
    KEEP = "Keep"


@dataclass(frozen=True)
class Community:
    name: str
    value: str


@dataclass(frozen=True)
class PrefixAdvertisement:
    cidr: str
    communities: tuple[str, ...]


@dataclass(frozen=True)
class BgpConfig:
    as_number: int = DEFAULT_AS
    node_to_node_mesh: bool = True
    listen_port: int = 179
    keepalive_time: int | None = None
    hold_time: int = DEFAULT_HOLD
    graceful_restart_time: int = DEFAULT_GRACEFUL_RESTART  # 0 disables
    communities: tuple[Community, ...] = ()
    prefix_advertisements: tuple[PrefixAdvertisement, ...] = ()
    vxlan_vni: int = DEFAULT_VXLAN_VNI  # the VXLAN fallback's VNI and UDP port, cluster-wide
    vxlan_port: int = DEFAULT_VXLAN_PORT


@dataclass(frozen=True)
class PasswordRef:
    secret_name: str | None = None
    secret_key: str | None = None
    file: str | None = None


@dataclass(frozen=True)
class BgpPeer:
    name: str
    peer_ip: IPAddr | None
    peer_port: int
    as_number: int | None
    node: str | None
    node_selector: LabelSelector | None
    peer_selector: LabelSelector | None
    password: PasswordRef | None
    max_prefixes: int | None
    keepalive_time: int | None
    hold_time: int | None
    max_restart_time: int | None
    next_hop_mode: NextHopMode
    source_address: IPAddr | None

    @property
    def selects_all_nodes(self) -> bool:
        return self.node is None and (self.node_selector is None or self.node_selector.is_empty)


def _int(spec: dict[str, Any], key: str, lo: int, hi: int, where: str) -> int | None:
    value = spec.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise InvalidInput(f"{where}.{key}", f"expected an integer in {lo}..{hi}, got {value!r}")
    return value


def _timers(spec: dict[str, Any], where: str) -> tuple[int | None, int | None]:
    keepalive = _int(spec, "keepaliveTime", 1, 21845, where)
    hold = _int(spec, "holdTime", 3, 65535, where)
    if keepalive is not None and hold is not None and keepalive * 3 > hold:
        raise InvalidInput(f"{where}.keepaliveTime", "must be at most a third of holdTime")
    return keepalive, hold


def parse_bgp_config(res: Resource | None) -> BgpConfig:
    if res is None:
        return BgpConfig()
    spec = dict(res.spec)
    where = f"BGPConfiguration/{res.name}"
    keepalive, hold = _timers(spec, where)
    mesh = spec.get("nodeToNodeMeshEnabled", True)
    if not isinstance(mesh, bool):
        raise InvalidInput(f"{where}.nodeToNodeMeshEnabled", "expected true or false")
    return BgpConfig(
        as_number=_int(spec, "asNumber", 1, 4294967295, where) or DEFAULT_AS,
        node_to_node_mesh=mesh,
        listen_port=_int(spec, "listenPort", 1, 65535, where) or 179,
        keepalive_time=keepalive,
        hold_time=hold or DEFAULT_HOLD,
        graceful_restart_time=(
            DEFAULT_GRACEFUL_RESTART
            if spec.get("gracefulRestartTime") is None
            else _int(spec, "gracefulRestartTime", 0, 4095, where) or 0
        ),
        communities=tuple(Community(c["name"], c["value"]) for c in spec.get("communities") or ()),
        prefix_advertisements=tuple(
            PrefixAdvertisement(p["cidr"], tuple(p.get("communities") or ()))
            for p in spec.get("prefixAdvertisements") or ()
        ),
        vxlan_vni=_int(spec, "vxlanVNI", 1, 16777215, where) or DEFAULT_VXLAN_VNI,
        vxlan_port=_int(spec, "vxlanPort", 1, 65535, where) or DEFAULT_VXLAN_PORT,
    )


def parse_peer_address(text: str, field: str) -> tuple[IPAddr, int]:
    """`A.B.C.D`, `A.B.C.D:PORT`, `[v6]:PORT` or a bare v6 address."""
    host, port = text, 179
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest:
            port = int(rest.removeprefix(":")) if rest.removeprefix(":").isdigit() else -1
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
        port = int(port_text) if port_text.isdigit() else -1
    try:
        address = ip_address(host)
    except ValueError:
        raise InvalidInput(field, f"{text!r} is not an IP address (optional :port)") from None
    if not 1 <= port <= 65535:
        raise InvalidInput(field, f"invalid port in {text!r}")
    return address, port


def parse_bgp_peer(res: Resource) -> BgpPeer:
    spec = dict(res.spec)
    where = f"BGPPeer/{res.name}"
    peer_ip: IPAddr | None = None
    port = 179
    if spec.get("peerIP"):
        peer_ip, port = parse_peer_address(spec["peerIP"], f"{where}.peerIP")
    peer_selector = (
        parse_selector_dict(spec["peerSelector"], f"{where}.peerSelector")
        if spec.get("peerSelector") is not None
        else None
    )
    if (peer_ip is None) == (peer_selector is None):
        raise InvalidInput(f"{where}.peerIP", "set exactly one of peerIP and peerSelector")
    if spec.get("node") and spec.get("nodeSelector") is not None:
        raise InvalidInput(f"{where}.nodeSelector", "set at most one of node and nodeSelector")
    if peer_ip is not None and spec.get("asNumber") is None:
        raise InvalidInput(f"{where}.asNumber", "required with peerIP")
    keepalive, hold = _timers(spec, where)
    password = spec.get("password")
    source = spec.get("sourceAddress")
    try:
        source_address = ip_address(source) if source else None
    except ValueError:
        raise InvalidInput(f"{where}.sourceAddress", f"{source!r} is not an IP address") from None
    try:
        next_hop_mode = NextHopMode(spec.get("nextHopMode") or "Auto")
    except ValueError:
        raise InvalidInput(f"{where}.nextHopMode", "must be Auto, Self or Keep") from None
    return BgpPeer(
        name=res.name,
        peer_ip=peer_ip,
        peer_port=port,
        as_number=_int(spec, "asNumber", 1, 4294967295, where),
        node=spec.get("node") or None,
        node_selector=(
            parse_selector_dict(spec["nodeSelector"], f"{where}.nodeSelector")
            if spec.get("nodeSelector") is not None
            else None
        ),
        peer_selector=peer_selector,
        password=(
            PasswordRef(
                (password.get("secretKeyRef") or {}).get("name"),
                (password.get("secretKeyRef") or {}).get("key"),
                password.get("file"),
            )
            if password
            else None
        ),
        max_prefixes=_int(spec, "maxPrefixes", 0, 1 << 31, where),
        keepalive_time=keepalive,
        hold_time=hold,
        max_restart_time=_int(spec, "maxRestartTime", 0, 4095, where),
        next_hop_mode=next_hop_mode,
        source_address=source_address,
    )


def router_id_of(address: IPAddr) -> IPv4Address:
    if not isinstance(address, IPv4Address):
        raise InvalidInput("ipv4Address", "a node needs an IPv4 address to serve as its router id")
    return address
