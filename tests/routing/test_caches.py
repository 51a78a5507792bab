"""The agent's routing reads its caches of the store: a real `RoutingController` (fake speaker,
FIB and reflector) against the Kubernetes API double, its requests told apart by its own token.

What is proved: it lists and watches only its own node's blocks, affinities and handles; a
change reaches the speaker through the caches without a store read; an event that changes
nothing routing reads wakes nothing; after an API restart it lists each kind once, and a
change made while it could not watch is not lost; a borrowed address is exported."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from netaddr import IPNetwork
from prometheus_client import CollectorRegistry, generate_latest
from rich.console import Console

from bgp_speaker.agent.metrics import AgentCollector
from bgp_speaker.routing.controller import RoutingController
from ipam_blocks.allocator import IPAM, AssignRequest
from ipam_blocks.model import IPPool, Node, block_name
from ipam_blocks.pools import add_node, add_pool
from ipam_blocks.store.base import Resource
from ipam_blocks.store.kube import KubeStore
from l3fabric.views.node_status import render_node_status
from tests.kube_api_double import KubeApiDouble, RecordedRequest
from tests.reflection.doubles import FakeFib, FakeReflector, FakeSpeaker

AGENT_TOKEN = "l3e-agent-token"
POOL = IPNetwork("10.96.0.0/16")
ADDRESS = {"n1": "192.0.2.11", "n2": "192.0.2.12", "n3": "192.0.2.13"}
TIMEOUT = 10.0


@pytest.fixture
def api() -> Iterator[KubeApiDouble]:
    with KubeApiDouble() as double:
        double.add_token(AGENT_TOKEN)
        yield double


@pytest.fixture
def admin(api: KubeApiDouble) -> Iterator[KubeStore]:
    store = KubeStore(str(api.kubeconfig))
    ipam = IPAM(store)
    add_pool(ipam, IPPool("default", POOL, 26))
    for node, address in ADDRESS.items():
        add_node(ipam, Node(node, {}, IPNetwork(f"{address}/24")))
    for node in ("n1", "n2"):
        ipam.auto_assign(AssignRequest(node, f"net.{node}-a", pod=f"{node}-a", namespace="d"))
    yield store
    store.close()


def agent_store(api: KubeApiDouble, tmp_path: Path) -> KubeStore:
    """A client of the double that carries the agent's own token."""
    config = yaml.safe_load(api.kubeconfig.read_text())
    config["users"][0]["user"]["token"] = AGENT_TOKEN
    path = tmp_path / "agent-kubeconfig"
    path.write_text(yaml.safe_dump(config))
    return KubeStore(str(path))


@dataclass
class Agent:
    controller: RoutingController
    speaker: FakeSpeaker

    def peers(self) -> set[str]:
        return {str(s.peer_ip) for s in self.speaker.sessions}

    def exported(self) -> set[str]:
        return {str(p) for p in self.controller.reconciler.announced}

    @property
    def reconciles(self) -> int:
        return self.controller.reconcile_durations.count


@asynccontextmanager
async def running_agent(store: KubeStore, node: str = "n1") -> Any:
    speaker = FakeSpeaker()
    controller = RoutingController(node, store, speaker, FakeFib(), FakeReflector())
    stop = asyncio.Event()
    task = asyncio.create_task(controller.run(stop))
    agent = Agent(controller, speaker)
    try:
        await until(lambda: agent.reconciles > 0, "the first reconcile")
        yield agent
    finally:
        stop.set()
        await task
        await asyncio.to_thread(store.close)


async def until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def settle() -> None:
    """Longer than the reconcile loop's debounce: a wake-up would have reconciled by now."""
    await asyncio.sleep(0.3)


def block_of(admin: KubeStore, node: str) -> IPNetwork:
    return next(b.cidr for b in IPAM(admin).blocks() if b.affinity == node)


def reads(api: KubeApiDouble, since: int = 0) -> list[RecordedRequest]:
    """The agent's GET requests (lists, watches, gets) from the `since`-th on."""
    return [r for r in api.requests_of(AGENT_TOKEN)[since:] if r.method == "GET"]


def in_thread(fn: Callable[..., Any], *args: Any) -> Awaitable[Any]:
    return asyncio.to_thread(fn, *args)


