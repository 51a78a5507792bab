"""Bring a topology up in network namespaces (no Docker), and take it down again.

`bring_up` realises a `Topology`, in this order:

1. one namespace per node, `<lab>-<node>`, loopback up;
2. `kind: bridge` nodes: a Linux bridge named after the node, in the node's own namespace;
3. a veth pair per link, created directly in the two namespaces under the endpoints' names
   (so nothing ever appears in the host namespace and names cannot collide there), up, and
   enslaved to the bridge when one end is a bridge node;
4. each node's `exec` lines, inside its namespace, with its `env` (split like containerlab
   does, no shell), output in the node's `exec.log`. They run before the daemons so the
   addresses they set are there to bind to;
5. the store: the topology's objects (`l3fabric.lab.objects`: BGPPeers, BGPConfiguration, ... from
   the file bound at /etc/l3fabric/objects.yaml), a default IPPool if there is none, a Node
   record per l3fabric node;
6. the daemons (`l3fabric.lab.daemons`): FRR and BIRD first, then the agents (peers listening first
   spares the agents' BGP reconnect backoff); each detached, its PID recorded; then wait
   until each serves, and load FRR's config with vtysh.

Every resource is recorded in the state file (`l3fabric.lab.state`) before it is created. `lab up`
refuses to run while a state file exists — a second `lab up` is an error, not a no-op, and
so is a crashed one until `lab down` has cleaned up after it.

`tear_down` works from the state file alone (the topology file may have changed or gone):
pods are detached through their agent while it still runs (so a shared store gets their
addresses back), recorded processes are stopped (only if their command line still matches),
anything else still running inside a lab namespace is stopped too (it covers a daemon whose
PID `lab up` crashed before recording), the namespaces are deleted (their veths and bridges
go with them), then recorded files, the lab's own store and finally the state file. What
could not be removed is reported and stays in the state file for the next `lab down`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import shutil
import time
from pathlib import Path

from netaddr import IPNetwork

from ipam_blocks.errors import InvalidInput, L3FabricError
from ipam_blocks.model import IPPool
from ipam_blocks.store import open_store
from l3fabric.lab import host
from l3fabric.lab.daemons import Daemon, Readiness, frr_load_argv, frr_run_dir, plan_daemons
from l3fabric.lab.errors import LabError
from l3fabric.lab.layout import LabPaths, NodeDirs
from l3fabric.lab.objects import register_topology
from l3fabric.lab.pods import detach_pod
from l3fabric.lab.state import LabState, Phase, ProcessRecord, StateFile
from l3fabric.lab.status import agent_answers
from l3fabric.lab.topology import FRR_CONFIG, FRR_DAEMONS, LabNode, Role, Topology

log = logging.getLogger("l3fabric.lab")

DEFAULT_POOL = IPPool("default", IPNetwork("10.244.0.0/16"), 26)
READY_TIMEOUT = 30.0
"""Seconds every daemon of the lab gets to start serving."""


def bring_up(
    topology: Topology,
    source: Path,
    state_dir: Path,
    store_url: str | None = None,
    pool: IPPool = DEFAULT_POOL,
) -> LabState:
    """Realise `topology` (read from `source`); `store_url` None: an embedded store of its own.

    On failure the state file stays behind, so `tear_down` removes what was created."""
    paths = LabPaths(state_dir)
    journal = StateFile(state_dir)
    with journal.locked():
        state = LabState(
            lab=topology.name,
            topology=str(source),
            state_dir=str(state_dir),
            store=store_url or paths.store_url,
            owned_store=store_url is None,
            nodes={
                n.name: {"role": str(n.role), "netns": topology.netns(n.name)}
                for n in topology.nodes.values()
            },
        )
        # Both checks before anything is created or recorded.
        journal.refuse_if_present(topology.name)  # up, or crashed: `lab down` first
        try:
            _check_free(topology)
        except LabError:
            journal.remove()  # no state file yet: only the lock and the directory go
            raise
        journal.create(state)
        _Realiser(topology, state, journal, paths, pool).run()
    return state


def _check_free(topology: Topology) -> None:
    # A namespace that exists already belongs to someone else and must never be recorded
    # (down would delete it).
    taken = [ns for ns in map(topology.netns, topology.nodes) if host.netns_exists(ns)]
    if taken:
        raise LabError(f"network namespaces exist already: {', '.join(taken)}")


class _Realiser:
    def __init__(
        self,
        topology: Topology,
        state: LabState,
        journal: StateFile,
        paths: LabPaths,
        pool: IPPool,
    ) -> None:
        self.topo = topology
        self.state = state
        self.journal = journal
        self.paths = paths
        self.pool = pool

    def _save(self) -> None:
        self.journal.save(self.state)

    def run(self) -> None:
        self.state.paths.append(str(self.paths.nodes))
        self._save()
        for node in self.topo.nodes.values():
            self._namespace(node)
        for node in self.topo.by_role(Role.BRIDGE):
            self._bridge(node)
        for i, _ in enumerate(self.topo.links):
            self._link(i)
        for node in self.topo.nodes.values():
            self._exec_lines(node)
        if self.topo.by_role(Role.AGENT):
            self._register()
        started: list[tuple[LabNode, Daemon]] = []
        # Peers first, agents last: see the module docstring.
        for role in (Role.FRR, Role.BIRD, Role.AGENT):
            for node in self.topo.by_role(role):
                started += [(node, d) for d in self._start_daemons(node)]
        self._wait_ready(started)
        for node in self.topo.by_role(Role.FRR):
            self._load_frr_config(node)
        self.state.phase = Phase.UP
        self._save()
        log.info("lab up", extra={"op": "lab-up", "lab": self.topo.name})

    # --- namespaces, bridges, links -----------------------------------------------------------

    def _namespace(self, node: LabNode) -> None:
        ns = self.topo.netns(node.name)
        self.state.netns.append(ns)
        self._save()
        host.add_netns(ns)
        log.info("namespace created", extra={"op": "lab-up", "node": node.name, "netns": ns})

    def _bridge(self, node: LabNode) -> None:
        ns = self.topo.netns(node.name)
        self.state.bridges.append({"node": node.name, "netns": ns, "name": node.name})
        self._save()
        host.ip("-n", ns, "link", "add", node.name, "type", "bridge", what=f"bridge {node.name}")
        host.ip("-n", ns, "link", "set", node.name, "up", what=f"bridge {node.name}")

    def _link(self, index: int) -> None:
        link = self.topo.links[index]
        a_ns, b_ns = self.topo.netns(link.a.node), self.topo.netns(link.b.node)
        self.state.links.append({"a": str(link.a), "b": str(link.b), "a_netns": a_ns,
                                 "b_netns": b_ns})  # fmt: skip
        self._save()
        mtu = ["mtu", str(link.mtu)] if link.mtu else []
        what = f"topology.links[{index}] ({link.a} - {link.b})"
        host.ip("link", "add", link.a.ifname, "netns", a_ns, *mtu, "type", "veth",
                "peer", "name", link.b.ifname, "netns", b_ns, *mtu, what=what)  # fmt: skip
        for end, ns in ((link.a, a_ns), (link.b, b_ns)):
            if self.topo.nodes[end.node].role is Role.BRIDGE:
                host.ip("-n", ns, "link", "set", end.ifname, "master", end.node, what=what)
            host.ip("-n", ns, "link", "set", end.ifname, "up", what=what)

    # --- exec lines and the store -------------------------------------------------------------

    def _exec_lines(self, node: LabNode) -> None:
        ns = self.topo.netns(node.name)
        for i, line in enumerate(node.exec):
            what = f"topology.nodes.{node.name}.exec[{i}]"
            try:
                argv = shlex.split(line)
            except ValueError as err:
                raise InvalidInput(what, f"cannot split {line!r}: {err}") from None
            if argv:
                log = self.paths.node(node.name).log("exec")
                host.run_logged(host.in_netns(ns, argv), what=what, env=_env(node), log=log)

    def _register(self) -> None:
        """The topology's objects, a default pool when the store has none, and a Node per
        l3fabric node (see `l3fabric.lab.objects.register_topology`)."""
        store = open_store(self.state.store)
        try:
            register_topology(store, self.topo, self.pool)
        finally:
            store.close()

    # --- daemons ------------------------------------------------------------------------------

    def _start_daemons(self, node: LabNode) -> list[Daemon]:
        ns = self.topo.netns(node.name)
        dirs = self.paths.node(node.name)
        daemons = plan_daemons(node, ns, dirs, self.state.store, self._frr_daemons_file(node))
        if node.role is Role.FRR:
            self._prepare_frr(node, ns, dirs)
        for daemon in daemons:
            record = ProcessRecord(node.name, daemon.name, ns, list(daemon.argv),
                                   str(dirs.log(daemon.name)))  # fmt: skip
            self.state.processes.append(record)
            self._save()
            record.pid = host.spawn(
                host.in_netns(ns, daemon.argv), env=_env(node), log=dirs.log(daemon.name)
            )
            self._save()
            log.info("started", extra={"op": "lab-up", "node": node.name,
                                       "daemon": daemon.name, "pid": record.pid})  # fmt: skip
        return daemons

    def _frr_daemons_file(self, node: LabNode) -> str | None:
        bind = node.bind_for(FRR_DAEMONS)
        return None if bind is None else _read_bound(node, bind.host, FRR_DAEMONS)

    def _prepare_frr(self, node: LabNode, instance: str, dirs: NodeDirs) -> None:
        bind = node.bind_for(FRR_CONFIG)
        assert bind is not None  # parsing guarantees it
        config = _read_bound(node, bind.host, FRR_CONFIG)
        run_dir = frr_run_dir(instance)
        self.state.paths.append(str(run_dir))
        self._save()
        # DESIGN §8: a leftover run directory from an earlier instance confuses a restart.
        shutil.rmtree(run_dir, ignore_errors=True)
        target = dirs.frr_config_dir / instance / "frr.conf"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(config)

    def _wait_ready(self, started: list[tuple[LabNode, Daemon]]) -> None:
        pids = {(p.node, p.daemon): p.pid for p in self.state.processes}
        waiting = list(started)
        deadline = time.monotonic() + READY_TIMEOUT
        while waiting:
            for node, daemon in list(waiting):
                pid = pids[(node.name, daemon.name)]
                if _serves(daemon):
                    waiting.remove((node, daemon))
                elif pid is None or not host.is_running(pid):
                    raise LabError(
                        f"{daemon.name} of node {node.name} exited during start-up; "
                        f"its log: {self.paths.node(node.name).log(daemon.name)}\n"
                        + _tail(self.paths.node(node.name).log(daemon.name))
                    )
            if waiting and time.monotonic() > deadline:
                names = ", ".join(f"{n.name}/{d.name}" for n, d in waiting)
                raise LabError(f"not serving after {READY_TIMEOUT:g} s: {names}")
            time.sleep(0.05)

    def _load_frr_config(self, node: LabNode) -> None:
        ns = self.topo.netns(node.name)
        argv = frr_load_argv(ns, self.paths.node(node.name))
        host.run(host.in_netns(ns, argv), what=f"load FRR config of {node.name}", env=_env(node))


def _serves(daemon: Daemon) -> bool:
    if daemon.readiness == Readiness.AGENT_ANSWERS:
        return agent_answers(daemon.ready_socket)
    return daemon.ready_socket.exists()


def _env(node: LabNode) -> dict[str, str]:
    """A node's processes see the host's environment plus the node's `env`, as containerlab
    passes `env` to the container."""
    return {**os.environ, **node.env}


def _read_bound(node: LabNode, path: Path, target: str) -> str:
    try:
        return path.read_text()
    except OSError as err:
        raise InvalidInput(
            f"topology.nodes.{node.name}.binds",
            f"cannot read {path} (bound to {target}): {err.strerror or err}",
        ) from None


def _tail(path: Path, lines: int = 10) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# --- tear down -------------------------------------------------------------------------------


def tear_down(state_dir: Path) -> LabState:
    """Remove everything the lab's state file records; the state as it was."""
    journal = StateFile(state_dir)
    with journal.locked():
        state = journal.load()
        state.phase = Phase.STOPPING
        journal.save(state)
        problems: list[str] = []
        paths = LabPaths(Path(state.state_dir))
        for pod in list(state.pods.values()):
            # Best effort, and only through an agent that answers: a hung one would hold
            # every CNI DEL for the shim's whole timeout.
            if agent_answers(paths.node(pod.node).agent_socket):
                with contextlib.suppress(L3FabricError):
                    detach_pod(state, pod)
        recorded = {
            p.pid: p for p in state.processes if p.pid is not None and host.matches(p.pid, p.argv)
        }
        problems += [
            f"{recorded[pid].daemon} of {recorded[pid].node} (pid {pid}) survived SIGKILL"
            for pid in host.stop(recorded)
        ]
        for ns in [*state.netns, *(p.netns for p in state.pods.values())]:
            problems += _remove_netns(ns)
        for path in state.paths:
            shutil.rmtree(path, ignore_errors=True)
            if Path(path).exists():
                problems.append(f"cannot remove {path}")
        if state.owned_store:  # always sqlite:PATH, made by bring_up
            store_file = state.store.partition(":")[2]
            for suffix in ("", "-wal", "-shm", "-journal", ".lock"):  # sqlite + SqliteStore
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f"{store_file}{suffix}")
        if problems:
            raise LabError("lab down left things behind (run it again):\n  " +
                           "\n  ".join(problems))  # fmt: skip
        journal.remove()
    log.info("lab down", extra={"op": "lab-down", "lab": state.lab})
    return state


def _remove_netns(ns: str) -> list[str]:
    # Whatever still runs in a lab namespace is the lab's: a daemon whose PID a crashed
    # `lab up` never recorded, or a process an exec line left behind. A live process would
    # keep the namespace (and its veths) alive after `ip netns del`.
    try:
        leftover = host.stop(host.netns_pids(ns))
        if leftover:
            return [f"pid {p} in {ns} survived SIGKILL" for p in leftover]
        host.delete_netns(ns)
    except LabError as err:
        return [str(err)]
    return []
