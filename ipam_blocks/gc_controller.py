"""`ipam gc --continuous`: IPAM garbage collection as a long-running, leader-elected controller.

In a cluster it runs as the chart's GC Deployment: one pass of `gc.collect_garbage` every
`interval` seconds, only while this copy holds the Lease (`leader`), until SIGTERM/SIGINT.
A pass that fails because the store is unavailable or too contended is logged and retried at
the next interval; the loop itself only ends on a signal (or an unexpected exception, which
the kubelet answers with a restart).

Why a Deployment and not the node agents: GC needs to list every pod in the cluster, which
the agents never need; one elected process keeps that permission on one ServiceAccount and
that load on the API server to one list per interval, instead of one per node.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType

from ipam_blocks.allocator import IPAM
from ipam_blocks.errors import InvalidInput, L3FabricError
from ipam_blocks.gc import GCResult, collect_garbage
from ipam_blocks.leader import LeaderElector, LeaseSettings
from ipam_blocks.liveness import OwnerLiveness

log = logging.getLogger("l3fabric.gc")

DEFAULT_INTERVAL = 60.0
DEFAULT_GRACE = 900.0


@dataclass(frozen=True)
class GCLoopSettings:
    interval: float = DEFAULT_INTERVAL
    """Seconds between the starts of two passes."""
    grace: float = DEFAULT_GRACE
    """A leak must be this many seconds old before it is released (see `gc`)."""
    lease: LeaseSettings | None = None
    """Compete for this Lease and collect only while leading; None: always collect."""

    def __post_init__(self) -> None:
        if not 1 <= self.interval < float("inf"):
            raise InvalidInput("interval", f"must be at least 1 second, got {self.interval!r}")


def run_passes(
    ipam: IPAM,
    liveness: OwnerLiveness,
    settings: GCLoopSettings,
    stop: threading.Event,
    *,
    elector: LeaderElector | None = None,
    report: Callable[[GCResult], None] = lambda result: None,
) -> int:
    """Collect every `interval` until `stop` is set; the number of passes run."""
    passes = 0
    while not stop.is_set():
        if elector is None or elector.leading.is_set():
            try:
                result = collect_garbage(ipam, liveness, settings.grace)
            except L3FabricError as err:
                log.warning("gc pass failed", extra={"op": "gc", "reason": str(err)})
            else:
                passes += 1
                report(result)
                log.info(
                    "gc pass done",
                    extra={
                        "op": "gc",
                        "released": len(result.released_ips),
                        "settled": len(result.settled_handles),
                        "blocks_released": len(result.released_blocks),
                    },
                )
            stop.wait(settings.interval)
        else:
            # Not leading: start the first pass as soon as this copy becomes the leader.
            elector.leading.wait(elector.settings.retry_period)
    return passes


def run_controller(
    ipam: IPAM,
    settings: GCLoopSettings,
    *,
    report: Callable[[GCResult], None] = lambda result: None,
) -> int:
    """The `--continuous` entry point: passes until SIGTERM/SIGINT, then release the Lease.
    Owner liveness and the Lease come from the store; only a cluster's store has Leases."""
    stop = threading.Event()
    elector = None
    if settings.lease is not None:
        lease = settings.lease
        client = ipam.store.lease(lease.namespace, lease.name)
        if client is None:
            raise InvalidInput(
                "lease-namespace", "leader election needs the kube store (--store kube)"
            )
        elector = LeaderElector(client, lease).start()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    log.info("gc controller started", extra={"op": "gc", "interval": settings.interval})
    try:
        return run_passes(
            ipam, ipam.store.owner_liveness(), settings, stop, elector=elector, report=report
        )
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if elector is not None:
            elector.stop()
        log.info("gc controller stopped", extra={"op": "gc"})


__all__ = ["DEFAULT_GRACE", "DEFAULT_INTERVAL", "GCLoopSettings", "run_controller", "run_passes"]