def test_an_agent_never_names_another_nodes_block(api, admin, tmp_path):
    theirs = block_name(block_of(admin, "n2"))
    mine = block_of(admin, "n1")

    async def scenario() -> None:
        async with running_agent(agent_store(api, tmp_path)) as agent:
            await until(lambda: agent.exported() == {str(mine)}, "n1's block exported")
            before = len(api.requests_of(AGENT_TOKEN))
            # Pods come and go on n2: n1's agent hears nothing of it, and asks nothing.
            ipam = IPAM(admin)
            await in_thread(
                ipam.auto_assign, AssignRequest("n2", "net.n2-b", pod="b", namespace="d")
            )
            await in_thread(ipam.release_handle, "net.n2-a")
            await settle()
            assert api.requests_of(AGENT_TOKEN)[before:] == []
            assert agent.controller.caches.describe()["IPAMBlock"]["events"] == 1  # its own

    asyncio.run(scenario())
    block_reads = [r for r in reads(api) if "/ipamblocks" in r.path]
    assert block_reads, "the agent lists and watches its blocks"
    for request in block_reads:
        assert theirs not in request.path, request
        assert request.query.get("labelSelector") == "l3fabric.io/node=n1", request
    for plural in ("blockaffinities", "ipamhandles"):
        scoped = [r.query.get("labelSelector") for r in reads(api) if f"/{plural}" in r.path]
        assert scoped and set(scoped) == {"l3fabric.io/node=n1"}, plural


def test_node_and_peer_changes_reach_the_sessions_through_the_caches(api, admin, tmp_path):
    async def scenario() -> None:
        async with running_agent(agent_store(api, tmp_path)) as agent:
            await until(lambda: agent.peers() == {ADDRESS["n2"], ADDRESS["n3"]}, "the mesh")
            before = len(api.requests_of(AGENT_TOKEN))
            # A node joins.
            await in_thread(add_node, IPAM(admin), Node("n4", {}, IPNetwork("192.0.2.14/24")))
            await until(lambda: "192.0.2.14" in agent.peers(), "the new node's session")
            # A node moves.
            n3 = await in_thread(admin.get, "Node", "n3")
            moved = {**n3.spec, "ipv4Address": "192.0.2.23/24"}
            await in_thread(admin.update, replace(n3, spec=moved))
            await until(lambda: "192.0.2.23" in agent.peers(), "the moved node's session")
            assert ADDRESS["n3"] not in agent.peers()
            # A BGPPeer appears, then changes its address.
            peer = Resource("BGPPeer", "tor", {"peerIP": "192.0.2.254", "asNumber": 65001})
            await in_thread(admin.create, peer)
            await until(lambda: "192.0.2.254" in agent.peers(), "the ToR session")
            stored = await in_thread(admin.get, "BGPPeer", "tor")
            await in_thread(
                admin.update, replace(stored, spec={**stored.spec, "peerIP": "192.0.2.253"})
            )
            await until(lambda: "192.0.2.253" in agent.peers(), "the ToR's new address")
            assert "192.0.2.254" not in agent.peers()
            # All of it through the open watches: not one request more.
            assert api.requests_of(AGENT_TOKEN)[before:] == []

    asyncio.run(scenario())


def test_events_that_change_nothing_routing_reads_wake_nothing(api, admin, tmp_path):
    async def scenario() -> None:
        async with running_agent(agent_store(api, tmp_path)) as agent:
            await settle()
            caches = agent.controller.caches
            reconciles, calls = agent.reconciles, list(agent.speaker.calls)
            events = sum(k["events"] for k in caches.describe().values())
            # An annotation on another node, a label on the pool, a pod on this node (its own
            # block and handle change, its exports do not).
            n2 = await in_thread(admin.get, "Node", "n2")
            await in_thread(admin.update, replace(n2, annotations={"note": "irrelevant"}))
            ipam = IPAM(admin)
            await in_thread(
                ipam.auto_assign, AssignRequest("n1", "net.n1-b", pod="b", namespace="d")
            )
            await until(
                lambda: sum(k["events"] for k in caches.describe().values()) >= events + 3,
                "the events to reach the caches",
            )
            await settle()
            assert agent.reconciles == reconciles
            assert agent.speaker.calls == calls
            assert sum(k["wakes"] for k in caches.describe().values()) > 0  # the first sync did

    asyncio.run(scenario())


