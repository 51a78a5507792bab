"""The node agent: one long-running process per node that owns everything node-local.

It serves the CNI verbs (`pods`) and introspection over the local socket (`api`), and runs
the routing half (`routing`: ExaBGP, RIB, FIB) on the same event loop. This module only
wires the parts together and runs them until SIGTERM/SIGINT, on which it stops accepting,
lets running requests finish and exits 0. Pods keep working: the agent never tears down
veths or routes on shutdown — the kernel keeps forwarding while it is away, and the next
start adopts the routes it finds.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bgp_speaker.agent.api import ApiServer
from bgp_speaker.agent.metrics import AgentCollector, serve_metrics
from bgp_speaker.pods import dataplane
from bgp_speaker.pods.network import HostDataplane, PodNetwork
from bgp_speaker.pods.records import WorkloadRecords, open_records_store
from bgp_speaker.routing.startup import RoutingHolder, run_routing
from cni.protocol import DEFAULT_SOCKET
from ipam_blocks.allocator import IPAM
from ipam_blocks.errors import InvalidInput, L3FabricError
from ipam_blocks.model import check_object_name, render_workload
from ipam_blocks.store import open_store

log = logging.getLogger("l3fabric.agent")

DEFAULT_STATE_DIR = Path("/var/lib/l3fabric")
DEFAULT_MTU = 1500
# The metrics name BGP peers and pod counts without authentication: loopback unless told.
DEFAULT_METRICS_ADDRESS = "127.0.0.1"
LIST_JITTER = 5.0  # 1000 agents starting together: ~200 first lists a second per kind


@dataclass(frozen=True)
class AgentSettings:
    node: str
    """This node's name (the Node object IPAM allocates for)."""
    store_url: str
    """IPAM store: sqlite:PATH, kube or kube:KUBECONFIG."""
    socket_path: Path = Path(DEFAULT_SOCKET)
    """Local API socket, created with mode 0600."""
    state_dir: Path = DEFAULT_STATE_DIR
    """Node-local state (the workload records when the store is Kubernetes)."""
    mtu: int | None = None
    """Pod interface MTU when the CNI config names none; None: the underlay's less the
    encapsulation overhead of the pools (DEFAULT_MTU until the routing half knows it)."""
    workers: int = 8
    """Threads running blocking IPAM and netlink work; bounds concurrent CNI calls."""
    host_netns: str | None = None
    """Network namespace that plays the host (labs and tests); None: the agent's own."""
    shutdown_grace: float = 30.0
    """Seconds running requests get to finish on SIGTERM."""
    bgp: bool = True
    """Run the routing half (ExaBGP, RIB, FIB)."""
    metrics_port: int = 0
    """Prometheus metrics port; 0 serves none."""
    metrics_address: str = DEFAULT_METRICS_ADDRESS
    """Address the metrics endpoint listens on."""
    list_jitter: float | None = None
    """Seconds over which routing's first lists of the store are spread at random, so that
    agents starting together (a cluster boot, a rollout) do not list together; None:
    LIST_JITTER with the Kubernetes store, 0 with the embedded one (nobody to herd)."""

    def __post_init__(self) -> None:
        check_object_name(self.node, "node")
        if self.mtu is not None and not 68 <= self.mtu <= 65535:
            raise InvalidInput("mtu", f"{self.mtu} is outside 68..65535")
        if not 1 <= self.workers <= 256:
            raise InvalidInput("workers", f"{self.workers} is outside 1..256")
        if self.list_jitter is not None and not 0 <= self.list_jitter <= 600:
            raise InvalidInput("list_jitter", f"{self.list_jitter} is outside 0..600 seconds")

    @property
    def first_list_jitter(self) -> float:
        if self.list_jitter is not None:
            return self.list_jitter
        return 0.0 if self.store_url.startswith("sqlite:") else LIST_JITTER


# The agent keeps several objects per learned route. With Python's default young-generation
# threshold (700 allocations) a 20k-prefix burst runs hundreds of collections, the older
# ones over the whole RIB; collecting young objects every 50k allocations instead cut the
# agent's CPU per burst by ~10% (bench/converge.py) for a few MiB of garbage held longer.
GC_THRESHOLDS = (50_000, 20, 100)


def run(settings: AgentSettings) -> int:
    """Run the agent until SIGTERM/SIGINT; the process exit code."""
    gc.set_threshold(*GC_THRESHOLDS)
    return asyncio.run(_serve(settings))


async def _serve(settings: AgentSettings) -> int:
    store = open_store(settings.store_url)
    records_store = open_records_store(store, settings.state_dir)
    ipam = IPAM(store)
    records = WorkloadRecords(records_store, settings.node)
    routing = RoutingHolder(settings.node)

    def pod_mtu() -> int:
        return settings.mtu or routing.pod_mtu() or DEFAULT_MTU

    pods = PodNetwork(settings.node, ipam, records, HostDataplane(settings.host_netns), pod_mtu)
    started = time.time()

    def agent_status(_: dict[str, Any]) -> dict[str, Any]:
        return {
            "node": settings.node,
            "store": settings.store_url,
            "socket": str(settings.socket_path),
            "started_at": started,
            "uptime_s": round(time.time() - started, 3),
            "cni_in_flight": pods.in_flight,
        }

    def workloads_list(_: dict[str, Any]) -> dict[str, Any]:
        return {"workloads": [dict(render_workload(w).spec) for w in records.on_node()]}

    def node_status(_: dict[str, Any]) -> dict[str, Any]:
        return routing.status()

    server = ApiServer(
        settings.socket_path,
        {
            **pods.ops(),
            "agent.status": agent_status,
            "workloads.list": workloads_list,
            "node.status": node_status,
            "node.routes": lambda args: routing.routes(args.get("prefix")),
        },
        workers=settings.workers,
    )
    if settings.metrics_port:
        serve_metrics(
            settings.metrics_port,
            settings.metrics_address,
            AgentCollector(routing.status, lambda: len(records.on_node())),
        )
    fields = {"op": "agent", "node": settings.node}
    await asyncio.to_thread(_prepare_host, ipam, settings)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("agent started", extra={**fields, "socket": str(settings.socket_path)})
    routing_task = (
        asyncio.create_task(run_routing(settings.node, store, settings, routing, stop))
        if settings.bgp
        else None
    )
    try:
        await stop.wait()
        log.info("agent stopping", extra={**fields, "in_flight": server.in_flight})
        await server.shutdown(settings.shutdown_grace)
        if routing_task is not None:
            await routing_task
    finally:
        for closable in {id(store): store, id(records_store): records_store}.values():
            with contextlib.suppress(Exception):
                closable.close()
    log.info("agent stopped", extra=fields)
    return 0


def _prepare_host(ipam: IPAM, settings: AgentSettings) -> None:
    """Host-wide dataplane settings, and an early word if this node is not in the store.
    Neither stops the agent: the store may come up later, and ADD reports the problem."""
    fields = {"op": "start", "node": settings.node}
    try:
        dataplane.enable_host_forwarding(host_netns=settings.host_netns)
    except L3FabricError as err:
        log.error("cannot enable forwarding", extra={**fields, "reason": str(err)})
    try:
        ipam.node(settings.node)
    except L3FabricError as err:
        log.warning("node not usable yet", extra={**fields, "reason": str(err)})
