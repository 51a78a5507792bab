"""l3fabric's writes to Kubernetes Nodes beside other controllers that write them too (issue 15
item 16): only l3fabric's own keys change, a write in between is never lost, and a Node being
deleted (held by a finalizer) is not written. Against the API test double, which here runs a
controller that annotates, labels and taints every new Node shortly after its creation.
"""

from __future__ import annotations

import json
import time
import urllib.request
from typing import Any

import pytest
from netaddr import IPNetwork

from bgp_speaker.routing.startup import _identity
from ipam_blocks.errors import BeingDeleted, Conflict, NotFound
from ipam_blocks.store import Resource, Store
from tests.kube_api_double import KubeApiDouble, NodeController
from tests.store.conftest import StoreBackend

pytestmark = pytest.mark.kube

NODE = "node-w"
FOREIGN_ANNOTATION = ("node.cloud.example.com/instance-id", "i-0abc")
FOREIGN_LABEL = ("topology.kubernetes.io/zone", "zone-a")
TAINT = {"key": "node.cloud.example.com/uninitialized", "value": "true", "effect": "NoSchedule"}
FINALIZER = "cloud.example.com/cleanup"


def _controller() -> NodeController:
    return NodeController(
        delay=0.05,
        annotations=dict([FOREIGN_ANNOTATION]),
        labels=dict([FOREIGN_LABEL]),
        taints=(TAINT,),
        finalizer=FINALIZER,
    )


def _kubelet_registers(backend: StoreBackend, name: str = NODE) -> None:
    """A Node as the kubelet creates it: no l3fabric annotations yet."""
    backend.store.core.create_node(  # type: ignore[attr-defined]
        {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": name,
                "labels": {"kubernetes.io/hostname": name, **dict([backend.scope])},
                "annotations": {"node.alpha.kubernetes.io/ttl": "0"},
            },
            "spec": {"podCIDR": "10.244.1.0/24"},
        }
    )


def _wait_for_controller(controller: NodeController, name: str = NODE) -> None:
    deadline = time.monotonic() + 5
    while name not in controller.writes:
        assert time.monotonic() < deadline, "the simulated node controller never wrote"
        time.sleep(0.01)


def _raw(backend: StoreBackend, name: str = NODE) -> dict[str, Any]:
    return backend.store._kube.call(backend.store.core.read_node, name)  # type: ignore[attr-defined]


def _assert_foreign_parts_kept(raw: dict[str, Any]) -> None:
    meta = raw["metadata"]
    assert meta["annotations"][FOREIGN_ANNOTATION[0]] == FOREIGN_ANNOTATION[1]
    assert meta["annotations"]["node.alpha.kubernetes.io/ttl"] == "0"
    assert meta["labels"][FOREIGN_LABEL[0]] == FOREIGN_LABEL[1]
    assert meta["labels"]["kubernetes.io/hostname"] == NODE
    assert raw["spec"]["taints"] == [TAINT]
    assert raw["spec"]["podCIDR"] == "10.244.1.0/24"
    assert meta["finalizers"] == [FINALIZER]


@pytest.fixture
def controller(kube_api: KubeApiDouble) -> NodeController:
    kube_api.node_controller = _controller()
    return kube_api.node_controller


class _ForeignWriteAfterRead:
    """A Store whose first read of the Node is followed, before the caller can write, by the
    other controller's write: the race a real cluster runs within 2 s of a Node's creation."""

    def __init__(self, store: Store, foreign_write: Any) -> None:
        self._store = store
        self._foreign_write = foreign_write
        self.reads = 0

    def get(self, kind: str, name: str) -> Resource:
        res = self._store.get(kind, name)
        if kind == "Node":
            self.reads += 1
            if self.reads == 1:
                self._foreign_write()
        return res

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


def test_the_write_touches_only_l3fabric_keys(
    kube_backend: StoreBackend, kube_api: KubeApiDouble, controller: NodeController
) -> None:
    store = kube_backend.store
    _kubelet_registers(kube_backend)
    _wait_for_controller(controller)
    res = store.get("Node", NODE)
    kube_api.requests.clear()
    updated = store.update(res.with_spec({"ipv4Address": "192.0.2.7/24", "asNumber": 64512}))
    assert updated.spec == {"ipv4Address": "192.0.2.7/24", "asNumber": 64512}
    raw = _raw(kube_backend)
    _assert_foreign_parts_kept(raw)
    assert raw["metadata"]["annotations"]["l3fabric.io/ipv4-address"] == "192.0.2.7/24"
    [patch] = [r for r in kube_api.requests if r.method == "PATCH"]
    paths = {op["path"] for op in patch.body}
    assert paths == {
        "/metadata/annotations/l3fabric.io~1ipv4-address",
        "/metadata/annotations/l3fabric.io~1as-number",
        "/metadata/resourceVersion",
    }


def test_an_unchanged_node_is_not_written(
    kube_backend: StoreBackend, kube_api: KubeApiDouble
) -> None:
    store = kube_backend.store
    created = store.create(Resource("Node", NODE, {"asNumber": 64512}, {"rack": "r1"}))
    kube_api.requests.clear()
    assert store.update(created) == created
    assert [r.method for r in kube_api.requests if r.method != "GET"] == []


