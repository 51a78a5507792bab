"""Pods in a lab: one network namespace each, attached through the real CNI path.

`attach_pod` creates the pod's namespace `<lab>-<pod>` and runs the installed `l3fabric-cni`
executable the way a container runtime on that node would: inside the node's namespace (the
host end of the pod's veth must land there), with the CNI environment and, on stdin, a
network configuration naming the node agent's socket. Pod records live in the lab's state
file, written before the namespace is created (see `l3fabric.lab.state`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from ipam_blocks.errors import InvalidInput, L3FabricError
from ipam_blocks.model import check_object_name
from l3fabric.lab import host
from l3fabric.lab.errors import LabError
from l3fabric.lab.layout import LabPaths
from l3fabric.lab.state import LabState, Phase, PodRecord, StateFile

CNI_EXECUTABLE = "l3fabric-cni"
CNI_VERSION = "1.0.0"
NETWORK_NAME = "l3fabric"
POD_IFNAME = "eth0"
CNI_TIMEOUT = 150.0  # above the shim's own wait for the agent (120 s)


def attach_pod(journal: StateFile, node: str, name: str, namespace: str = "default") -> PodRecord:
    """Create pod `name` on `node` and run CNI ADD for it; the pod with its address."""
    check_object_name(name, "name")
    check_object_name(namespace, "namespace")
    with journal.locked():
        state = journal.load()
        if state.phase != Phase.UP:
            raise LabError(f"lab {state.lab!r} is {state.phase}, not up")
        _agent_of(state, node)  # refuse a node without an agent before creating anything
        netns = f"{state.lab}-{name}"
        if name in state.pods:
            raise InvalidInput("name", f"pod {name!r} exists already (on {state.pods[name].node})")
        if netns in state.netns or host.netns_exists(netns):
            raise InvalidInput("name", f"network namespace {netns} exists already")
        pod = PodRecord(name, node, namespace, netns, container_id=netns, ifname=POD_IFNAME)
        state.pods[name] = pod
        journal.save(state)
        try:
            host.add_netns(netns)
            result = _cni("ADD", state, pod)
            pod.address = _first_address(result)
        except BaseException:
            # Undo this pod alone; the rest of the lab stays as it was.
            with contextlib.suppress(L3FabricError):
                _cni("DEL", state, pod)
            with contextlib.suppress(L3FabricError):
                host.delete_netns(netns)
            del state.pods[name]
            journal.save(state)
            raise
        journal.save(state)
        return pod


def delete_pod(journal: StateFile, name: str) -> PodRecord:
    """CNI DEL for pod `name`, then delete its namespace and forget it."""
    with journal.locked():
        state = journal.load()
        pod = _pod(state, name)
        detach_pod(state, pod)
        del state.pods[name]
        journal.save(state)
        return pod


def detach_pod(state: LabState, pod: PodRecord) -> None:
    """CNI DEL through the pod's node agent, then delete the pod's namespace."""
    _cni("DEL", state, pod)
    host.delete_netns(pod.netns)


def exec_in_pod(journal: StateFile, name: str, argv: list[str]) -> int:
    """Run `argv` in the pod's namespace with this terminal; its exit status."""
    if not argv:
        raise InvalidInput("command", "give the command to run after `--`")
    pod = _pod(journal.load(), name)
    return subprocess.run(host.in_netns(pod.netns, argv), check=False).returncode


def _pod(state: LabState, name: str) -> PodRecord:
    if name not in state.pods:
        known = ", ".join(sorted(state.pods)) or "none"
        raise InvalidInput("name", f"no pod {name!r} in lab {state.lab!r} (pods: {known})")
    return state.pods[name]


def _agent_of(state: LabState, node: str) -> Path:
    """The socket of `node`'s agent."""
    with_agent = sorted(p.node for p in state.processes if p.daemon == "agent")
    if node not in with_agent:
        raise InvalidInput(
            "node",
            f"{node!r} runs no l3fabric agent in lab {state.lab!r} "
            f"(nodes with one: {', '.join(with_agent) or 'none'})",
        )
    return LabPaths(Path(state.state_dir)).node(node).agent_socket


def cni_executable() -> Path:
    """The installed plugin: beside this interpreter (a venv), else on PATH."""
    beside = Path(sys.executable).parent / CNI_EXECUTABLE
    if beside.exists():
        return beside
    found = shutil.which(CNI_EXECUTABLE)
    if found is None:
        raise LabError(f"{CNI_EXECUTABLE} is not installed (pip install -e . installs it)")
    return Path(found)


def _cni(command: str, state: LabState, pod: PodRecord) -> Any:
    plugin = cni_executable()
    env = {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": pod.container_id,
        "CNI_IFNAME": pod.ifname,
        "CNI_PATH": str(plugin.parent),
        "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE={pod.namespace};K8S_POD_NAME={pod.name}",
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
    }
    if command == "ADD" or host.netns_exists(pod.netns):  # DEL works without a namespace
        env["CNI_NETNS"] = str(host.netns_path(pod.netns))
    config = {
        "cniVersion": CNI_VERSION,
        "name": NETWORK_NAME,
        "type": NETWORK_NAME,
        "socket": str(_agent_of(state, pod.node)),
    }
    node_netns = state.nodes.get(pod.node, {}).get("netns", f"{state.lab}-{pod.node}")
    try:
        done = subprocess.run(
            host.in_netns(node_netns, [str(plugin)]), input=json.dumps(config).encode(),
            capture_output=True, env=env, timeout=CNI_TIMEOUT, check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        raise LabError(f"CNI {command} of pod {pod.name}: no answer in {CNI_TIMEOUT:g} s") from None
    out = done.stdout.decode(errors="replace")
    if done.returncode != 0:
        raise LabError(f"CNI {command} of pod {pod.name} failed: {_cni_error(out, done.stderr)}")
    return json.loads(out) if out.strip() else None


def _cni_error(stdout: str, stderr: bytes) -> str:
    try:
        err = json.loads(stdout)
        return f"{err['msg']} ({err.get('details', '')}, code {err['code']})"
    except (ValueError, KeyError, TypeError):
        return (stdout + stderr.decode(errors="replace")).strip() or "no output"


def _first_address(result: Any) -> str:
    try:
        return str(result["ips"][0]["address"]).split("/")[0]
    except (TypeError, KeyError, IndexError):
        raise LabError(f"CNI ADD returned no address: {result!r}") from None
