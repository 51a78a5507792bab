"""Pod dataplane: the veth pair, addresses, routes and proxy ARP of one pod (Calico style).

What one IPv4 pod looks like when attached::

    pod netns                                  host netns
    eth0  10.1.0.5/32  <-------- veth -------> l3f<12 hex>  ee:ee:ee:ee:ee:ee
          169.254.1.1 dev eth0 scope link                   proxy_arp=1, proxy_delay=0
          default via 169.254.1.1 dev eth0                  10.1.0.5 dev l3f.. scope link proto 76
          neigh 169.254.1.1 ee:ee:ee:ee:ee:ee PERMANENT

169.254.1.1 is configured nowhere. The pod holds a permanent neighbour entry for it, the host
veth's fixed MAC, so it never has to ARP for its gateway: the gateway works whatever the
host's routing table holds (proxy ARP alone answers only for a target the host routes out of
another interface, so a node without a default route would cut its pods off). Proxy ARP stays
on, with ``proxy_delay=0``, for pods attached before the neighbour entry existed. The host
forwards (``enable_host_forwarding``).

IPv6 addresses get ``/128`` (no DAD: the address is ours alone) and a default route via
``GATEWAY_V6``, the EUI-64 link-local address the host veth derives from its fixed MAC —
Calico's scheme; the host answers neighbour solicitations for its own link-local address,
so no proxy NDP is needed. The host veth keeps IPv6 only when the pod has an IPv6 address
(with DAD and router advertisements off); otherwise IPv6 is disabled on it.

Every function takes ``host_netns`` (keyword, default None = the calling thread's network
namespace). The agent leaves it None; tests pass a namespace of their own so the real host
is never touched. How namespaces are entered without forking: see ``bgp_speaker.kernel.netns``.

Errors (what the caller should do)::

    L3FabricError
    └── DataplaneError          a step failed; the message names the step and interface.
        │                       attach_pod has removed everything it created.
        ├── NetnsNotFound       the pod's netns is gone: ADD fails, DEL/CHECK treat as gone
        └── InvalidAttachment   (also InvalidInput) bad argument; report, never retry

Calls are thread-safe. Calls for the same host interface are serialised by a striped lock;
different pods proceed in parallel.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from netaddr import AddrFormatError, IPAddress, IPNetwork
from pyroute2 import IPRoute, NetlinkError
from pyroute2.netlink.rtnl.ndmsg import NUD_PERMANENT

from bgp_speaker.bgp.routes import PROTO_WORKLOAD
from bgp_speaker.kernel.netns import NetnsUnavailable, open_netns, run_in_netns
from ipam_blocks.errors import InvalidInput, L3FabricError

__all__ = [
    "GATEWAY",
    "GATEWAY_V6",
    "HOST_VETH_MAC",
    "HOST_VETH_PREFIX",
    "ROUTE_PROTOCOL",
    "DataplaneError",
    "InvalidAttachment",
    "NetnsNotFound",
    "PodAttachment",
    "attach_pod",
    "detach_pod",
    "enable_host_forwarding",
    "host_veth_name",
    "inspect_pod",
    "list_host_routes",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

HOST_VETH_PREFIX = "l3f"
GATEWAY = IPAddress("169.254.1.1")
HOST_VETH_MAC = "ee:ee:ee:ee:ee:ee"
# EUI-64 link-local of HOST_VETH_MAC (U/L bit of 0xee flipped -> 0xec, ff:fe in the middle).
GATEWAY_V6 = IPAddress("fe80::ecee:eeff:feee:eeee")
# rtnetlink protocol of our host /32 routes (76, 'L': unused by the kernel headers, iproute2,
# FRR and BIRD). Lets GC and `ip route show proto 76` tell pod routes from BGP-learned ones.
ROUTE_PROTOCOL = PROTO_WORKLOAD

IFNAMSIZ = 16  # kernel limit including the NUL: names are at most 15 characters
IFF_UP = 0x1
RT_SCOPE_UNIVERSE = 0
RT_SCOPE_LINK = 253
RT_TABLE_MAIN = 254
# Pod routes carry what `ip route add` uses, so `ip route` inside the pod prints them bare.
RTPROT_BOOT = 3
IFA_F_NODAD = 0x02
RTM_F_FIB_MATCH = 0x2000  # RTM_GETROUTE: return the matching FIB entry, not a lookup result
_IFNAME = re.compile(r"[^/:\s]{1,15}")
_LOCK_STRIPES = 64


class DataplaneError(L3FabricError):
    """A dataplane step failed; the message says which step on which interface."""


class NetnsNotFound(DataplaneError):
    """The given network namespace path does not exist or is not a network namespace."""


class InvalidAttachment(DataplaneError, InvalidInput):
    """An argument can never work (interface name, MTU, address); `field` names it."""


@dataclass(frozen=True)
class PodAttachment:
    host_ifname: str
    container_ifname: str
    netns: str  # path, e.g. /var/run/netns/x or /proc/PID/ns/net
    container_mac: str  # pod-side MAC, lower case (the CNI result reports it)
    addresses: tuple[IPNetwork, ...]  # each /32 or /128, in the order given
    mtu: int


def host_veth_name(namespace: str, pod: str) -> str:
    """``l3f`` + 12 hex digits of sha1("namespace.pod"): 15 characters, stable across runs."""
    digest = hashlib.sha1(f"{namespace}.{pod}".encode()).hexdigest()
    return HOST_VETH_PREFIX + digest[: IFNAMSIZ - 1 - len(HOST_VETH_PREFIX)]


# --------------------------------------------------------------------------- public API


def attach_pod(
    netns: str,
    container_ifname: str,
    host_ifname: str,
    addresses: Sequence[IPAddress],
    mtu: int,
    *,
    host_netns: str | None = None,
) -> PodAttachment:
    """Create (or confirm) the pod's veth pair, addresses and routes; return what was built.

    A correct existing setup is returned as is; a stale host veth of the same name is
    replaced. On failure everything this call created is removed before DataplaneError.
    """
    nets = _normalise_addresses(addresses)
    _validate_ifname("container_ifname", container_ifname)
    _validate_ifname("host_ifname", host_ifname)
    _validate_mtu(mtu, nets)
    wanted = PodAttachment(host_ifname, container_ifname, netns, "", nets, mtu)
    with _lock_for(host_ifname), _pod_netns(netns) as pod_fd, _host_ns(host_netns) as host_fd:
        _refuse_the_host_netns(netns, pod_fd, host_fd)
        return run_in_netns(host_fd, lambda: _attach_in_host(wanted, pod_fd))


def detach_pod(
    host_ifname: str,
    netns: str | None,
    container_ifname: str,
    *,
    host_netns: str | None = None,
) -> None:
    """Remove the pod's veth pair (and with it its host routes). Missing pieces are fine."""
    with _lock_for(host_ifname), _host_ns(host_netns) as host_fd:
        removed = run_in_netns(host_fd, lambda: _delete_host_veth(host_ifname))
        if not removed and netns is not None:
            _delete_leftover_pod_veth(netns, container_ifname, host_fd)