def test_a_write_in_between_is_a_conflict_and_the_retry_keeps_it(
    kube_backend: StoreBackend, controller: NodeController
) -> None:
    store = kube_backend.store
    _kubelet_registers(kube_backend)
    stale = store.get("Node", NODE)  # read before the controller's write
    _wait_for_controller(controller)
    with pytest.raises(Conflict):
        store.update(stale.with_spec({"asNumber": 64512}))
    fresh = store.get("Node", NODE)
    store.update(fresh.with_spec({"asNumber": 64512}))
    raw = _raw(kube_backend)
    _assert_foreign_parts_kept(raw)
    assert raw["metadata"]["annotations"]["l3fabric.io/as-number"] == "64512"


def test_a_node_being_deleted_is_not_written(
    kube_backend: StoreBackend, kube_api: KubeApiDouble, controller: NodeController
) -> None:
    store = kube_backend.store
    _kubelet_registers(kube_backend)
    _wait_for_controller(controller)
    res = store.get("Node", NODE)
    store.delete("Node", NODE)  # the finalizer holds it
    held = _raw(kube_backend)
    assert held["metadata"]["deletionTimestamp"]
    kube_api.requests.clear()
    with pytest.raises(BeingDeleted) as info:
        store.update(res.with_spec({"ipv4Address": "192.0.2.7/24"}))
    assert "being deleted" in str(info.value)
    assert [r.method for r in kube_api.requests if r.method != "GET"] == []
    assert _raw(kube_backend) == held
    # Once the controller removes its finalizer, the Node is gone.
    store._kube.call(  # type: ignore[attr-defined]
        store.core.patch_node,  # type: ignore[attr-defined]
        NODE,
        [{"op": "remove", "path": "/metadata/finalizers"}],
    )
    with pytest.raises(NotFound):
        store.get("Node", NODE)


def test_identity_writes_the_detected_address_despite_a_write_in_between(
    kube_backend: StoreBackend, kube_api: KubeApiDouble, controller: NodeController
) -> None:
    store = kube_backend.store
    _kubelet_registers(kube_backend)
    racing = _ForeignWriteAfterRead(store, lambda: _wait_for_controller(controller))
    detected = IPNetwork("192.0.2.9/24")
    identity = _identity(racing, NODE, lambda: detected)  # type: ignore[arg-type]
    assert identity is not None
    assert str(identity[0]) == "192.0.2.9"
    assert racing.reads == 2  # the Conflict was re-read and re-applied at once
    raw = _raw(kube_backend)
    _assert_foreign_parts_kept(raw)
    assert raw["metadata"]["annotations"]["l3fabric.io/ipv4-address"] == "192.0.2.9/24"


def test_identity_leaves_a_node_being_deleted_alone(
    kube_backend: StoreBackend, kube_api: KubeApiDouble, controller: NodeController
) -> None:
    store = kube_backend.store
    _kubelet_registers(kube_backend)
    _wait_for_controller(controller)
    store.delete("Node", NODE)
    held = _raw(kube_backend)
    assert _identity(store, NODE, lambda: IPNetwork("192.0.2.9/24")) is None
    assert _raw(kube_backend) == held


# -- the double behaves as the real server here ------------------------------------------------


def test_double_merge_patch_and_json_patch_semantics(
    kube_backend: StoreBackend, kube_api: KubeApiDouble
) -> None:
    store = kube_backend.store
    _kubelet_registers(kube_backend)
    call, patch = store._kube.call, store.core.patch_node  # type: ignore[attr-defined]
    # A missing parent is an error, not created on the fly.
    with pytest.raises(Exception) as info:
        call(patch, NODE, [{"op": "add", "path": "/metadata/nothing/key", "value": "x"}])
    assert getattr(info.value, "status", None) == 422
    # Array elements: append a taint, then remove it.
    call(patch, NODE, [{"op": "add", "path": "/spec/taints", "value": []}])
    call(patch, NODE, [{"op": "add", "path": "/spec/taints/-", "value": TAINT}])
    assert _raw(kube_backend)["spec"]["taints"] == [TAINT]
    call(patch, NODE, [{"op": "remove", "path": "/spec/taints/0"}])
    assert _raw(kube_backend)["spec"]["taints"] == []
    # Merge patch: null removes, objects merge key by key.
    request = urllib.request.Request(
        f"{kube_api.url}/api/v1/nodes/{NODE}",
        method="PATCH",
        data=json.dumps(
            {"metadata": {"annotations": {"node.alpha.kubernetes.io/ttl": None, "a.io/b": "c"}}}
        ).encode(),
        headers={
            "Content-Type": "application/merge-patch+json",
            "Authorization": f"Bearer {kube_api.token}",
        },
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.status == 200
    annotations = _raw(kube_backend)["metadata"]["annotations"]
    assert annotations == {"a.io/b": "c"}