def test_after_an_api_restart_each_kind_is_listed_once_and_no_change_is_lost(api, admin, tmp_path):
    async def scenario() -> None:
        async with running_agent(agent_store(api, tmp_path)) as agent:
            await until(lambda: agent.peers() == {ADDRESS["n2"], ADDRESS["n3"]}, "the mesh")
            caches = agent.controller.caches
            # A write the Node watch does not see: its resourceVersion falls behind.
            peer = Resource("BGPPeer", "tor", {"peerIP": "192.0.2.254", "asNumber": 65001})
            await in_thread(admin.create, peer)
            await until(lambda: "192.0.2.254" in agent.peers(), "the ToR session")
            # The server restarts with an empty watch cache, and refuses the agent for a while:
            # a node joins meanwhile, which no watch of the agent's can deliver.
            with api._cond:
                api._tokens.discard(AGENT_TOKEN)
            api.drop_watches(expire=True)
            await in_thread(add_node, IPAM(admin), Node("n4", {}, IPNetwork("192.0.2.14/24")))
            await asyncio.sleep(0.3)
            assert "192.0.2.14" not in agent.peers()
            api.add_token(AGENT_TOKEN)
            await until(lambda: "192.0.2.14" in agent.peers(), "the node added while down")
            await settle()
            # A kind whose watch fell behind the restart lists once (410), Node among them;
            # BGPPeer's resumes where it was. None lists twice.
            relists = {k: v["relists"] for k, v in caches.describe().items()}
            assert relists["Node"] == 1 and relists["BGPPeer"] == 0, relists
            assert max(relists.values()) == 1, relists

    asyncio.run(scenario())


def test_a_borrowed_address_is_exported_and_only_its_block_is_read(api, tmp_path):
    admin = KubeStore(str(api.kubeconfig))
    ipam = IPAM(admin)
    add_pool(ipam, IPPool("one-block", IPNetwork("10.97.0.0/26"), 26))
    for node, address in ADDRESS.items():
        add_node(ipam, Node(node, {}, IPNetwork(f"{address}/24")))
    ipam.auto_assign(AssignRequest("n1", "net.a", pod="a", namespace="d"))  # takes the block
    lender = block_name(block_of(admin, "n1"))

    async def scenario() -> None:
        async with running_agent(agent_store(api, tmp_path), "n2") as agent:
            assert agent.exported() == set()
            [ip] = await in_thread(
                ipam.auto_assign, AssignRequest("n2", "net.b", pod="b", namespace="d")
            )
            await until(lambda: agent.exported() == {f"{ip}/32"}, "the borrowed /32")
            await in_thread(ipam.release_handle, "net.b")
            await until(lambda: agent.exported() == set(), "the /32 withdrawn")

    try:
        asyncio.run(scenario())
    finally:
        admin.close()
    named = [r for r in reads(api) if lender in r.path]
    assert named and all(r.query.get("watch") != "true" for r in named), named


def test_status_metrics_and_node_status_show_the_caches(api, admin, tmp_path):
    async def scenario() -> dict[str, Any]:
        async with running_agent(agent_store(api, tmp_path)) as agent:
            return await agent.controller.status()

    status = asyncio.run(scenario())
    assert status["caches"]["Node"]["size"] == 3
    assert status["caches"]["IPAMBlock"]["size"] == 1  # n1's own, not n2's
    assert status["reconcile_seconds"]["count"] >= 1
    registry = CollectorRegistry()
    registry.register(AgentCollector(lambda: status, lambda: 0))
    scraped = generate_latest(registry).decode()
    assert 'l3fabric_cache_objects{kind="Node"} 3.0' in scraped
    assert 'l3fabric_cache_relists_total{kind="IPAMBlock"} 0.0' in scraped
    assert "l3fabric_routing_reconcile_seconds_count" in scraped
    console = Console(width=200, record=True)
    console.print(render_node_status(status, now=status["last_sync"] + 5))
    assert "last sync: 5s ago" in console.export_text()