def inspect_pod(att: PodAttachment, *, host_netns: str | None = None) -> list[str]:
    """Problems with an attachment, human readable; an empty list means all is well."""
    with _host_ns(host_netns) as host_fd:
        host = run_in_netns(host_fd, lambda: _observe_host_in_host(att))
    try:
        with open_netns(att.netns) as pod_fd:
            pod = run_in_netns(pod_fd, lambda: _observe_pod(att.container_ifname, att.addresses))
    except NetnsUnavailable as err:
        return [f"pod network namespace {att.netns}: {err.reason}", *_host_problems(att, host)]
    return _problems(att, host, pod)


def list_host_routes(*, host_netns: str | None = None) -> dict[IPNetwork, str]:
    """Our pod routes (protocol ROUTE_PROTOCOL, main table) -> host interface name."""
    with _host_ns(host_netns) as host_fd:
        return run_in_netns(host_fd, _list_host_routes_here)


def enable_host_forwarding(*, host_netns: str | None = None) -> None:
    """net.ipv4.ip_forward=1 and net.ipv6.conf.all.forwarding=1 (when IPv6 exists).

    Forwarding is what lets the host proxy-ARP for the pods' gateway at all. Note that IPv6
    forwarding makes the kernel ignore router advertisements on interfaces with
    accept_ra=1 (a node that gets its IPv6 default route by SLAAC needs accept_ra=2).
    """
    with _host_ns(host_netns) as host_fd:
        run_in_netns(host_fd, _enable_forwarding_here)


