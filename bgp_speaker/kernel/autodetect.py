"""Finding a node's BGP address when nobody configured one (Calico's "can-reach" default).

The address is the one the kernel would use as source towards the outside: the preferred
source of the route to a public destination, with the prefix length it has on its interface.
A route lookup sends no traffic.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from netaddr import IPNetwork
from pyroute2 import IPRoute

from bgp_speaker.kernel.netns import netns_path, open_netns, run_in_netns

PROBE_DESTINATION = "192.0.2.1"  # TEST-NET-1: looked up, never contacted


def _lookup() -> IPNetwork | None:
    with IPRoute() as ipr:
        try:
            (route,) = ipr.route("get", dst=PROBE_DESTINATION)
        except Exception:  # no route towards the outside: nothing to detect
            return None
        source, oif = route.get("RTA_PREFSRC"), route.get("RTA_OIF")
        if not source or oif is None:
            return None
        for addr in ipr.get_addr(family=2, index=oif):
            if addr.get("IFA_ADDRESS") == source:
                return IPNetwork(f"{source}/{addr['prefixlen']}")
    return None


@contextlib.contextmanager
def _netns_fd(netns: str | None) -> Iterator[int | None]:
    if netns is None:
        yield None
        return
    path = netns_path(netns)
    with open_netns(path) as fd:
        yield fd


def detect_ipv4(netns: str | None = None) -> IPNetwork | None:
    """The node's IPv4 address with prefix length, or None when there is no way out."""
    with _netns_fd(netns) as fd:
        return run_in_netns(fd, _lookup)
