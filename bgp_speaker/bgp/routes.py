"""Value types the BGP parts exchange: desired sessions, speaker events, kernel routes.

Prefixes and addresses here are stdlib `ipaddress` values: they are hashed and compared on
the route hot path (20k prefixes), where `ipaddress` is several times cheaper than netaddr.
IPAM's netaddr networks are converted once, where blocks become exports.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

IPAddr = IPv4Address | IPv6Address
IPNet = IPv4Network | IPv6Network

# rtnetlink protocol numbers that mark routes as ours (see /etc/iproute2/rt_protos: unused).
# Pod host routes (CNI dataplane, 76) and BGP-learned/blackhole routes (FIB, 77) are kept
# apart so the FIB's reconcile can never remove a pod's route and vice versa.
PROTO_WORKLOAD = 76
PROTO_BGP = 77


def within(prefix: IPNet, net: IPNet) -> bool:
    """`prefix.subnet_of(net)` for any two prefixes (False across families), in integer
    arithmetic: the route hot path asks this of every received prefix, and `subnet_of`
    builds addresses and checks types on each call."""
    return (
        prefix.version == net.version
        and prefix.prefixlen >= net.prefixlen
        and int(prefix.network_address) & int(net.netmask) == int(net.network_address)
    )


class PeerType(StrEnum):
    MESH = "mesh"
    GLOBAL = "global"  # BGPPeer selecting every node
    NODE = "node"  # BGPPeer for specific nodes
    RR_CLIENT = "rr-client"  # we reflect to this peer
    RR = "rr"  # this peer reflects for us


@dataclass(frozen=True)
class SessionSpec:
    """One BGP session this node wants, fully resolved."""

    peer_ip: IPAddr
    peer_as: int
    local_as: int
    local_address: IPAddr
    router_id: IPv4Address
    peer_type: PeerType
    peer_port: int = 179
    passive: bool = False
    hold_time: int = 90
    keepalive_time: int | None = None  # None: hold_time / 3
    md5_password: str | None = None
    graceful_restart_time: int | None = 120  # None: capability not advertised
    max_restart_time: int | None = None  # BGPPeer.maxRestartTime: caps the peer's restart time
    max_prefixes: int | None = None
    rr_client: bool = False  # we are its reflector (RFC 4456 client)
    name: str = ""  # the BGPPeer (or "mesh") this session comes from

    @property
    def ebgp(self) -> bool:
        return self.peer_as != self.local_as


@dataclass(frozen=True)
class PathAttributes:
    next_hop: IPAddr
    as_path: tuple[int, ...] = ()
    origin: str = "igp"
    local_pref: int | None = None
    med: int | None = None
    originator_id: IPv4Address | None = None
    cluster_list: tuple[IPv4Address, ...] = ()
    communities: tuple[str, ...] = ()


# --- events coming from the BGP speaker -------------------------------------------------------


class SessionState(StrEnum):
    CONNECTED = "connected"
    UP = "up"
    DOWN = "down"


@dataclass(frozen=True)
class PeerStateChanged:
    peer: IPAddr
    state: SessionState
    reason: str = ""


@dataclass(frozen=True)
class RoutesAnnounced:
    peer: IPAddr
    prefixes: tuple[IPNet, ...]
    attributes: PathAttributes


@dataclass(frozen=True)
class RoutesWithdrawn:
    peer: IPAddr
    prefixes: tuple[IPNet, ...]


@dataclass(frozen=True)
class EndOfRib:
    peer: IPAddr


@dataclass(frozen=True)
class PeerOpened:
    """The peer's OPEN arrived: its BGP identifier (route reflection needs it as the
    ORIGINATOR_ID of the routes it taught us)."""

    peer: IPAddr
    router_id: IPv4Address
    graceful_restart_time: int | None = None
    """The restart time of the peer's graceful-restart capability; None: it has none."""
    hold_time: int | None = None
    """The hold time the peer proposed (the session uses the smaller of ours and its)."""


@dataclass(frozen=True)
class PeerAlive:
    """A KEEPALIVE from the peer: it is there (the agent's own hold timer, see graceful)."""

    peer: IPAddr


@dataclass(frozen=True)
class SpeakerRestarted:
    """The BGP daemon died and was started again: every session is new."""

    reason: str = ""


PeerEvent = PeerStateChanged | RoutesAnnounced | RoutesWithdrawn | EndOfRib | PeerOpened | PeerAlive
"""What one session reported: every one names its ``peer``."""

SpeakerEvent = PeerEvent | SpeakerRestarted


# --- kernel routes --------------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class NextHop:
    gateway: IPAddr | None
    device: str | None = None  # interface name; None: the kernel resolves via the gateway
    onlink: bool = False  # gateway need not be on a connected subnet (tunnels)


@dataclass(frozen=True)
class KernelRoute:
    """A route the FIB owns: unicast via one or more next hops (ECMP), or a blackhole."""

    prefix: IPNet
    nexthops: tuple[NextHop, ...] = ()  # sorted, so equal sets compare equal
    blackhole: bool = False