# ----------------------------------------------------------------- input normalisation


def _normalise_addresses(addresses: Sequence[IPAddress]) -> tuple[IPNetwork, ...]:
    nets: dict[IPNetwork, None] = {}  # ordered and de-duplicated
    for raw in addresses:
        try:
            ip = IPAddress(raw)
        except (AddrFormatError, TypeError, ValueError) as err:
            raise InvalidAttachment("addresses", f"{raw!r} is not an IP address") from err
        nets[IPNetwork(f"{ip}/{_host_bits(ip)}")] = None
    if not nets:
        raise InvalidAttachment("addresses", "at least one address is required")
    return tuple(nets)


def _host_bits(ip: IPAddress) -> int:
    return 32 if ip.version == 4 else 128


def _validate_ifname(field: str, name: str) -> None:
    # The kernel rejects these too, but only after the veth exists; say so up front.
    if not _IFNAME.fullmatch(name) or name in (".", ".."):
        raise InvalidAttachment(field, f"{name!r} is not a valid interface name (1-15 chars)")


def _validate_mtu(mtu: int, nets: tuple[IPNetwork, ...]) -> None:
    low = 1280 if any(n.version == 6 for n in nets) else 68  # IPv6 needs 1280 on the link
    if not low <= mtu <= 65535:
        raise InvalidAttachment("mtu", f"{mtu} is outside {low}..65535")


# ------------------------------------------------------------------- namespaces, locks

_locks = [threading.Lock() for _ in range(_LOCK_STRIPES)]


def _lock_for(host_ifname: str) -> threading.Lock:
    # Striped rather than one lock per name: bounded memory, and two pods sharing a stripe
    # only wait for each other's few milliseconds.
    digest = hashlib.sha1(host_ifname.encode()).digest()
    return _locks[digest[0] % _LOCK_STRIPES]


@contextmanager
def _pod_netns(path: str) -> Iterator[int]:
    try:
        with open_netns(path) as fd:
            yield fd
    except NetnsUnavailable as err:
        raise NetnsNotFound(str(err)) from err


def _is_host_side(pod_fd: int, host_fd: int | None) -> bool:
    """Whether a "pod" namespace is the host's or the agent's own (the same in production)."""
    pod = os.fstat(pod_fd)
    own = os.stat("/proc/thread-self/ns/net")
    host = os.fstat(host_fd) if host_fd is not None else own
    return any((pod.st_dev, pod.st_ino) == (ns.st_dev, ns.st_ino) for ns in (host, own))


def _refuse_the_host_netns(netns: str, pod_fd: int, host_fd: int | None) -> None:
    # The pod's end would land among the host's interfaces, its default route would replace
    # the host's: never "attach" the host to itself.
    if _is_host_side(pod_fd, host_fd):
        raise InvalidAttachment("CNI_NETNS", f"{netns} is the host's network namespace")


@contextmanager
def _host_ns(path: str | None) -> Iterator[int | None]:
    # A missing *host* namespace is a caller/setup error, not "pod gone": DataplaneError.
    if path is None:
        yield None
        return
    try:
        with open_netns(path) as fd:
            yield fd
    except NetnsUnavailable as err:
        raise DataplaneError(f"host {err}") from err


@contextmanager
def _step(what: str) -> Iterator[None]:
    """Translate netlink and OS errors of one step into DataplaneError naming the step."""
    try:
        yield
    except DataplaneError:
        raise
    except NetlinkError as err:
        raise DataplaneError(f"{what}: {os.strerror(err.code)} (errno {err.code})") from err
    except OSError as err:
        raise DataplaneError(f"{what}: {err.strerror or err}") from err


