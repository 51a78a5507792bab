"""CNI results: the ADD result l3fabric returns, and reading a prevResult back for CHECK.

Pure. The shape is exact because chained plugins (tuning, portmap, bandwidth) parse it:
interface 0 is the host veth, interface 1 the pod's, each IP points at interface 1, and
the default route has no gateway of its own (it goes via the IP's gateway, 169.254.1.1).
Results for 0.4.0 configurations carry the `version` field that 1.0.0 dropped.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from netaddr import AddrFormatError, IPAddress, IPNetwork

from cni.errors import INVALID_CONFIG, CniError

POD_INTERFACE_INDEX = 1


@dataclass(frozen=True)
class Attachment:
    """What an ADD result says about one pod attachment."""

    host_ifname: str
    host_mac: str
    container_ifname: str
    container_mac: str
    sandbox: str
    addresses: tuple[IPNetwork, ...]
    gateway: IPAddress
    gateway_v6: IPAddress | None = None


def render_result(cni_version: str, att: Attachment) -> dict[str, Any]:
    ips: list[dict[str, Any]] = []
    routes: list[dict[str, Any]] = []
    for version in (4, 6):
        nets = [n for n in att.addresses if n.version == version]
        gateway = att.gateway if version == 4 else att.gateway_v6
        for net in nets:
            ip: dict[str, Any] = {"address": str(net)}
            if gateway is not None:
                ip["gateway"] = str(gateway)
            ip["interface"] = POD_INTERFACE_INDEX
            if cni_version == "0.4.0":
                ip = {"version": str(version), **ip}
            ips.append(ip)
        if nets:
            routes.append({"dst": "0.0.0.0/0" if version == 4 else "::/0"})
    return {
        "cniVersion": cni_version,
        "interfaces": [
            {"name": att.host_ifname, "mac": att.host_mac},
            {"name": att.container_ifname, "mac": att.container_mac, "sandbox": att.sandbox},
        ],
        "ips": ips,
        "routes": routes,
        "dns": {},
    }


@dataclass(frozen=True)
class PrevAttachment:
    """The parts of a prevResult that CHECK compares with the live state."""

    container_mac: str
    addresses: tuple[IPNetwork, ...]
    host_ifname: str | None


def parse_prev_result(prev: Mapping[str, Any], ifname: str, netns: str) -> PrevAttachment:
    """Find our pod interface (name `ifname` in `netns`) and its addresses in a prevResult.

    Chained plugins may have appended interfaces, so ours are found by name and sandbox.
    """
    interfaces = prev.get("interfaces")
    if not isinstance(interfaces, list):
        raise _invalid("prevResult.interfaces", "missing or not a list")
    index = next(
        (
            i
            for i, itf in enumerate(interfaces)
            if isinstance(itf, dict) and itf.get("name") == ifname and itf.get("sandbox") == netns
        ),
        None,
    )
    if index is None:
        raise _invalid("prevResult.interfaces", f"no interface {ifname!r} in sandbox {netns}")
    host = next(
        (
            itf.get("name")
            for itf in interfaces
            if isinstance(itf, dict) and not itf.get("sandbox") and itf.get("name")
        ),
        None,
    )
    ips = prev.get("ips")
    if not isinstance(ips, list):
        raise _invalid("prevResult.ips", "missing or not a list")
    addresses = []
    for i, ip in enumerate(ips):
        if not isinstance(ip, dict) or ip.get("interface") != index:
            continue
        try:
            addresses.append(IPNetwork(str(ip["address"])))
        except (KeyError, AddrFormatError, ValueError):
            raise _invalid(f"prevResult.ips[{i}].address", f"{ip.get('address')!r}") from None
    return PrevAttachment(str(interfaces[index].get("mac", "")), tuple(addresses), host)


def _invalid(field: str, message: str) -> CniError:
    return CniError(INVALID_CONFIG, f"invalid network configuration: {field}", message)
