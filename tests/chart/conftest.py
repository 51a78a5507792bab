"""Rendering the Helm chart with a real Helm engine (helm-python-sdk: Helm's Go SDK as a shared
library, no helm binary, no cluster), and the three values sets the chart is shown with."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

CHART_DIR = Path(__file__).parents[2] / "charts" / "l3fabric"
NAMESPACE = "l3fabric-system"
RELEASE = "l3fabric"

# 1. The defaults: one IPv4 pool, iBGP full mesh between the nodes.
MESH: dict[str, Any] = {}

# 2. Mesh off; every node peers with the two reflector nodes (labelled and annotated by the
#    user, see NOTES), which peer with each other. An IPIP pool and an IPv6 pool.
ROUTE_REFLECTORS: dict[str, Any] = {
    "mtu": 1480,
    "ipPools": [
        {
            "name": "pods-v4",
            "cidr": "10.244.0.0/16",
            "blockSize": 26,
            "ipipMode": "CrossSubnet",
            "natOutgoing": True,
        },
        {"name": "pods-v6", "cidr": "fd00:244::/56", "blockSize": 122},
    ],
    "bgp": {
        "asNumber": 64512,
        "nodeToNodeMesh": False,
        "routeReflectors": {
            "enabled": True,
            "nodeSelector": {"matchLabels": {"l3fabric.io/route-reflector": "true"}},
            "clusterID": "244.0.0.1",
        },
    },
}

# 3. Mesh off; the nodes of each rack peer (eBGP) with their rack's top-of-rack router, with a
#    TCP MD5 password from a Secret.
TOR_PEERS: dict[str, Any] = {
    "ipPools": [
        {
            "name": "rack-pods",
            "cidr": "10.96.0.0/14",
            "blockSize": 27,
            "natOutgoing": False,
            "nodeSelector": {
                "matchExpressions": [
                    {"key": "rack", "operator": "In", "values": ["r1", "r2"]},
                ]
            },
        }
    ],
    "ipam": {"strictAffinity": True, "maxBlocksPerHost": 8},
    "bgp": {
        "asNumber": 65100,
        "nodeToNodeMesh": False,
        "holdTime": 9,
        "keepaliveTime": 3,
        "peers": [
            {
                "name": f"rack{n}-tor",
                "peerIP": f"10.0.{n}.1",
                "asNumber": 65000 + n,
                "nodeSelector": {"matchLabels": {"rack": f"r{n}"}},
                "passwordSecret": {"name": "bgp-passwords", "key": f"rack{n}"},
                "maxRestartTime": 120,
            }
            for n in (1, 2)
        ],
    },
}

VALUES_SETS = {"mesh": MESH, "route-reflectors": ROUTE_REFLECTORS, "tor-peers": TOR_PEERS}


def merged(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """A deep copy of `base` with top-level keys replaced."""
    values = copy.deepcopy(base)
    values.update(copy.deepcopy(changes))
    return values


@pytest.fixture(scope="session")
def chart() -> Iterator[Any]:
    with helm.Chart.load(CHART_DIR) as loaded:
        yield loaded


def render_files(chart: Any, values: dict[str, Any] | None) -> dict[str, str]:
    """Template path -> rendered text, as `helm install` would render them."""
    return chart.render(
        copy.deepcopy(values) if values else None,
        name=RELEASE,
        namespace=NAMESPACE,
        is_install=True,
    )


def render_objects(chart: Any, values: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Every object the chart renders (templates only; CRDs come from crds/)."""
    objects = []
    for path, text in sorted(render_files(chart, values).items()):
        if not path.endswith(".yaml"):
            continue
        objects += [doc for doc in yaml.safe_load_all(text) if doc]
    return objects


@pytest.fixture(scope="session")
def render(chart: Any) -> Callable[[dict[str, Any] | None], list[dict[str, Any]]]:
    return lambda values: render_objects(chart, values)


def crd_objects() -> list[dict[str, Any]]:
    return [yaml.safe_load(p.read_text()) for p in sorted((CHART_DIR / "crds").glob("*.yaml"))]


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]
