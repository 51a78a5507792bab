"""The chart, rendered by Helm's own engine for the three shown values sets: it lints clean, every
manifest is valid for Kubernetes 1.30, every custom resource valid for its CRD and accepted by
the agent's own parsers, and the commands it runs exist with the options it passes."""

from __future__ import annotations

import re
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from bgp_speaker.bgp.config import parse_bgp_config, parse_bgp_peer
from ipam_blocks.model import parse_ipam_config, parse_pool
from ipam_blocks.store.base import Resource
from l3fabric.cli import build_parser
from tests.chart.conftest import (
    CHART_DIR,
    NAMESPACE,
    ROUTE_REFLECTORS,
    TOR_PEERS,
    VALUES_SETS,
    by_kind,
    crd_objects,
    merged,
    render_files,
)
from tests.kube_api_double import load_crds, prune, validate

K8S_VERSION = "1.30.0"
PARSERS = {
    "IPPool": parse_pool,
    "IPAMConfig": parse_ipam_config,
    "BGPConfiguration": parse_bgp_config,
    "BGPPeer": parse_bgp_peer,
}


def _resource(obj: dict[str, Any]) -> Resource:
    meta = obj["metadata"]
    return Resource(obj["kind"], meta["name"], obj.get("spec") or {}, meta.get("labels") or {})


@pytest.mark.parametrize("values", VALUES_SETS.values(), ids=VALUES_SETS.keys())
def test_lint_strict_is_clean(values):
    report = helm.lint(
        CHART_DIR, values or None, strict=True, kube_version=f"v{K8S_VERSION}", namespace=NAMESPACE
    )
    assert report["errors"] == []
    # Severity 1 is INFO (`icon is recommended`); warnings (2) and errors (3) fail strict lint.
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("values", VALUES_SETS.values(), ids=VALUES_SETS.keys())
def test_manifests_validate_against_kubernetes_1_30(render, values):
    objects = [o for o in render(values) if not o["apiVersion"].startswith("l3fabric.io/")]
    kinds = {o["kind"] for o in objects}
    assert {"DaemonSet", "Deployment", "ServiceAccount", "ClusterRole", "Role"} <= kinds
    assert {"ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"} <= kinds
    errors = []
    for obj in [*objects, *crd_objects()]:
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append(f"{obj['kind']}/{obj['metadata']['name']}: {e.message} at {list(e.path)}")
    assert errors == []


@pytest.mark.parametrize("values", VALUES_SETS.values(), ids=VALUES_SETS.keys())
def test_custom_resources_match_their_crds_and_parse(render, values):
    schemas = {t.kind: t.schema for t in load_crds()}
    custom = [o for o in render(values) if o["apiVersion"] == "l3fabric.io/v1"]
    assert {"IPPool", "IPAMConfig", "BGPConfiguration"} <= {o["kind"] for o in custom}
    for obj in custom:
        schema = schemas[obj["kind"]]
        body = {k: v for k, v in obj.items() if k != "metadata"}
        dropped: list[str] = []
        # What the API server would prune is a field the CRD does not know: an error here.
        pruned = prune(body, {**schema, "properties": dict(schema["properties"])}, "", dropped)
        assert dropped == [], f"{obj['kind']}/{obj['metadata']['name']}: unknown {dropped}"
        errors = validate(pruned, schema, "")
        assert errors == [], f"{obj['kind']}/{obj['metadata']['name']}: {errors}"
        PARSERS[obj["kind"]](_resource(obj))