def _in_pod(pod_fd: int, what: str, fn: Callable[[], T]) -> T:
    with _step(what):
        return run_in_netns(pod_fd, fn)


# ------------------------------------------------------------------------------ attach


def _attach_in_host(wanted: PodAttachment, pod_fd: int) -> PodAttachment:
    with IPRoute() as ipr:
        with _step(f"check existing host veth {wanted.host_ifname}"):
            existing = _get_link(ipr, wanted.host_ifname)
        if existing is not None:
            att = _reuse_or_remove(ipr, wanted, pod_fd, existing)
            if att is not None:
                return att
        try:
            return _create(ipr, wanted, pod_fd)
        except BaseException:
            _remove_after_failure(ipr, wanted.host_ifname)
            raise


def _reuse_or_remove(
    ipr: IPRoute, wanted: PodAttachment, pod_fd: int, host_link: _Link
) -> PodAttachment | None:
    """The existing attachment if it is exactly right; otherwise delete it, return None."""
    if host_link.kind != "veth":
        # Never delete what we did not create; a name collision needs a human.
        raise DataplaneError(
            f"host interface {host_link.name} exists and is a {host_link.kind}, not a veth"
        )
    with _step(f"inspect existing host veth {host_link.name}"):
        host = _observe_host(ipr, wanted, host_link)
    pod = _in_pod(
        pod_fd,
        f"inspect {wanted.container_ifname} in {wanted.netns}",
        lambda: _observe_pod(wanted.container_ifname, wanted.addresses),
    )
    att = replace(wanted, container_mac=pod.link.mac if pod.link is not None else "")
    problems = _problems(att, host, pod)
    if not problems:
        return att
    # A pod re-created under the same name, or a half-broken setup: rebuild from scratch.
    log.info(
        "replacing stale host veth",
        extra={"op": "attach_pod", "ifname": host_link.name, "reason": problems},
    )
    with _step(f"delete stale host veth {host_link.name}"):
        _delete_link(ipr, host_link)
    return None


def _create(ipr: IPRoute, wanted: PodAttachment, pod_fd: int) -> PodAttachment:
    host, pod_if = wanted.host_ifname, wanted.container_ifname
    has_v6 = any(n.version == 6 for n in wanted.addresses)
    # One request creates both ends, the pod end directly inside the pod's namespace under
    # its final name: no temporary name, no move, no rename.
    with _step(f"create veth {host} <-> {pod_if} in {wanted.netns}"):
        try:
            ipr.link(
                "add",
                ifname=host,
                kind="veth",
                address=HOST_VETH_MAC,
                mtu=wanted.mtu,
                peer={"ifname": pod_if, "mtu": wanted.mtu, "net_ns_fd": pod_fd},
            )
        except NetlinkError as err:
            if err.code == errno.EEXIST:  # the host name was just checked to be free
                raise DataplaneError(
                    f"create veth {host}: interface {pod_if} already exists in {wanted.netns}"
                ) from err
            raise
    with _step(f"configure host veth {host}"):
        index = ipr.link_lookup(ifname=host)[0]
        _configure_host_sysctls(host, has_v6)  # before up: no IPv6 DAD/RA ever runs
        ipr.link("set", index=index, state="up")
    for net in wanted.addresses:
        _add_host_route(ipr, net, index, host)
    mac = _in_pod(
        pod_fd,
        f"configure {pod_if} in {wanted.netns}",
        lambda: _configure_pod_side(pod_if, wanted.addresses),
    )
    log.debug("pod attached", extra={"op": "attach_pod", "ifname": host, "netns": wanted.netns})
    return PodAttachment(host, pod_if, wanted.netns, mac, wanted.addresses, wanted.mtu)


