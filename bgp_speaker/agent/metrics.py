"""Prometheus metrics of the agent, derived at scrape time from its status (no second copy
of the state to keep in step)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector


class AgentCollector(Collector):
    def __init__(
        self, routing_status: Callable[[], dict[str, Any]], allocations: Callable[[], int]
    ) -> None:
        self._routing_status = routing_status
        self._allocations = allocations

    def collect(self) -> Iterator[Any]:
        status = self._routing_status()
        up = GaugeMetricFamily("l3fabric_bgp_sessions_up", "BGP sessions established")
        up.add_metric([], sum(1 for p in status["peers"] if p["state"] == "established"))
        yield up
        received = GaugeMetricFamily(
            "l3fabric_bgp_prefixes_received", "Prefixes held from each peer", labels=["peer"]
        )
        accepted = GaugeMetricFamily(
            "l3fabric_bgp_prefixes_accepted", "Prefixes accepted from each peer", labels=["peer"]
        )
        for peer in status["peers"]:
            received.add_metric([peer["address"]], peer["received"])
            accepted.add_metric([peer["address"]], peer["accepted"])
        yield received
        yield accepted
        advertised = GaugeMetricFamily("l3fabric_bgp_prefixes_advertised", "Prefixes exported")
        advertised.add_metric([], len(status["exported"]))
        yield advertised
        installed = GaugeMetricFamily("l3fabric_routes_installed", "Kernel routes the agent owns")
        installed.add_metric([], status["routes_installed"])
        yield installed
        dropped = CounterMetricFamily(
            "l3fabric_bgp_dropped_by_policy",
            "Announcements rejected by the import policy, by reason",
            labels=["reason"],
        )
        for reason, count in sorted(status["dropped_by_policy"].items()):
            dropped.add_metric([reason], count)
        yield dropped
        restarts = CounterMetricFamily("l3fabric_exabgp_restarts", "ExaBGP restarts")
        restarts.add_metric([], status["speaker_restarts"])
        yield restarts
        if status.get("reflector"):
            yield from _reflector_metrics(status["reflector"])
        if status.get("caches"):
            yield from _cache_metrics(status["caches"])
        if status.get("reconcile_seconds"):
            durations = status["reconcile_seconds"]
            reconcile = HistogramMetricFamily(
                "l3fabric_routing_reconcile_seconds",
                "Time to compute the desired state from the caches and level routing to it",
            )
            reconcile.add_metric([], durations["buckets"], durations["sum"])
            yield reconcile
        allocations = GaugeMetricFamily(
            "l3fabric_ipam_allocations", "Pod addresses allocated on this node"
        )
        allocations.add_metric([], self._allocations())
        yield allocations


def _reflector_metrics(reflector: dict[str, Any]) -> Iterator[Any]:
    """A route reflector node's BIRD (its sessions are among the peers above)."""
    running = GaugeMetricFamily("l3fabric_bird_running", "Whether the reflector's BIRD runs")
    running.add_metric([], 1 if reflector["running"] else 0)
    yield running
    restarts = CounterMetricFamily("l3fabric_bird_restarts", "BIRD restarts after it died")
    restarts.add_metric([], reflector["restarts"])
    yield restarts
    reloads = CounterMetricFamily("l3fabric_bird_reloads", "BIRD configuration reloads")
    reloads.add_metric([], reflector["reloads"])
    yield reloads


def _cache_metrics(caches: dict[str, dict[str, int]]) -> Iterator[Any]:
    """Routing's caches of the store, per kind (`routing.caches.RoutingCaches.describe`)."""
    families = (
        (GaugeMetricFamily, "l3fabric_cache_objects", "Objects in routing's cache", "size"),
        (CounterMetricFamily, "l3fabric_cache_relists", "Lists after the first", "relists"),
        (
            CounterMetricFamily,
            "l3fabric_cache_watch_restarts",
            "Watches resumed after one ended",
            "watch_restarts",
        ),
        (CounterMetricFamily, "l3fabric_cache_events", "Changes the watches delivered", "events"),
        (
            CounterMetricFamily,
            "l3fabric_cache_wakes",
            "Changes that woke the reconcile loop (they changed what routing reads)",
            "wakes",
        ),
    )
    for family, name, doc, key in families:
        metric = family(name, doc, labels=["kind"])
        for kind, counts in sorted(caches.items()):
            metric.add_metric([kind], counts[key])
        yield metric


def serve_metrics(port: int, address: str, collector: Collector) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(collector)
    start_http_server(port, addr=address, registry=registry)
    return registry
