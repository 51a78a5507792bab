"""Tunnel devices of one node (adapter): ``tunl0``, ``vxlan.l3f``, their VTEP entries, and
the kernel routes that go through them.

``Tunnels.reconcile(policy)`` levels the devices to what the pools ask for (``encap``):

- IP-in-IP wanted: ``tunl0`` exists (the kernel's catch-all IPIP device; created if the
  namespace has none), is up, has MTU = underlay MTU - 20 and exactly one address: the
  node's tunnel address, allocated once from an IPIP pool under the handle
  ``ipip-tunnel-addr-<node>`` with allocation type Tunnel (so GC keeps it while the node
  exists). Not wanted: its addresses go, it is set down, the tunnel address is released.
  A kernel without IP-in-IP (creating the device says "not supported") makes the mode
  *unavailable*: reported in the status and logged, and the routes that would need it are
  refused by the routing controller instead of being installed broken.
- VXLAN wanted: ``vxlan.l3f`` with the configured VNI and UDP port, local address = the node
  IP, learning off, MAC derived from the node IP (``encap.vtep_mac``), MTU = underlay - 50,
  up. A device whose settings differ is replaced. Not wanted: deleted.

``Tunnels.set_vteps(ips)`` levels the VXLAN device's permanent neighbour entries
(``<peer IP> lladdr <derived MAC>``) and FDB entries (``<derived MAC> dst <peer IP>``) to the
peers that routes use. ``EncapFib`` calls it around every FIB change, so an entry is there
before the first route that needs it and goes after the last one.

The underlay is the interface that holds the node's IPv4 address; its MTU is what the tunnel
and pod MTUs are derived from (``encap.tunnel_mtu``/``pod_mtu``).

Errors: ``TunnelError`` (transient: a netlink call or the store failed; the next reconcile
tries again). Everything runs in the node's network namespace through one short-lived
pyroute2 socket per call, from the calling thread (blocking: call it via ``to_thread``).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address, IPv4Interface
from typing import Any

from netaddr import IPNetwork
from pyroute2 import IPRoute, NetlinkError
from pyroute2.netlink.rtnl.ifinfmsg import IFF_LOOPBACK

from bgp_speaker.bgp.routes import IPNet, KernelRoute
from bgp_speaker.kernel.fib import ManagedFib
from bgp_speaker.kernel.netns import NetnsUnavailable, netns_path, open_netns, run_in_netns
from bgp_speaker.overlay.encap import (
    IPIP_DEVICE,
    VXLAN_DEVICE,
    Encap,
    EncapPolicy,
    PoolEncap,
    ipip_tunnel_handle,
    tunnel_mtu,
    vtep_mac,
    vteps_of,
)
from ipam_blocks import block as blockmath
from ipam_blocks.allocator import IPAM, AssignRequest
from ipam_blocks.errors import L3FabricError, NotFound
from ipam_blocks.model import AllocationType, handle_name, parse_handle

__all__ = ["EncapFib", "TunnelError", "TunnelStatus", "Tunnels"]

log = logging.getLogger("l3fabric.agent.tunnels")

DEFAULT_UNDERLAY_MTU = 1500
RT_TABLE_MAIN = 254
TUNNEL_ADDRESS_RECHECK = 300.0  # seconds between store reads of an unchanged tunnel address
NUD_PERMANENT = 0x80
NTF_SELF = 0x02
_DEVICES = {Encap.IPIP: IPIP_DEVICE, Encap.VXLAN: VXLAN_DEVICE}
_UNSUPPORTED = (errno.EOPNOTSUPP, errno.ENOTSUP, errno.EAFNOSUPPORT, errno.ENOENT)


class TunnelError(L3FabricError):
    """A tunnel device, address or VTEP entry could not be set up (retried later)."""


@dataclass(frozen=True)
class TunnelStatus:
    """What the node can encapsulate with, as of the last reconcile."""

    available: frozenset[Encap] = frozenset()
    """Encapsulations whose device is up and ready: routes may use them."""
    unavailable: Mapping[str, str] = field(default_factory=dict)
    """Wanted encapsulations this node cannot provide, with the reason."""
    underlay_mtu: int | None = None
    underlay_source: str = ""
    """Which device the underlay MTU was read from, and why that one."""
    devices: Mapping[str, int] = field(default_factory=dict)
    """Our tunnel devices that exist, with their MTU."""
    ipip_address: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "available": sorted(str(e) for e in self.available),
            "unavailable": dict(self.unavailable),
            "underlay_mtu": self.underlay_mtu,
            "underlay_source": self.underlay_source,
            "devices": dict(self.devices),
            "ipip_address": self.ipip_address,
        }


class Tunnels:
    """The tunnel devices of one network namespace (None: the agent's own)."""

    def __init__(self, node: str, netns: str | None = None, ipam: IPAM | None = None) -> None:
        self.node = node
        self.netns = None if netns is None else netns_path(netns)
        self.ipam = ipam
        self.status = TunnelStatus()
        self._vteps: frozenset[IPv4Address] = frozenset()  # wanted
        self._vteps_programmed: frozenset[IPv4Address] | None = None  # None: not known
        self._tunnel_released = False
        self._tunnel: tuple[IPv4Address, tuple[PoolEncap, ...], float] | None = None
        self._reported: dict[str, str] = {}
        self.generation = 0
        """Bumped whenever one of our devices is created or deleted (its index changes)."""

    # --- devices ------------------------------------------------------------------------------

    def reconcile(self, policy: EncapPolicy) -> TunnelStatus:
        """Level the devices to ``policy``; the new status. Raises TunnelError."""
        status = self._in_netns(lambda: self._reconcile_links(policy))
        self._report(status, policy)
        self.status = status
        if Encap.VXLAN in status.available:
            # A device made just now has no entries yet: level them again.
            self._vteps_programmed = None
            self.set_vteps(self._vteps)
        if Encap.IPIP in status.available:
            # Allocated only once the device works: a refused mode holds no address.
            address = self._tunnel_address(policy)
            if address is not None:
                self._in_netns(lambda: _set_tunnel_address(address))
            self.status = replace(status, ipip_address=None if address is None else str(address))
        elif Encap.IPIP not in policy.wanted:
            self._release_tunnel_address()
        return self.status

    @property
    def vteps(self) -> frozenset[IPv4Address]:
        """The VTEPs whose neighbour and FDB entries are programmed."""
        return self._vteps_programmed or frozenset()

    def _reconcile_links(self, policy: EncapPolicy) -> TunnelStatus:
        node = policy.node_address
        with IPRoute() as ipr:
            before = _indexes(ipr)
            underlay = _underlay(ipr, node)
            mtu = underlay[0] if underlay else DEFAULT_UNDERLAY_MTU
            available: set[Encap] = set()
            unavailable: dict[str, str] = {}
            devices: dict[str, int] = {}
            if Encap.IPIP in policy.wanted:
                reason = _ensure_ipip(ipr, tunnel_mtu(mtu, Encap.IPIP))
                if reason:
                    unavailable[str(Encap.IPIP)] = reason
                else:
                    available.add(Encap.IPIP)
            else:
                _retire_ipip(ipr)
            if Encap.VXLAN in policy.wanted:
                reason = (
                    "the node has no IPv4 address" if node is None
                    else _ensure_vxlan(ipr, policy, node, tunnel_mtu(mtu, Encap.VXLAN))
                )  # fmt: skip
                if reason:
                    unavailable[str(Encap.VXLAN)] = reason
                else:
                    available.add(Encap.VXLAN)
            else:
                _delete_link(ipr, VXLAN_DEVICE)
            for kind in available:
                link = _link(ipr, _DEVICES[kind])
                if link is not None:
                    devices[_DEVICES[kind]] = link.get_attr("IFLA_MTU")
            if _indexes(ipr) != before:
                self.generation += 1
        return TunnelStatus(
            available=frozenset(available),
            unavailable=unavailable,
            underlay_mtu=underlay[0] if underlay else None,
            underlay_source=underlay[1] if underlay else "",
            devices=devices,
            ipip_address=self.status.ipip_address if Encap.IPIP in available else None,
        )

    def _report(self, status: TunnelStatus, policy: EncapPolicy) -> None:
        """Log a mode becoming unavailable (or available again) once, not every reconcile."""
        for kind, reason in status.unavailable.items():
            if self._reported.get(kind) != reason:
                log.error(
                    "encapsulation unavailable: routes that need it are refused",
                    extra={"op": "tunnels", "node": self.node, "encap": kind, "reason": reason},
                )
        for kind in set(self._reported) - set(status.unavailable):
            if Encap(kind) in status.available:
                log.info("encapsulation available", extra={"op": "tunnels", "encap": kind})
        self._reported = dict(status.unavailable)

    # --- the IPIP tunnel address ------------------------------------------------------------------

    def _tunnel_address(self, policy: EncapPolicy) -> IPv4Address | None:
        """The node's tunl0 address: the one its handle holds in an IPIP pool, else a new one."""
        if self.ipam is None:
            return None
        pools = policy.ipip_pools
        cached = self._tunnel
        if (
            cached is not None and cached[1] == pools
            and time.monotonic() - cached[2] < TUNNEL_ADDRESS_RECHECK
        ):  # fmt: skip
            return cached[0]
        address = self._claim_tunnel_address(pools)
        self._tunnel = None if address is None else (address, pools, time.monotonic())
        return address

    def _claim_tunnel_address(self, pools: tuple[PoolEncap, ...]) -> IPv4Address | None:
        assert self.ipam is not None
        handle = ipip_tunnel_handle(self.node)
        try:
            held = _held_by(self.ipam, handle)
            good = [ip for ip in held if any(ip in pool.cidr for pool in pools)]
            if held and not good:  # the pool lost its IPIP mode or went away: move
                self.ipam.release_handle(handle)
            if good:
                self._tunnel_released = False
                return good[0]
            names = tuple(pool.name for pool in pools if pool.name)
            if not names:
                return None
            ips = self.ipam.auto_assign(
                AssignRequest(self.node, handle, 1, 4, type=AllocationType.TUNNEL, pools=names)
            )
        except L3FabricError as err:
            raise TunnelError(f"tunnel address for {self.node}: {err}") from err
        self._tunnel_released = False
        log.info("tunnel address allocated", extra={"op": "tunnels", "node": self.node,
                                                    "ip": str(ips[0])})  # fmt: skip
        return IPv4Address(str(ips[0]))

    def _release_tunnel_address(self) -> None:
        if self.ipam is None or self._tunnel_released:
            return
        try:
            released = self.ipam.release_handle(ipip_tunnel_handle(self.node))
        except L3FabricError as err:
            raise TunnelError(f"releasing the tunnel address of {self.node}: {err}") from err
        self._tunnel_released = True
        self._tunnel = None
        if released:
            log.info("tunnel address released", extra={"op": "tunnels", "node": self.node,
                                                       "ip": str(released[0])})  # fmt: skip

    # --- VXLAN neighbour and FDB entries ----------------------------------------------------------

    def set_vteps(self, vteps: Iterable[IPv4Address]) -> None:
        """Level the VXLAN device's neighbour + FDB entries to ``vteps`` (a no-op while the set
        is what was programmed last). Raises TunnelError."""
        wanted = frozenset(vteps)
        self._vteps = wanted
        if wanted == self._vteps_programmed:
            return
        if Encap.VXLAN not in self.status.available:
            return  # no device (yet): reconcile programs them once there is one
        self._in_netns(lambda: _level_vteps(wanted))
        self._vteps_programmed = wanted

    # --- plumbing ---------------------------------------------------------------------------------

    def _in_netns(self, fn: Any) -> Any:
        try:
            if self.netns is None:
                return fn()
            with open_netns(self.netns) as fd:
                return run_in_netns(fd, fn)
        except NetlinkError as err:
            raise TunnelError(f"netlink: {err}") from err
        except (NetnsUnavailable, OSError) as err:
            raise TunnelError(str(err)) from err


# --- netlink helpers (run inside the namespace) -------------------------------------------------


def _link(ipr: IPRoute, name: str) -> Any:
    found = ipr.link_lookup(ifname=name)
    if not found:
        return None
    return ipr.get_links(found[0])[0]


def _indexes(ipr: IPRoute) -> dict[str, int]:
    return {name: found[0] for name in _DEVICES.values() if (found := ipr.link_lookup(ifname=name))}


def _kind(link: Any) -> str | None:
    info = link.get_attr("IFLA_LINKINFO")
    return None if info is None else info.get_attr("IFLA_INFO_KIND")


def _underlay(ipr: IPRoute, node: IPv4Interface | None) -> tuple[int, str] | None:
    """(MTU, which device and why) of the device that carries traffic to the peers: the one
    holding the node's address, unless that is a loopback (a node address on ``lo``, reached
    through the uplink), then the device of the default route; None when neither says."""
    if node is None:
        return None
    for addr in ipr.get_addr(family=socket.AF_INET):
        if addr.get_attr("IFA_ADDRESS") == str(node.ip):
            link = ipr.get_links(addr["index"])[0]
            if not link["flags"] & IFF_LOOPBACK:
                name = link.get_attr("IFLA_IFNAME")
                return link.get_attr("IFLA_MTU"), f"{name}, the node address's device"
    for route in ipr.get_default_routes(family=socket.AF_INET, table=RT_TABLE_MAIN):
        hops = route.get_attr("RTA_MULTIPATH") or [route]
        oifs = [h.get_attr("RTA_OIF") if h is route else h["oif"] for h in hops]
        links = [ipr.get_links(oif)[0] for oif in oifs if oif]
        if links:
            link = min(links, key=lambda each: each.get_attr("IFLA_MTU"))
            name = link.get_attr("IFLA_IFNAME")
            return link.get_attr("IFLA_MTU"), f"{name}, the default route's device"
    return None


def _ensure_ipip(ipr: IPRoute, mtu: int) -> str:
    """tunl0 up with ``mtu``; "" when done, else why IPIP is unavailable."""
    link = _link(ipr, IPIP_DEVICE)
    if link is None:
        try:
            ipr.link("add", ifname=IPIP_DEVICE, kind="ipip")
        except NetlinkError as err:
            if err.code == errno.EEXIST:  # the module loaded just now and made its own
                pass
            elif err.code in _UNSUPPORTED:
                return f"this kernel has no IP-in-IP support (creating {IPIP_DEVICE}: {err})"
            else:
                raise
        link = _link(ipr, IPIP_DEVICE)
        if link is None:
            return f"{IPIP_DEVICE} does not exist and cannot be created"
    if _kind(link) != "ipip":
        return f"{IPIP_DEVICE} exists but is a {_kind(link)} device, not ipip"
    _set_mtu_and_up(ipr, link, mtu)
    return ""


def _set_tunnel_address(address: IPv4Address) -> None:
    with IPRoute() as ipr:
        link = _link(ipr, IPIP_DEVICE)
        if link is not None:
            _level_addresses(ipr, link["index"], [address])


def _retire_ipip(ipr: IPRoute) -> None:
    link = _link(ipr, IPIP_DEVICE)
    if link is None or _kind(link) != "ipip":
        return
    _level_addresses(ipr, link["index"], [])
    if link["flags"] & 1:
        ipr.link("set", index=link["index"], state="down")


def _level_addresses(ipr: IPRoute, index: int, wanted: list[IPv4Address]) -> None:
    have = {
        (a.get_attr("IFA_ADDRESS"), a["prefixlen"]) for a in ipr.get_addr(family=2, index=index)
    }
    want = {(str(a), 32) for a in wanted}
    for address, prefixlen in have - want:
        with contextlib.suppress(NetlinkError):
            ipr.addr("del", index=index, address=address, prefixlen=prefixlen)
    for address, prefixlen in want - have:
        ipr.addr("add", index=index, address=address, prefixlen=prefixlen)


def _vxlan_matches(link: Any, policy: EncapPolicy, node: IPv4Interface) -> bool:
    if _kind(link) != "vxlan":
        return False
    data = link.get_attr("IFLA_LINKINFO").get_attr("IFLA_INFO_DATA")
    return (
        data.get_attr("IFLA_VXLAN_ID") == policy.vxlan.vni
        and data.get_attr("IFLA_VXLAN_PORT") == policy.vxlan.port
        and data.get_attr("IFLA_VXLAN_LOCAL") == str(node.ip)
        and data.get_attr("IFLA_VXLAN_LEARNING") == 0
        and link.get_attr("IFLA_ADDRESS") == vtep_mac(node.ip)
    )


def _ensure_vxlan(ipr: IPRoute, policy: EncapPolicy, node: IPv4Interface, mtu: int) -> str:
    link = _link(ipr, VXLAN_DEVICE)
    if link is not None and not _vxlan_matches(link, policy, node):
        log.info("replacing vxlan device", extra={"op": "tunnels", "reason": "settings changed"})
        ipr.link("del", index=link["index"])
        link = None
    if link is None:
        try:
            ipr.link(
                "add", ifname=VXLAN_DEVICE, kind="vxlan", vxlan_id=policy.vxlan.vni,
                vxlan_port=policy.vxlan.port, vxlan_local=str(node.ip), vxlan_learning=0,
                address=vtep_mac(node.ip), mtu=mtu,
            )  # fmt: skip
        except NetlinkError as err:
            if err.code in _UNSUPPORTED:
                return f"this kernel has no VXLAN support (creating {VXLAN_DEVICE}: {err})"
            raise
        link = _link(ipr, VXLAN_DEVICE)
    _set_mtu_and_up(ipr, link, mtu)
    return ""


def _delete_link(ipr: IPRoute, name: str) -> None:
    link = _link(ipr, name)
    if link is not None:
        with contextlib.suppress(NetlinkError):
            ipr.link("del", index=link["index"])
        log.info("tunnel device removed", extra={"op": "tunnels", "device": name})


def _level_vteps(wanted: frozenset[IPv4Address]) -> None:
    with IPRoute() as ipr:
        link = _link(ipr, VXLAN_DEVICE)
        if link is None:
            return
        index = link["index"]
        neighbours = {
            (n.get_attr("NDA_DST"), n.get_attr("NDA_LLADDR"))
            for n in ipr.get_neighbours(ifindex=index)
            if n["ifindex"] == index
        }
        fdb = {
            (n.get_attr("NDA_DST"), n.get_attr("NDA_LLADDR"))
            for n in ipr.fdb("dump", ifindex=index)
            if n["ifindex"] == index and n.get_attr("NDA_DST")
        }
        want = {(str(ip), vtep_mac(ip)) for ip in wanted}
        for dst, mac in neighbours - want:
            with contextlib.suppress(NetlinkError):
                ipr.neigh("del", ifindex=index, dst=dst, lladdr=mac)
        for dst, mac in fdb - want:
            with contextlib.suppress(NetlinkError):
                ipr.fdb("del", ifindex=index, lladdr=mac, dst=dst, flags=NTF_SELF)
        for dst, mac in want - neighbours:
            ipr.neigh("replace", ifindex=index, dst=dst, lladdr=mac, state=NUD_PERMANENT)
        for dst, mac in want - fdb:
            ipr.fdb("append", ifindex=index, lladdr=mac, dst=dst, flags=NTF_SELF,
                    state=NUD_PERMANENT)  # fmt: skip


def _held_by(ipam: IPAM, handle: str) -> list[IPv4Address]:
    """The addresses ``handle`` holds, read from its blocks."""
    try:
        res = ipam.store.get("IPAMHandle", handle_name(handle))
    except NotFound:
        return []
    held: list[IPv4Address] = []
    for cidr in parse_handle(res).blocks:
        try:
            blk = ipam.read_block(IPNetwork(cidr))
        except NotFound:
            continue
        held += [
            IPv4Address(str(ip))
            for ip, attr, _seq in blockmath.allocated(blk)
            if attr.handle_id.lower() == handle.lower() and ip.version == 4
        ]
    return held


# --- the FIB, with VTEP entries kept in step -----------------------------------------------------


class EncapFib:
    """A FIB (``bgp_speaker.kernel.fib.Fib``) whose VXLAN routes always find their VTEP entries:
    entries for the routes about to be installed are added first, entries no installed route
    uses any more are removed after. A ``KernelFib`` for the routing controller (closing it
    closes the FIB it wraps); the VTEPs in use are counted per route, so a change costs what
    its batch holds, not the whole table."""

    def __init__(self, fib: ManagedFib, tunnels: Tunnels) -> None:
        self.fib = fib
        self.tunnels = tunnels
        self._vteps_of: dict[IPNet, frozenset[IPv4Address]] = {}  # routes that use VXLAN
        self._users: Counter[IPv4Address] = Counter()
        self._generation = tunnels.generation

    def dump(self) -> dict[IPNet, KernelRoute]:
        """The FIB's routes; their VTEPs become the wanted entries (an agent that starts
        adopts the routes it finds, and must not take their entries away)."""
        routes = self.fib.dump()
        self._vteps_of, self._users = {}, Counter()
        self._record(routes.values(), ())
        self._level(self._in_use())
        return routes

    def apply(self, add_or_replace: Iterable[KernelRoute], remove: Iterable[IPNet]) -> None:
        adds = list(add_or_replace)
        removes = list(remove)
        self._devices_checked()
        self._level(self._in_use() | vteps_of(adds))
        try:
            self.fib.apply(adds, removes)
        finally:
            # What failed is uncertain: kept as asked until the next change settles it.
            self._record(adds, removes)
            self._level(self._in_use())

    def reconcile(self, desired: Mapping[IPNet, KernelRoute]) -> tuple[int, int]:
        self._devices_checked()
        self._level(self._in_use() | vteps_of(desired.values()))
        try:
            return self.fib.reconcile(desired)
        finally:
            self._vteps_of, self._users = {}, Counter()
            self._record(desired.values(), ())
            self._level(self._in_use())

    def close(self) -> None:
        self.fib.close()

    def _devices_checked(self) -> None:
        if self.tunnels.generation != self._generation:
            self._generation = self.tunnels.generation
            self.fib.links_changed()

    def _record(self, adds: Iterable[KernelRoute], removes: Iterable[IPNet]) -> None:
        for prefix in removes:
            self._users.subtract(self._vteps_of.pop(prefix, ()))
        for route in adds:
            self._users.subtract(self._vteps_of.pop(route.prefix, ()))
            used = vteps_of((route,))
            if used:
                self._vteps_of[route.prefix] = used
                self._users.update(used)

    def _in_use(self) -> frozenset[IPv4Address]:
        return frozenset(vtep for vtep, n in self._users.items() if n > 0)

    def _level(self, vteps: Iterable[IPv4Address]) -> None:
        try:
            self.tunnels.set_vteps(vteps)
        except TunnelError as err:
            log.warning("vtep entries not levelled", extra={"op": "tunnels", "reason": str(err)})


def _set_mtu_and_up(ipr: Any, link: Any, mtu: int) -> None:
    if link.get_attr("IFLA_MTU") != mtu:
        ipr.link("set", index=link["index"], mtu=mtu)
    if not link["flags"] & 1:  # IFF_UP
        ipr.link("set", index=link["index"], state="up")