def _configure_host_sysctls(ifname: str, has_v6: bool) -> None:
    # These paths resolve in the calling thread's namespace: we run in the host's.
    _write_sysctl(f"/proc/sys/net/ipv4/conf/{ifname}/proxy_arp", "1")
    _write_sysctl(f"/proc/sys/net/ipv4/neigh/{ifname}/proxy_delay", "0")
    v6 = f"/proc/sys/net/ipv6/conf/{ifname}"
    if not os.path.isdir(v6):
        return  # kernel without IPv6
    if has_v6:
        _write_sysctl(f"{v6}/accept_dad", "0")  # our gateway address must work at once
        _write_sysctl(f"{v6}/accept_ra", "0")  # never learn routes from a pod
    else:
        _write_sysctl(f"{v6}/disable_ipv6", "1")  # no link-local, no MLD/RS chatter


def _add_host_route(ipr: IPRoute, net: IPNetwork, index: int, host: str) -> None:
    try:
        ipr.route(
            "add",
            dst=str(net),
            oif=index,
            scope=RT_SCOPE_LINK,
            proto=ROUTE_PROTOCOL,
            table=RT_TABLE_MAIN,
        )
    except NetlinkError as err:
        if err.code == errno.EEXIST:
            raise DataplaneError(
                f"add host route {net} dev {host}: a route to {net} already exists on the "
                f"host ({_describe_route(ipr, net)}); is the address in use elsewhere?"
            ) from err
        raise DataplaneError(f"add host route {net} dev {host}: {os.strerror(err.code)}") from err


def _describe_route(ipr: IPRoute, net: IPNetwork) -> str:
    # Only decorates an error message: never let it replace the error being reported.
    try:
        route = _fib_match(ipr, net)
        if route is None or route.oif is None:
            return "unknown interface"
        link = _get_link_by_index(ipr, route.oif)
    except NetlinkError:
        return "unknown interface"
    return f"dev {link.name if link else route.oif} proto {route.proto}"


def _configure_pod_side(ifname: str, addresses: tuple[IPNetwork, ...]) -> str:
    """Runs inside the pod's namespace. Returns the pod-side MAC."""
    with IPRoute() as ipr:
        link = _get_link(ipr, ifname)
        if link is None:  # created a moment ago; only a racing delete gets here
            raise DataplaneError(f"{ifname} vanished from the pod namespace")
        ipr.link("set", index=link.index, state="up")  # routes below need the link up
        for net in addresses:
            # NODAD: a /128 is ours alone, and a tentative address would drop the first
            # packets. IFA_F_NODAD has no meaning for IPv4 and is left off there.
            flags = IFA_F_NODAD if net.version == 6 else 0
            ipr.addr(
                "add", index=link.index, address=str(net.ip), prefixlen=net.prefixlen, flags=flags
            )
        if any(n.version == 4 for n in addresses):
            ipr.neigh(
                "replace",
                dst=str(GATEWAY),
                lladdr=HOST_VETH_MAC,
                ifindex=link.index,
                state=NUD_PERMANENT,
            )
        for route in _expected_pod_routes(addresses):
            ipr.route(
                "add",
                dst=str(route.dst),
                gateway=_opt_str(route.gateway),
                oif=link.index,
                scope=route.scope,
                table=RT_TABLE_MAIN,
                proto=RTPROT_BOOT,
            )
        return link.mac


def _remove_after_failure(ipr: IPRoute, host_ifname: str) -> None:
    # Deleting the host end deletes the pod end, and the kernel flushes every route whose
    # nexthop was either end: this one call undoes all that _create did.
    try:
        link = _get_link(ipr, host_ifname)
        if link is not None:
            _delete_link(ipr, link)
    except Exception:
        log.exception(
            "cleanup after failed attach failed",
            extra={"op": "attach_pod", "ifname": host_ifname, "reason": "cleanup"},
        )


# ------------------------------------------------------------------------------ detach


def _delete_host_veth(host_ifname: str) -> bool:
    """Delete the host veth (routes go with it). True if it existed."""
    with IPRoute() as ipr, _step(f"delete host veth {host_ifname}"):
        link = _get_link(ipr, host_ifname)
        if link is None:
            return False
        if link.kind != "veth":
            raise DataplaneError(f"delete {host_ifname}: it is a {link.kind}, not our veth")
        return _delete_link(ipr, link)