def test_mesh_values_make_the_documented_objects(render):
    objects = render(VALUES_SETS["mesh"])
    (cfg,) = by_kind(objects, "BGPConfiguration")
    assert cfg["metadata"]["name"] == "default"
    assert cfg["spec"]["nodeToNodeMeshEnabled"] is True
    assert cfg["spec"]["asNumber"] == 64512
    (pool,) = by_kind(objects, "IPPool")
    assert pool["spec"] == {
        "cidr": "10.244.0.0/16",
        "blockSize": 26,
        "ipipMode": "Never",
        "vxlanMode": "Never",
        "natOutgoing": True,
        "disabled": False,
    }
    assert pool["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    assert by_kind(objects, "BGPPeer") == []
    assert not [o for o in objects if o["kind"] == "Role" and "password" in o["metadata"]["name"]]


def test_route_reflector_values_peer_nodes_and_reflectors_both_ways(render):
    objects = render(ROUTE_REFLECTORS)
    (cfg,) = by_kind(objects, "BGPConfiguration")
    assert cfg["spec"]["nodeToNodeMeshEnabled"] is False
    reflectors = {"matchLabels": {"l3fabric.io/route-reflector": "true"}}
    peers = {p["metadata"]["name"]: p["spec"] for p in by_kind(objects, "BGPPeer")}
    assert peers == {
        "l3fabric-to-route-reflectors": {"nodeSelector": {}, "peerSelector": reflectors},
        "l3fabric-from-route-reflectors": {"nodeSelector": reflectors, "peerSelector": {}},
    }
    pools = {p["metadata"]["name"]: p["spec"] for p in by_kind(objects, "IPPool")}
    assert pools["pods-v4"]["ipipMode"] == "CrossSubnet"
    assert pools["pods-v6"] == {
        "cidr": "fd00:244::/56",
        "blockSize": 122,
        "ipipMode": "Never",
        "vxlanMode": "Never",
        "natOutgoing": False,
        "disabled": False,
    }
    (ds,) = by_kind(objects, "DaemonSet")
    (init,) = ds["spec"]["template"]["spec"]["initContainers"]
    assert {"name": "CNI_MTU", "value": "1480"} in init["env"]


def test_tor_values_make_a_peer_per_rack_with_its_password_secret(render):
    objects = render(TOR_PEERS)
    peers = {p["metadata"]["name"]: p["spec"] for p in by_kind(objects, "BGPPeer")}
    assert peers == {
        f"rack{n}-tor": {
            "peerIP": f"10.0.{n}.1",
            "asNumber": 65000 + n,
            "nodeSelector": {"matchLabels": {"rack": f"r{n}"}},
            "password": {"secretKeyRef": {"name": "bgp-passwords", "key": f"rack{n}"}},
            "maxRestartTime": 120,
        }
        for n in (1, 2)
    }
    (role,) = [o for o in by_kind(objects, "Role") if "password" in o["metadata"]["name"]]
    assert role["metadata"]["namespace"] == NAMESPACE
    assert role["rules"] == [
        {
            "apiGroups": [""],
            "resources": ["secrets"],
            "verbs": ["get"],
            "resourceNames": ["bgp-passwords"],
        }
    ]
    (ipam,) = by_kind(objects, "IPAMConfig")
    assert ipam["spec"] == {"strictAffinity": True, "maxBlocksPerHost": 8}


def test_large_numbers_render_as_integers(render):
    values = merged(TOR_PEERS, bgp={**TOR_PEERS["bgp"], "asNumber": 4294967295})
    (cfg,) = by_kind(render(values), "BGPConfiguration")
    assert cfg["spec"]["asNumber"] == 4294967295  # not 4.294967295e+09


# --- the DaemonSet and the Deployment ---------------------------------------------------------


def _pod_spec(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (workload,) = by_kind(objects, kind)
    return workload["spec"]["template"]["spec"]


def _cli_args(argv: list[str]) -> Any:
    """Parse a command line the chart runs with the real `l3fabric` parser."""
    assert argv[0] == "l3fabric", argv
    env = {
        "NODE_NAME": "node-a",
        "POD_NAME": "gc-0",
        "POD_NAMESPACE": NAMESPACE,
        "HOST_IP": "192.0.2.10",
    }
    expanded = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in argv[1:]]
    return build_parser().parse_args(expanded)


def test_agent_daemonset_runs_on_every_linux_node_with_least_privilege(render):
    objects = render(VALUES_SETS["mesh"])
    (ds,) = by_kind(objects, "DaemonSet")
    assert ds["spec"]["updateStrategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 1},
    }
    spec = ds["spec"]["template"]["spec"]
    assert spec["hostNetwork"] is True
    assert spec["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert spec["tolerations"] == [{"operator": "Exists"}]
    (agent,) = spec["containers"]
    ctx = agent["securityContext"]
    assert ctx["privileged"] is False
    assert ctx["capabilities"] == {
        "drop": ["ALL"],
        # No NET_RAW: nothing in the agent or ExaBGP opens a raw or packet socket.
        "add": ["NET_ADMIN", "NET_BIND_SERVICE", "SYS_ADMIN"],
    }
    host_paths = {v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v}
    assert {"/var/run/netns", "/opt/cni/bin", "/etc/cni/net.d", "/var/run/l3fabric"} <= host_paths
    mounts = {m["mountPath"]: m for m in agent["volumeMounts"]}
    assert mounts["/var/run/netns"]["mountPropagation"] == "HostToContainer"
    node_env = next(e for e in agent["env"] if e["name"] == "NODE_NAME")
    assert node_env["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}


def test_agent_commands_and_probes_parse_with_the_real_cli(render):
    spec = _pod_spec(render(VALUES_SETS["mesh"]), "DaemonSet")
    (agent,) = spec["containers"]
    command = agent["command"]
    assert command[:2] == ["/bin/sh", "-c"] and command[3] == "l3fabric"
    assert "remount" in command[2] and command[2].endswith('exec l3fabric "$@"')
    args = _cli_args(["l3fabric", *agent["args"]])
    assert (args.node, args.store) == ("node-a", "kube")
    assert args.socket == "/var/run/l3fabric/agent.sock"
    # No --mtu by default: the pod MTU follows the encapsulation.
    assert (args.mtu, args.metrics_port, args.state_dir) == (None, 9095, "/var/lib/l3fabric")
    # Unauthenticated metrics stay on the node's loopback unless asked for.
    assert args.metrics_address == "127.0.0.1"
    assert "HOST_IP" not in {e["name"] for e in agent["env"]}
    ready = _cli_args(agent["readinessProbe"]["exec"]["command"])
    assert ready.check is True and ready.socket == args.socket
    alive = _cli_args(agent["livenessProbe"]["exec"]["command"])
    assert alive.check is False and alive.output == "json" and alive.socket == args.socket
    (init,) = spec["initContainers"]
    assert init["command"] == ["/bin/sh", "/etc/l3fabric/install-cni/install-cni.sh"]
    env = {e["name"]: e["value"] for e in init["env"]}
    assert env["CNI_BIN_DIR"] == "/host/opt/cni/bin" and env["AGENT_SOCKET"] == args.socket
    # The variables the script reads are the ones the chart sets.
    script = (CHART_DIR / "files" / "install-cni.sh").read_text()
    for name in env:
        assert f'"${{{name}:=' in script, name


def test_privileged_agent_is_a_choice(render):
    values = merged(VALUES_SETS["mesh"], agent={"privileged": True})
    (agent,) = _pod_spec(render(values), "DaemonSet")["containers"]
    assert agent["command"] == ["l3fabric"]
    assert agent["securityContext"]["privileged"] is True
    assert "capabilities" not in agent["securityContext"]


def test_gc_deployment_runs_the_leader_elected_collector_as_non_root(render):
    objects = render(VALUES_SETS["mesh"])
    (deploy,) = by_kind(objects, "Deployment")
    assert deploy["spec"]["replicas"] == 1
    spec = deploy["spec"]["template"]["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    (gc,) = spec["containers"]
    args = _cli_args([*gc["command"], *gc["args"]])
    assert (args.continuous, args.store, args.interval, args.grace) == (True, "kube", "60", "900")
    assert (args.lease_namespace, args.lease_name, args.identity) == (
        NAMESPACE,
        "l3fabric-ipam-gc",
        "gc-0",
    )
    assert gc["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert spec["serviceAccountName"] != _pod_spec(objects, "DaemonSet")["serviceAccountName"]


def test_gc_can_be_turned_off(render):
    objects = render(merged(VALUES_SETS["mesh"], gc={"enabled": False}))
    assert by_kind(objects, "Deployment") == []
    assert not [o for o in objects if "ipam-gc" in o["metadata"]["name"]]


def test_notes_tell_how_to_check_the_fabric_and_mark_reflectors(chart):
    notes = render_files(chart, ROUTE_REFLECTORS)["l3fabric/templates/NOTES.txt"]
    assert "l3fabric node status" in notes
    assert "kubectl label node RR_NODE l3fabric.io/route-reflector=true" in notes
    assert "l3fabric.io/route-reflector-cluster-id=244.0.0.1" in notes
    assert "l3fabric.io/ipv4-address=" in notes
    tor = render_files(chart, TOR_PEERS)["l3fabric/templates/NOTES.txt"]
    assert "bgp-passwords" in tor and "rack1-tor (10.0.1.1, AS 65001)" in tor


def test_readme_values_examples_render(chart):
    """The values snippets in README's "Install with Helm" section are valid values."""
    readme = (CHART_DIR.parents[1] / "README.md").read_text()
    section = readme.split("## Install with Helm", 1)[1]
    snippets = re.findall(r"```yaml\n(.*?)```", section, flags=re.S)
    assert len(snippets) >= 2
    for snippet in snippets:
        values = yaml.safe_load(snippet)
        chart.validate_schema(values)
        assert render_files(chart, values)


def test_metrics_on_the_node_address_come_from_the_pod_status(render):
    spec = _pod_spec(render({**VALUES_SETS["mesh"], "agent": {"metricsAddress": "hostIP"}}),
                     "DaemonSet")  # fmt: skip
    (agent,) = spec["containers"]
    env = {e["name"]: e for e in agent["env"]}
    assert env["HOST_IP"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.hostIP"}}
    assert _cli_args(["l3fabric", *agent["args"]]).metrics_address == "192.0.2.10"
