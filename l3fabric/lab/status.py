"""What `lab status` reports: per node its namespace, processes and agent; per pod its
namespace and address. Read-only: it looks, it never repairs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cni.errors import CniError
from cni.protocol import AgentUnreachable, call
from l3fabric.lab import host
from l3fabric.lab.layout import LabPaths
from l3fabric.lab.state import LabState, Phase, PodRecord

AGENT_TIMEOUT = 2.0


@dataclass(frozen=True)
class ProcessStatus:
    daemon: str
    pid: int | None
    running: bool


@dataclass(frozen=True)
class NodeStatus:
    name: str
    role: str
    netns: str
    netns_present: bool
    processes: tuple[ProcessStatus, ...]
    agent_answers: bool | None  # None: the node runs no agent

    @property
    def healthy(self) -> bool:
        return (
            self.netns_present
            and all(p.running for p in self.processes)
            and self.agent_answers is not False
        )


@dataclass(frozen=True)
class PodStatus:
    pod: PodRecord
    netns_present: bool


@dataclass(frozen=True)
class LabStatus:
    lab: str
    phase: str
    store: str
    nodes: tuple[NodeStatus, ...]
    pods: tuple[PodStatus, ...]

    @property
    def healthy(self) -> bool:
        return (
            self.phase == Phase.UP
            and all(n.healthy for n in self.nodes)
            and all(p.netns_present for p in self.pods)
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "lab": self.lab,
            "phase": self.phase,
            "store": self.store,
            "healthy": self.healthy,
            "nodes": [
                {
                    "name": n.name, "role": n.role, "netns": n.netns,
                    "netns_present": n.netns_present, "agent_answers": n.agent_answers,
                    "processes": [vars(p) for p in n.processes],
                }
                for n in self.nodes
            ],
            "pods": [{**vars(p.pod), "netns_present": p.netns_present} for p in self.pods],
        }  # fmt: skip


def inspect_lab(state: LabState) -> LabStatus:
    paths = LabPaths(Path(state.state_dir))
    nodes = []
    for name, info in sorted(state.nodes.items()):
        procs = tuple(
            ProcessStatus(p.daemon, p.pid, p.pid is not None and host.matches(p.pid, p.argv))
            for p in state.processes
            if p.node == name
        )
        has_agent = any(p.daemon == "agent" for p in procs)
        answers = agent_answers(paths.node(name).agent_socket) if has_agent else None
        ns = info["netns"]
        nodes.append(NodeStatus(name, info["role"], ns, host.netns_exists(ns), procs, answers))
    pods = tuple(PodStatus(p, host.netns_exists(p.netns)) for p in state.pods.values())
    return LabStatus(state.lab, state.phase, state.store, tuple(nodes), pods)


def agent_answers(socket: Path, timeout: float = AGENT_TIMEOUT) -> bool:
    """Does the agent on `socket` answer `agent.status` within `timeout` seconds?"""
    try:
        call(str(socket), "agent.status", {}, timeout=timeout)
    except (AgentUnreachable, CniError):
        return False
    return True