def _delete_leftover_pod_veth(netns: str, container_ifname: str, host_fd: int | None) -> None:
    # No host veth by that name; a pod-side veth left over from an older naming scheme
    # would keep its host end alive, so remove it from inside the pod if it is there. A DEL
    # naming the host's namespace has no pod end there: the host's own veths stay.
    try:
        with open_netns(netns) as pod_fd:
            if not _is_host_side(pod_fd, host_fd):
                run_in_netns(pod_fd, lambda: _delete_pod_veth(container_ifname))
    except NetnsUnavailable:
        return  # the namespace is gone and took its end of the pair with it


def _delete_pod_veth(container_ifname: str) -> None:
    with IPRoute() as ipr, _step(f"delete pod veth {container_ifname}"):
        link = _get_link(ipr, container_ifname)
        if link is not None and link.kind == "veth":  # never another plugin's interface
            _delete_link(ipr, link)


def _delete_link(ipr: IPRoute, link: _Link) -> bool:
    try:
        ipr.link("del", index=link.index)
    except NetlinkError as err:
        if err.code != errno.ENODEV:  # gone meanwhile: same outcome
            raise
        return False
    return True


# ------------------------------------------------------------------------- observation


@dataclass(frozen=True)
class _Link:
    index: int
    name: str
    kind: str | None
    up: bool
    mac: str
    mtu: int
    peer_index: int | None  # IFLA_LINK: the other end's ifindex (in its own namespace)


@dataclass(frozen=True)
class _Route:
    dst: IPNetwork
    gateway: IPAddress | None
    scope: int
    oif: int | None = None
    proto: int | None = None


@dataclass(frozen=True)
class _HostView:
    link: _Link | None
    proxy_arp: str | None
    proxy_delay: str | None
    routes: dict[IPNetwork, _Route]  # FIB entries matching exactly each pod address


@dataclass(frozen=True)
class _PodView:
    link: _Link | None
    addresses: frozenset[IPNetwork]
    routes: frozenset[_Route]  # main-table routes out of the pod interface (no oif/proto)
    gateway_mac: str | None  # the permanent neighbour entry of GATEWAY, if any


def _get_link(ipr: IPRoute, name: str) -> _Link | None:
    try:
        msgs = ipr.link("get", ifname=name)
    except NetlinkError as err:
        if err.code == errno.ENODEV:
            return None
        raise
    return _parse_link(msgs[0])


def _get_link_by_index(ipr: IPRoute, index: int) -> _Link | None:
    try:
        return _parse_link(ipr.link("get", index=index)[0])
    except NetlinkError as err:
        if err.code == errno.ENODEV:
            return None
        raise


def _parse_link(msg: Any) -> _Link:
    return _Link(
        index=msg["index"],
        name=msg.get("IFLA_IFNAME"),
        kind=msg.get(("linkinfo", "kind")),
        up=bool(msg["flags"] & IFF_UP),
        mac=(msg.get("IFLA_ADDRESS") or "").lower(),
        mtu=msg.get("IFLA_MTU"),
        peer_index=msg.get("IFLA_LINK"),
    )


def _observe_host_in_host(att: PodAttachment) -> _HostView:
    with IPRoute() as ipr, _step(f"inspect host veth {att.host_ifname}"):
        link = _get_link(ipr, att.host_ifname)
        return _observe_host(ipr, att, link)


def _observe_host(ipr: IPRoute, att: PodAttachment, link: _Link | None) -> _HostView:
    routes: dict[IPNetwork, _Route] = {}
    for net in att.addresses:
        route = _fib_match(ipr, net)
        if route is not None:
            routes[net] = route
    if link is None:
        return _HostView(None, None, None, routes)
    return _HostView(
        link,
        _read_sysctl(f"/proc/sys/net/ipv4/conf/{link.name}/proxy_arp"),
        _read_sysctl(f"/proc/sys/net/ipv4/neigh/{link.name}/proxy_delay"),
        routes,
    )


