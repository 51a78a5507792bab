"""What the three values sets do to a cluster: the rendered custom resources are created through
the API (the test double, which validates them against the CRDs as the API server does), the
nodes carry the labels and annotations README tells users to set, and every node's agent
computes its BGP sessions from that (through the agent's own caches, `tests.routing.caches`)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client

from ipam_blocks.store.base import CRD_PLURALS, Resource
from ipam_blocks.store.kube import KubeStore
from tests.chart.conftest import MESH, ROUTE_REFLECTORS, TOR_PEERS
from tests.kube_api_double import KubeApiDouble
from tests.routing.caches import desired_of

RR_LABEL = {"l3fabric.io/route-reflector": "true"}


@pytest.fixture
def store() -> Iterator[KubeStore]:
    with KubeApiDouble() as api:
        s = KubeStore(str(api.kubeconfig))
        yield s
        s.close()


def install(store: KubeStore, objects: list[dict[str, Any]]) -> None:
    """Create the chart's custom resources as `helm install` does: plain API creates."""
    api = client.CustomObjectsApi(store.api_client)
    for obj in objects:
        if obj["apiVersion"] != "l3fabric.io/v1":
            continue
        plural = CRD_PLURALS[obj["kind"]]
        api.create_cluster_custom_object("l3fabric.io", "v1", plural, obj, _preload_content=False)


def node(store: KubeStore, name: str, address: str, labels=None, **spec: Any) -> None:
    """A Node as the user prepares it (kubectl label / annotate)."""
    store.create(Resource("Node", name, {"ipv4Address": address, **spec}, labels or {}))


def sessions(store: KubeStore, name: str) -> dict[str, tuple[str, int, str]]:
    """Every session of the node: its ExaBGP's and, on a reflector, its BIRD's."""
    desired = desired_of(store, name)
    assert desired is not None
    specs = (
        [*desired.sessions, *(r.spec for r in desired.reflector.sessions)]
        if (desired.reflector)
        else list(desired.sessions)
    )
    return {str(s.peer_ip): (s.peer_type.value, s.peer_as, s.name) for s in specs}


def test_mesh_every_node_peers_with_every_other(store, render):
    install(store, render(MESH))
    for i in range(1, 5):
        node(store, f"n{i}", f"192.0.2.{10 + i}/24")
    for i in range(1, 5):
        others = {f"192.0.2.{10 + j}" for j in range(1, 5) if j != i}
        assert sessions(store, f"n{i}") == {a: ("mesh", 64512, "mesh") for a in others}


def test_route_reflectors_clients_peer_only_with_the_two_reflectors(store, render):
    install(store, render(ROUTE_REFLECTORS))
    rr = {"routeReflectorClusterID": "244.0.0.1"}
    node(store, "rr1", "192.0.2.1/24", RR_LABEL, **rr)
    node(store, "rr2", "192.0.2.2/24", RR_LABEL, **rr)
    for i in range(1, 4):
        node(store, f"c{i}", f"192.0.2.{10 + i}/24")
    to_rr, from_rr = "l3fabric-to-route-reflectors", "l3fabric-from-route-reflectors"
    for i in range(1, 4):
        assert sessions(store, f"c{i}") == {
            "192.0.2.1": ("rr", 64512, to_rr),
            "192.0.2.2": ("rr", 64512, to_rr),
        }
    clients = {f"192.0.2.{10 + i}": ("rr-client", 64512, from_rr) for i in range(1, 4)}
    # BIRD holds the reflectors' fabric sessions; their ExaBGP only its loopback session to it.
    own_bird = {"127.0.0.1": ("rr", 64512, "node-reflector")}
    assert sessions(store, "rr1") == {"192.0.2.2": ("node", 64512, from_rr), **clients, **own_bird}
    assert sessions(store, "rr2") == {"192.0.2.1": ("node", 64512, from_rr), **clients, **own_bird}


def test_tor_peers_each_rack_peers_with_its_own_router(store, render):
    install(store, render(TOR_PEERS))
    node(store, "r1-a", "10.0.1.11/24", {"rack": "r1"})
    node(store, "r1-b", "10.0.1.12/24", {"rack": "r1"})
    node(store, "r2-a", "10.0.2.11/24", {"rack": "r2"})
    node(store, "r3-a", "10.0.3.11/24", {"rack": "r3"})
    for name in ("r1-a", "r1-b"):
        assert sessions(store, name) == {"10.0.1.1": ("node", 65001, "rack1-tor")}
    assert sessions(store, "r2-a") == {"10.0.2.1": ("node", 65002, "rack2-tor")}
    assert sessions(store, "r3-a") == {}  # no router for rack 3, and no mesh
