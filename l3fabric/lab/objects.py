"""l3fabric objects (BGPPeer, BGPConfiguration, IPPool, IPAMConfig) that come with a topology.

A topology file stays valid containerlab, so the objects cannot live in it. They live in a
YAML file beside it, bound into the l3fabric nodes at `OBJECTS_PATH`::

    kinds:
      linux:
        image: ghcr.io/l3fabric/l3fabric:latest
        binds:
          - rr.objects.yaml:/etc/l3fabric/objects.yaml:ro

With real containerlab every l3fabric container finds the file there (the image's
entrypoint applies it to the embedded store); `l3fabric lab up` applies it to the lab's
store before any agent starts. The file holds Kubernetes-style documents, as `kubectl
apply` takes them::

    apiVersion: l3fabric.io/v1
    kind: BGPPeer
    metadata: {name: peer-with-route-reflectors}
    spec: {nodeSelector: {}, peerSelector: {matchLabels: {route-reflector: "true"}}}

An object already in the store is replaced. A `password.file` naming a path that the nodes
have bound (`md5.secret:/etc/l3fabric/md5.secret:ro`) is rewritten to the file on this
machine, since `lab up`'s agents see the host's files, not the container's.
"""

from __future__ import annotations

import logging
import posixpath
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from bgp_speaker.bgp.config import parse_bgp_config, parse_bgp_peer
from bgp_speaker.bgp.policy import parse_accept_rules
from ipam_blocks.allocator import IPAM
from ipam_blocks.errors import AlreadyExists, InvalidInput, NotFound
from ipam_blocks.model import IPPool, Node, parse_pool
from ipam_blocks.pools import add_node, add_pool
from ipam_blocks.store.base import Resource, Store
from l3fabric.lab.topology import Bind, Role, Topology

__all__ = [
    "KINDS",
    "OBJECTS_PATH",
    "apply_objects",
    "objects_file",
    "parse_objects",
    "register_topology",
]

log = logging.getLogger("l3fabric.lab")

OBJECTS_PATH = "/etc/l3fabric/objects.yaml"
API_VERSION = "l3fabric.io/v1"
KINDS = ("BGPPeer", "BGPConfiguration", "IPPool", "IPAMConfig")


def objects_file(topology: Topology) -> Path | None:
    """The host file bound at OBJECTS_PATH in the l3fabric nodes (the same one for all)."""
    found = {
        bind.host
        for node in topology.by_role(Role.AGENT)
        if (bind := node.bind_for(OBJECTS_PATH)) is not None
    }
    if len(found) > 1:
        raise InvalidInput(
            "topology.nodes",
            f"the l3fabric nodes bind different files at {OBJECTS_PATH}: "
            + ", ".join(sorted(map(str, found))),
        )
    return next(iter(found), None)


def parse_objects(text: str, where: str, binds: Iterable[Bind] = ()) -> list[Resource]:
    """The documents of an objects file as store resources; InvalidInput names the field."""
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as err:
        raise InvalidInput(where, f"not valid YAML: {err}") from None
    by_container: dict[str, set[Path]] = {}
    for bind in binds:
        by_container.setdefault(posixpath.normpath(bind.container), set()).add(bind.host)
    out = []
    for i, doc in enumerate(docs):
        at = f"{where}[{i}]"
        if not isinstance(doc, dict):
            raise InvalidInput(at, "expected a mapping (apiVersion, kind, metadata, spec)")
        if doc.get("apiVersion") != API_VERSION:
            raise InvalidInput(f"{at}.apiVersion", f"expected {API_VERSION}")
        kind = doc.get("kind")
        if kind not in KINDS:
            raise InvalidInput(f"{at}.kind", f"expected one of {', '.join(KINDS)}, got {kind!r}")
        meta = doc.get("metadata") or {}
        name = meta.get("name") if isinstance(meta, dict) else None
        if not isinstance(name, str) or not name:
            raise InvalidInput(f"{at}.metadata.name", "every object needs a name")
        spec = doc.get("spec") or {}
        if not isinstance(spec, dict):
            raise InvalidInput(f"{at}.spec", "expected a mapping")
        spec = _host_password_file(spec, by_container, f"{at}.spec.password.file")
        _validate(Resource(kind, name, spec, annotations=meta.get("annotations") or {}), at)
        out.append(
            Resource(
                kind, name, spec,
                {str(k): str(v) for k, v in (meta.get("labels") or {}).items()},
                {str(k): str(v) for k, v in (meta.get("annotations") or {}).items()},
            )
        )  # fmt: skip
    return out


def _validate(res: Resource, at: str) -> None:
    """The agent's own parsers: a bad object fails here, naming its field, not in an agent."""
    try:
        if res.kind == "BGPPeer":
            parse_bgp_peer(res)
            parse_accept_rules(res)
        elif res.kind == "BGPConfiguration":
            parse_bgp_config(res)
        elif res.kind == "IPPool":
            parse_pool(res)
    except InvalidInput as err:
        field = err.field if err.field.startswith(res.kind) else f"spec.{err.field}"
        raise InvalidInput(f"{at}.{field}", err.message) from None


def _host_password_file(
    spec: dict[str, Any], binds: dict[str, set[Path]], where: str
) -> dict[str, Any]:
    password = spec.get("password")
    if not isinstance(password, dict) or not isinstance(password.get("file"), str):
        return spec
    hosts = binds.get(posixpath.normpath(password["file"]))
    if not hosts:
        return spec
    if len(hosts) > 1:
        raise InvalidInput(
            where, f"the nodes bind different files at {password['file']}: one password each"
        )
    return {**spec, "password": {**password, "file": str(next(iter(hosts)))}}


def apply_objects(store: Store, topology: Topology) -> list[Resource]:
    """Create (or replace) the topology's objects in `store`; what was applied."""
    path = objects_file(topology)
    if path is None:
        return []
    try:
        text = path.read_text()
    except OSError as err:
        raise InvalidInput(
            "topology.nodes.binds", f"cannot read {path} (bound to {OBJECTS_PATH}): {err}"
        ) from None
    binds = [b for n in topology.by_role(Role.AGENT) for b in n.binds]
    resources = parse_objects(text, str(path), binds)
    for res in resources:
        try:
            store.create(res)
        except AlreadyExists:
            current = store.get(res.kind, res.name)
            store.update(Resource(res.kind, res.name, res.spec, res.labels, res.annotations,
                                  current.revision))  # fmt: skip
    return resources


def register_topology(store: Store, topology: Topology, pool: IPPool) -> list[Resource]:
    """What `lab up` puts into the store before any agent starts (and `lab register` for a
    lab that containerlab runs): the topology's objects, `pool` when the store has no pool,
    a Node per l3fabric node from its labels (a Node already there, e.g. in a shared store,
    is kept as it is). The objects applied."""
    applied = apply_objects(store, topology)
    if applied:
        log.info("objects applied", extra={"op": "lab-register", "count": len(applied)})
    ipam = IPAM(store)
    if not ipam.pools():
        add_pool(ipam, pool)
    for node in topology.by_role(Role.AGENT):
        try:
            store.get("Node", node.name)
            log.info("node kept", extra={"op": "lab-register", "node": node.name})
            continue
        except NotFound:
            pass
        f = node.fabric
        add_node(ipam, Node(node.name, dict(node.labels), f.ipv4, f.asn, f.rr_cluster_id))
    return applied