def _fib_match(ipr: IPRoute, net: IPNetwork) -> _Route | None:
    """The main-table entry for exactly ``net``, found by a FIB lookup, not a table dump."""
    family = socket.AF_INET if net.version == 4 else socket.AF_INET6
    try:
        msgs = ipr.route("get", dst=str(net.ip), family=family, flags=RTM_F_FIB_MATCH)
    except NetlinkError as err:
        if err.code in (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENOENT):
            return None
        raise
    msg = msgs[0]
    if msg["dst_len"] != net.prefixlen or msg.get("RTA_TABLE", msg["table"]) != RT_TABLE_MAIN:
        return None  # only a covering or non-main route: ours is missing
    return _Route(
        net, _opt_ip(msg.get("RTA_GATEWAY")), msg["scope"], msg.get("RTA_OIF"), msg["proto"]
    )


def _observe_pod(ifname: str, addresses: tuple[IPNetwork, ...]) -> _PodView:
    """Runs inside the pod's namespace. Reads only the address families the pod uses."""
    families = sorted({socket.AF_INET if n.version == 4 else socket.AF_INET6 for n in addresses})
    with IPRoute() as ipr:
        link = _get_link(ipr, ifname)
        if link is None:
            return _PodView(None, frozenset(), frozenset(), None)
        addrs = frozenset(
            IPNetwork(f"{msg.get('IFA_LOCAL') or msg.get('IFA_ADDRESS')}/{msg['prefixlen']}")
            for family in families
            for msg in ipr.addr("dump", family=family, index=link.index)
        )
        routes = frozenset(
            _Route(_route_dst(msg), _opt_ip(msg.get("RTA_GATEWAY")), msg["scope"])
            for family in families
            for msg in ipr.route("dump", family=family, table=RT_TABLE_MAIN)
            if msg.get("RTA_OIF") == link.index
        )
        gateway_mac = next(
            (
                str(msg.get("NDA_LLADDR"))
                for msg in ipr.neigh("dump", ifindex=link.index, family=socket.AF_INET)
                if msg.get("NDA_DST") == str(GATEWAY) and msg["state"] & NUD_PERMANENT
            ),
            None,
        )
        return _PodView(link, addrs, routes, gateway_mac)


def _route_dst(msg: Any) -> IPNetwork:
    dst = msg.get("RTA_DST") or ("0.0.0.0" if msg["family"] == socket.AF_INET else "::")
    return IPNetwork(f"{dst}/{msg['dst_len']}")


def _list_host_routes_here() -> dict[IPNetwork, str]:
    with IPRoute() as ipr, _step("list host routes"):
        names: dict[int, str] = {}
        result: dict[IPNetwork, str] = {}
        for family in (socket.AF_INET, socket.AF_INET6):
            for msg in ipr.route("dump", family=family, table=RT_TABLE_MAIN):
                if msg["proto"] != ROUTE_PROTOCOL or msg.get("RTA_OIF") is None:
                    continue
                oif = msg.get("RTA_OIF")
                if oif not in names:
                    link = _get_link_by_index(ipr, oif)
                    names[oif] = link.name if link else str(oif)
                result[_route_dst(msg)] = names[oif]
        return result


# --------------------------------------------------------------- expectations, problems


def _expected_pod_routes(addresses: tuple[IPNetwork, ...]) -> list[_Route]:
    routes = []
    if any(n.version == 4 for n in addresses):
        routes.append(_Route(IPNetwork(f"{GATEWAY}/32"), None, RT_SCOPE_LINK))
        routes.append(_Route(IPNetwork("0.0.0.0/0"), GATEWAY, RT_SCOPE_UNIVERSE))
    if any(n.version == 6 for n in addresses):
        routes.append(_Route(IPNetwork("::/0"), GATEWAY_V6, RT_SCOPE_UNIVERSE))
    return routes


def _problems(att: PodAttachment, host: _HostView, pod: _PodView) -> list[str]:
    return _pod_problems(att, host, pod) + _host_problems(att, host)


