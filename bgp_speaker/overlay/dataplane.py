"""The node's overlay dataplane as one adapter: tunnel devices (``tunnels``) and natOutgoing
rules (``nat``), levelled together to the pools' ``EncapPolicy``.

The routing controller calls ``reconcile`` (blocking: from a worker thread) with every new
desired state and periodically; it never raises: a failure is logged, kept in ``status()``
and tried again at the next call (``healthy`` says whether one is due soon). ``available`` is
what routes may use; ``pod_mtu`` what the CNI gives pods whose network config names no MTU.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from bgp_speaker.overlay.encap import Encap, EncapPolicy, pod_mtu
from bgp_speaker.overlay.nat import NatError, NatTable
from bgp_speaker.overlay.tunnels import TunnelError, Tunnels, TunnelStatus

__all__ = ["Overlay", "OverlayDataplane"]

log = logging.getLogger("l3fabric.agent.overlay")


class OverlayDataplane(Protocol):
    """What the routing controller needs of the overlay (``Overlay`` implements it)."""

    @property
    def healthy(self) -> bool:
        """False: the last reconcile failed, call it again soon."""
        ...

    @property
    def generation(self) -> int:
        """Changes whenever a tunnel device was replaced (the routes through it are gone)."""
        ...

    def reconcile(self, policy: EncapPolicy) -> frozenset[Encap]:
        """Level devices and NAT rules to ``policy`` (blocking); the encapsulations routes may
        use."""
        ...

    def pod_mtu(self) -> int | None:
        """The MTU pods get when their CNI config names none (None: not known yet)."""
        ...

    def status(self) -> dict[str, Any]:
        """For ``node status``."""
        ...


class Overlay:
    def __init__(self, tunnels: Tunnels, nat: NatTable | None = None) -> None:
        self.tunnels = tunnels
        self.nat = nat
        self.policy: EncapPolicy | None = None
        self.healthy = True
        self._errors: dict[str, str] = {}
        self._logged_pod_mtu: int | None = None

    @property
    def available(self) -> frozenset[Encap]:
        return self.tunnels.status.available

    @property
    def generation(self) -> int:
        """Changes whenever a tunnel device was replaced (the routes through it are gone)."""
        return self.tunnels.generation

    def reconcile(self, policy: EncapPolicy) -> frozenset[Encap]:
        """Level devices and NAT rules to ``policy``; the encapsulations routes may use."""
        self.policy = policy
        errors: dict[str, str] = {}
        try:
            self.tunnels.reconcile(policy)
        except TunnelError as err:
            errors["tunnels"] = str(err)
        if self.nat is not None:
            try:
                self.nat.reconcile(policy.pools)
            except NatError as err:
                errors["nat"] = str(err)
        for part, reason in errors.items():
            if self._errors.get(part) != reason:
                log.error("overlay not levelled", extra={"op": "overlay", "part": part,
                                                         "reason": reason})  # fmt: skip
        self._errors = errors
        self.healthy = not errors
        return self.available

    def pod_mtu(self) -> int | None:
        """MTU for pods whose CNI config sets none: the underlay's less the encapsulation's
        overhead (None until the first reconcile has seen the underlay)."""
        status: TunnelStatus = self.tunnels.status
        if self.policy is None or status.underlay_mtu is None:
            return None
        mtu = pod_mtu(status.underlay_mtu, self.policy)
        if mtu != self._logged_pod_mtu:
            self._logged_pod_mtu = mtu
            log.info(
                "pod MTU",
                extra={"op": "overlay", "mtu": mtu, "underlay_mtu": status.underlay_mtu,
                       "source": status.underlay_source,
                       "encapsulation": ",".join(sorted(map(str, self.policy.wanted)))},
            )  # fmt: skip
        return mtu

    def status(self) -> dict[str, Any]:
        policy = self.policy
        modes = {
            str(p.cidr): {"ipip": str(p.ipip), "vxlan": str(p.vxlan), "nat": p.nat_outgoing}
            for p in (policy.pools if policy else ())
        }
        return {
            "pools": modes,
            **self.tunnels.status.to_dict(),
            "vteps": len(self.tunnels.vteps),
            "pod_mtu": self.pod_mtu(),
            "nat": None if self.nat is None else self.nat.status.__dict__,
            "errors": dict(self._errors),
        }
