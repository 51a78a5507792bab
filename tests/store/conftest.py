"""Store backends for tests: every contract test runs once per backend.

Fixtures for any test module under tests/store (or import them into another conftest):

- `store_backend`: a `StoreBackend`, parametrised over `sqlite` (a file in tmp_path) and `kube`
  (marked `kube`): the Kubernetes API test double, or the real cluster named by
  `L3FABRIC_TEST_KUBECONFIG` (CRDs applied once per session, objects confined by a scope label
  unique to the test and deleted afterwards).
- `any_store`: `store_backend.store`, for tests that just need a Store.
- `kube_backend`: the `kube` backend alone; `sqlite_backend`: the sqlite backend alone.
- `kube_api`: the running `KubeApiDouble` (tests that need it are skipped on a real cluster).

`StoreBackend.open()` opens another client on the same data (another process's view, for
concurrency tests); everything opened is closed at teardown.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from ipam_blocks.errors import NotFound
from ipam_blocks.store import CRD_PLURALS, Store
from tests.kube_api_double import CRD_DIR, KubeApiDouble

KUBECONFIG_ENV = "L3FABRIC_TEST_KUBECONFIG"
SCOPE_LABEL = "test.l3fabric.io/run"
_RUN_ID = uuid.uuid4().hex[:8]


@dataclass
class StoreBackend:
    name: str  # "sqlite" | "kube"
    opener: Callable[[], Store]
    double: KubeApiDouble | None = None
    kubeconfig: Path | None = None
    scope: tuple[str, str] | None = None
    _opened: list[Store] = field(default_factory=list)

    @property
    def real_cluster(self) -> bool:
        return self.name == "kube" and self.double is None

    def open(self) -> Store:
        store = self.opener()
        self._opened.append(store)
        return store

    @property
    def store(self) -> Store:
        if not self._opened:
            self.open()
        return self._opened[0]

    def close(self) -> None:
        for store in self._opened:
            store.close()
        self._opened.clear()


@pytest.fixture(scope="session")
def real_cluster_kubeconfig() -> Path | None:
    """The real cluster to test against, with the CRDs applied; None: use the test double."""
    path = os.environ.get(KUBECONFIG_ENV)
    if not path:
        return None
    _apply_crds(path)
    return Path(path)


def _apply_crds(kubeconfig: str, timeout: float = 60.0) -> None:
    """Create or replace the chart's CRDs and wait until the server serves them."""
    from kubernetes import client, config

    api = client.ApiextensionsV1Api(config.new_client_from_config(config_file=kubeconfig))

    def read(name: str) -> dict | None:
        # Raw JSON: the client's typed models reject fields newer than themselves.
        try:
            return api.read_custom_resource_definition(name, _preload_content=False).json()
        except client.ApiException as e:
            if e.status == 404:
                return None
            raise

    names = []
    for path in sorted(CRD_DIR.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        name = crd["metadata"]["name"]
        names.append(name)
        current = read(name)
        if current is None:
            api.create_custom_resource_definition(crd, _preload_content=False)
        else:
            crd["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
            api.replace_custom_resource_definition(name, crd, _preload_content=False)
    deadline = time.monotonic() + timeout
    for name in names:
        while True:
            conditions = ((read(name) or {}).get("status") or {}).get("conditions") or []
            if any(c["type"] == "Established" and c["status"] == "True" for c in conditions):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"CRD {name} not established after {timeout} s")
            time.sleep(0.2)


def _kube_backend(real: Path | None, request: pytest.FixtureRequest) -> Iterator[StoreBackend]:
    from ipam_blocks.store.kube import KubeStore

    # The scope label is always on, double included, so its code path is the tested one.
    scope = (SCOPE_LABEL, f"{_RUN_ID}-{uuid.uuid4().hex[:8]}")
    double = None
    if real is None:
        double = KubeApiDouble().start()
        request.addfinalizer(double.stop)
        kubeconfig = double.kubeconfig
    else:
        kubeconfig = real
    backend = StoreBackend(
        "kube",
        lambda: KubeStore(str(kubeconfig), scope=scope),
        double=double,
        kubeconfig=kubeconfig,
        scope=scope,
    )
    yield backend
    if real is not None:
        _delete_scope(backend)
    backend.close()


def _delete_scope(backend: StoreBackend) -> None:
    """Remove everything the test created on a real cluster (all of it carries the scope)."""
    store = backend.open()
    for kind in (*CRD_PLURALS, "Node"):
        for obj in store.list(kind).items:
            with contextlib.suppress(NotFound):
                store.delete(kind, obj.name)


def _sqlite_backend(tmp_path: Path) -> Iterator[StoreBackend]:
    from ipam_blocks.store.sqlite import SqliteStore

    path = tmp_path / "store.db"
    backend = StoreBackend("sqlite", lambda: SqliteStore(path))
    yield backend
    backend.close()


@pytest.fixture(params=["sqlite", pytest.param("kube", marks=pytest.mark.kube)])
def store_backend(
    request: pytest.FixtureRequest, tmp_path: Path, real_cluster_kubeconfig: Path | None
) -> Iterator[StoreBackend]:
    if request.param == "sqlite":
        yield from _sqlite_backend(tmp_path)
    else:
        yield from _kube_backend(real_cluster_kubeconfig, request)


@pytest.fixture
def any_store(store_backend: StoreBackend) -> Store:
    return store_backend.store


@pytest.fixture
def kube_backend(
    request: pytest.FixtureRequest, real_cluster_kubeconfig: Path | None
) -> Iterator[StoreBackend]:
    yield from _kube_backend(real_cluster_kubeconfig, request)


@pytest.fixture
def sqlite_backend(tmp_path: Path) -> Iterator[StoreBackend]:
    yield from _sqlite_backend(tmp_path)


@pytest.fixture
def kube_api(kube_backend: StoreBackend) -> KubeApiDouble:
    if kube_backend.double is None:
        pytest.skip("needs the Kubernetes API test double (running against a real cluster)")
    return kube_backend.double