def _pod_problems(att: PodAttachment, host: _HostView, pod: _PodView) -> list[str]:
    where = f"{att.container_ifname} in {att.netns}"
    link = pod.link
    if link is None:
        return [f"{where}: interface missing"]
    problems = []
    if link.kind != "veth":
        problems.append(f"{where}: is a {link.kind}, not a veth")
    if host.link is not None and link.peer_index != host.link.index:
        problems.append(f"{where}: not the peer of host veth {att.host_ifname}")
    if not link.up:
        problems.append(f"{where}: interface down")
    if link.mtu != att.mtu:
        problems.append(f"{where}: MTU {link.mtu}, want {att.mtu}")
    if att.container_mac and link.mac != att.container_mac.lower():
        problems.append(f"{where}: MAC {link.mac}, want {att.container_mac}")
    problems += [f"{where}: address {n} missing" for n in att.addresses if n not in pod.addresses]
    for route in _expected_pod_routes(att.addresses):
        if route not in pod.routes:
            problems.append(f"{where}: route missing: {_show_route(route, att.container_ifname)}")
    if any(n.version == 4 for n in att.addresses) and pod.gateway_mac != HOST_VETH_MAC:
        problems.append(
            f"{where}: gateway {GATEWAY} is not a permanent neighbour at {HOST_VETH_MAC} "
            f"(have {pod.gateway_mac or 'none'})"
        )
    return problems


def _host_problems(att: PodAttachment, host: _HostView) -> list[str]:
    where = f"host veth {att.host_ifname}"
    link = host.link
    if link is None:
        return [f"{where}: missing"] + [
            f"host route {n}: missing" for n in att.addresses if n not in host.routes
        ]
    problems = []
    if link.kind != "veth":
        problems.append(f"{where}: is a {link.kind}, not a veth")
    if not link.up:
        problems.append(f"{where}: down")
    if link.mtu != att.mtu:
        problems.append(f"{where}: MTU {link.mtu}, want {att.mtu}")
    if link.mac != HOST_VETH_MAC:
        problems.append(f"{where}: MAC {link.mac}, want {HOST_VETH_MAC}")
    if host.proxy_arp != "1":
        problems.append(f"{where}: proxy_arp is {host.proxy_arp}, want 1")
    if host.proxy_delay != "0":
        problems.append(f"{where}: proxy_delay is {host.proxy_delay}, want 0")
    for net in att.addresses:
        problems += _host_route_problems(net, host.routes.get(net), link)
    return problems


def _host_route_problems(net: IPNetwork, route: _Route | None, link: _Link) -> list[str]:
    if route is None:
        return [f"host route {net}: missing"]
    problems = []
    if route.oif != link.index or route.gateway is not None:
        problems.append(f"host route {net}: does not point at {link.name}")
    if route.proto != ROUTE_PROTOCOL:
        problems.append(f"host route {net}: protocol {route.proto}, want {ROUTE_PROTOCOL}")
    if net.version == 4 and route.scope != RT_SCOPE_LINK:
        problems.append(f"host route {net}: scope {route.scope}, want link")
    return problems


def _show_route(route: _Route, ifname: str) -> str:
    via = f" via {route.gateway}" if route.gateway is not None else ""
    scope = " scope link" if route.scope == RT_SCOPE_LINK else ""
    dst = "default" if route.dst.prefixlen == 0 else str(route.dst.ip)
    return f"{dst}{via} dev {ifname}{scope}"


# ------------------------------------------------------------------------------ sysctl


def _enable_forwarding_here() -> None:
    with _step("enable forwarding"):
        _write_sysctl("/proc/sys/net/ipv4/ip_forward", "1")
        if os.path.isdir("/proc/sys/net/ipv6"):
            _write_sysctl("/proc/sys/net/ipv6/conf/all/forwarding", "1")


def _write_sysctl(path: str, value: str) -> None:
    with open(path, "w") as fh:
        fh.write(value)


def _read_sysctl(path: str) -> str | None:
    try:
        with open(path) as fh:
            return fh.read().strip()
    except FileNotFoundError:
        return None


def _opt_ip(value: str | None) -> IPAddress | None:
    return IPAddress(value) if value else None


def _opt_str(value: object | None) -> str | None:
    return None if value is None else str(value)
