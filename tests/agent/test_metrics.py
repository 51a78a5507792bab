"""The agent's Prometheus endpoint: served, and by default only on loopback (it names BGP
peers and pod counts, without authentication; the chart runs the agent on the host network)."""

from __future__ import annotations

import socket
import urllib.request
from pathlib import Path

import pytest

from tests.agent.harness import NodeHarness

pytestmark = pytest.mark.root

LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listening_addresses(port: int) -> set[str]:
    """Local addresses (hex, as /proc/net/tcp writes them) with a TCP listener on `port`."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, _, hex_port = local.partition(":")
        if state == LISTEN and int(hex_port, 16) == port:
            found.add(address)
    return found


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        return reply.read().decode()


def test_metrics_listen_on_loopback_only_by_default(node: NodeHarness) -> None:
    port = free_port()
    agent = node.start_agent(extra_args=["--metrics-port", str(port)])
    try:
        assert listening_addresses(port) == {"0100007F"}  # 127.0.0.1, nothing else
        assert "l3fabric_" in scrape(port)
    finally:
        assert agent.stop() == 0, agent.log_text()


def test_metrics_listen_where_told(node: NodeHarness) -> None:
    port = free_port()
    agent = node.start_agent(
        extra_args=["--metrics-port", str(port), "--metrics-address", "0.0.0.0"]
    )
    try:
        assert listening_addresses(port) == {"00000000"}
        assert "l3fabric_" in scrape(port)
    finally:
        assert agent.stop() == 0, agent.log_text()
