"""The `demo` verb and the `lab` verbs: containerlab topologies realised in namespaces.

    l3fabric lab up FILE [--state-dir DIR] [--store URL] [--pool-cidr CIDR] [--block-size N]
    l3fabric lab down FILE [--state-dir DIR]
    l3fabric lab status FILE [--state-dir DIR] [-o table|json]     exit 1 unless all is well
    l3fabric lab register FILE [--store URL] [--pool-cidr CIDR] [--block-size N]
    l3fabric lab pod add NODE NAME [--namespace NS] [--lab LAB | --state-dir DIR]
    l3fabric lab pod del NAME [--lab LAB | --state-dir DIR]
    l3fabric lab pod exec NAME [--lab LAB | --state-dir DIR] -- CMD...

A lab's state directory defaults to /var/run/l3fabric/lab/<lab name>; the `pod` verbs act on
the only lab that is up unless --lab or --state-dir says which.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from netaddr import AddrFormatError, IPNetwork
from rich.table import Table

from ipam_blocks.errors import InvalidInput, L3FabricError
from ipam_blocks.model import IPPool
from l3fabric.console import EXIT_FAILED, EXIT_OK, make_console, verb_group
from l3fabric.lab.errors import LabAlreadyUp
from l3fabric.lab.realise import DEFAULT_POOL
from l3fabric.lab.state import DEFAULT_STATE_ROOT, StateFile, default_state_dir, find_state_dir
from l3fabric.lab.status import LabStatus
from l3fabric.lab.topology import Role, Topology, parse_lab_name, parse_topology_yaml


def register(subparsers: argparse._SubParsersAction) -> None:
    demo = subparsers.add_parser(
        "demo",
        help="bring up a three-node BGP fabric in namespaces and prove pod-to-pod reachability",
        description="As root: realise the mesh3 topology in network namespaces with a "
        "temporary embedded store, start two pods per node through the real CNI plugin, wait "
        "for the BGP sessions and routes, ping every pod from every pod, print `node status` "
        "and `ipam show --show-blocks`, and tear everything down. Exits 0 only if every pair "
        "was reachable. Ignores --store: the demo never touches a real store.",
    )
    demo.add_argument(
        "--keep", action="store_true", help="leave the lab up and print the `lab down` command"
    )
    demo.set_defaults(handler=_demo)
    _register_lab(subparsers)


def _demo(args: argparse.Namespace) -> int:
    # Imported here: the demo pulls in the whole CLI, which imports this module.
    from l3fabric.lab.demo import run_demo

    return run_demo(keep=args.keep)


# --- lab -------------------------------------------------------------------------------------


def _register_lab(subparsers: argparse._SubParsersAction) -> None:
    lab = verb_group(
        subparsers,
        "lab",
        help="realise containerlab topology files in network namespaces (no Docker)",
    )
    state_help = f"the lab's state directory (default: {DEFAULT_STATE_ROOT}/<lab name>)"

    up = lab.add_parser(
        "up",
        help="create the lab: namespaces, links, exec lines, daemons, agents",
        description="Realise FILE: a namespace per node, a veth pair per link, bridges for "
        "`kind: bridge` nodes, `exec` lines, FRR/BIRD daemons and an l3fabric agent per "
        "l3fabric node. Refused while the lab is up (or after a crashed `lab up`: run "
        "`lab down` first). Without --store the lab gets its own embedded store in its "
        "state directory ($L3FABRIC_STORE is not used); l3fabric nodes are registered in "
        "it, and a default pool is added when it has none.",
    )
    up.add_argument("file", type=Path, metavar="FILE", help="containerlab topology file")
    up.add_argument("--state-dir", metavar="DIR", help=state_help)
    up.add_argument(
        "--pool-cidr",
        default=str(DEFAULT_POOL.cidr),
        metavar="CIDR",
        help=f"CIDR of the pool added to a store without pools (default: {DEFAULT_POOL.cidr})",
    )
    up.add_argument(
        "--block-size",
        type=int,
        default=DEFAULT_POOL.block_size,
        metavar="N",
        help=f"block prefix length of that pool (default: {DEFAULT_POOL.block_size})",
    )
    up.set_defaults(handler=_lab_up)

    down = lab.add_parser(
        "down",
        help="remove everything the lab created (also after a crashed `lab up`)",
        description="Stop the lab's processes, delete its namespaces (with their links and "
        "bridges), its files and its own store, working from the state file alone.",
    )
    down.add_argument("file", type=Path, metavar="FILE", help="containerlab topology file")
    down.add_argument("--state-dir", metavar="DIR", help=state_help)
    down.set_defaults(handler=_lab_down)

    status = lab.add_parser(
        "status",
        help="nodes, namespaces, processes, agents and pods of a lab",
        description="Exit 0 when the lab is up and every namespace, process and agent is "
        "there, else 1.",
    )
    status.add_argument("file", type=Path, metavar="FILE", help="containerlab topology file")
    status.add_argument("--state-dir", metavar="DIR", help=state_help)
    status.add_argument("-o", "--output", choices=("table", "json"), default="table")
    status.set_defaults(handler=_lab_status)

    register = lab.add_parser(
        "register",
        help="put a topology's objects and nodes into a store (for labs containerlab runs)",
        description="What `lab up` does to its store before the agents start, for a store "
        "of your choosing (--store): apply the objects file bound at "
        "/etc/l3fabric/objects.yaml (BGPPeers, BGPConfiguration, IPPools), add a default "
        "pool when there is none, and a Node record per l3fabric node from its labels. "
        "Creates no namespace and starts nothing: use it when real containerlab runs FILE.",
    )
    register.add_argument("file", type=Path, metavar="FILE", help="containerlab topology file")
    register.add_argument(
        "--pool-cidr",
        default=str(DEFAULT_POOL.cidr),
        metavar="CIDR",
        help=f"default pool CIDR (default: {DEFAULT_POOL.cidr})",
    )
    register.add_argument(
        "--block-size",
        type=int,
        default=DEFAULT_POOL.block_size,
        metavar="N",
        help=f"(default: {DEFAULT_POOL.block_size})",
    )
    register.set_defaults(handler=_lab_register)

    pod = verb_group(lab, "pod", help="pods on lab nodes, attached through the real CNI path")
    add = pod.add_parser(
        "add",
        help="create a pod namespace and run the CNI plugin for it on NODE; prints its address",
        description="Create the pod's network namespace <lab>-<NAME> and run `l3fabric-cni` "
        "ADD inside NODE's namespace against NODE's agent, as a container runtime would.",
    )
    add.add_argument("node", metavar="NODE", help="an l3fabric node of the lab")
    add.add_argument("name", metavar="NAME", help="pod name")
    add.add_argument("--namespace", default="default", help="Kubernetes namespace of the pod")
    pod_del = pod.add_parser("del", help="run CNI DEL for a pod and delete its namespace")
    pod_del.add_argument("name", metavar="NAME", help="pod name")
    pod_exec = pod.add_parser(
        "exec",
        help="run a command in a pod's namespace",
        description="Run CMD in the pod's network namespace (`ip netns exec`); exits with "
        "CMD's exit status.",
    )
    pod_exec.add_argument("name", metavar="NAME", help="pod name")
    # REMAINDER: the command's own options must reach it untouched. argparse then also takes
    # our options when they follow NAME; `_pod_exec` picks those out of what precedes `--`.
    pod_exec.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD")
    for parser, handler in ((add, _pod_add), (pod_del, _pod_del), (pod_exec, _pod_exec)):
        which = parser.add_mutually_exclusive_group()
        which.add_argument("--lab", metavar="LAB", help="lab name (default: the only lab up)")
        which.add_argument("--state-dir", metavar="DIR", help="the lab's state directory")
        parser.set_defaults(handler=handler)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as err:
        raise InvalidInput("FILE", f"cannot read {path}: {err.strerror or err}") from None


def _load(path: Path) -> Topology:
    return parse_topology_yaml(_read(path), path.resolve().parent)


def _state_dir(args: argparse.Namespace) -> Path:
    # down/status need only the lab's name: they work from the state file, even when the
    # topology file has since been edited into something `lab up` would refuse.
    return (
        _absolute(args.state_dir)
        if args.state_dir
        else default_state_dir(parse_lab_name(_read(args.file)))
    )


def _lab_up(args: argparse.Namespace) -> int:
    from l3fabric.lab.realise import (
        bring_up,  # netlink-free, but pulls the store and agent client in
    )
    from l3fabric.lab.status import inspect_lab

    topology = _load(args.file)
    try:
        pool = IPPool("default", IPNetwork(args.pool_cidr), args.block_size)
    except (AddrFormatError, ValueError):
        raise InvalidInput("pool-cidr", f"{args.pool_cidr!r} is not a CIDR") from None
    state_dir = _absolute(args.state_dir) if args.state_dir else default_state_dir(topology.name)
    try:
        state = bring_up(
            topology, args.file.resolve(), state_dir, getattr(args, "store", None), pool
        )
    except LabAlreadyUp:
        raise  # its message says what to do
    except L3FabricError:
        if StateFile(state_dir).exists():
            print(f"lab up failed part-way: `l3fabric lab down {args.file}"
                  + (f" --state-dir {state_dir}`" if args.state_dir else "`")
                  + " removes what it created", file=sys.stderr)  # fmt: skip
        raise
    console = make_console()
    console.print(f"lab {topology.name} is up; state in {state_dir}")
    console.print(render_status(inspect_lab(state)))
    return EXIT_OK


def _lab_register(args: argparse.Namespace) -> int:
    from ipam_blocks.store import default_store_url, open_store
    from l3fabric.lab.objects import register_topology

    topology = _load(args.file)
    try:
        pool = IPPool("default", IPNetwork(args.pool_cidr), args.block_size)
    except (AddrFormatError, ValueError):
        raise InvalidInput("pool-cidr", f"{args.pool_cidr!r} is not a CIDR") from None
    url = getattr(args, "store", None) or default_store_url()
    store = open_store(url)
    try:
        applied = register_topology(store, topology, pool)
    finally:
        store.close()
    nodes = ", ".join(n.name for n in topology.by_role(Role.AGENT)) or "none"
    print(f"{len(applied)} objects applied, nodes {nodes} registered in {url}")
    return EXIT_OK


def _lab_down(args: argparse.Namespace) -> int:
    from l3fabric.lab.realise import tear_down

    state = tear_down(_state_dir(args))
    print(f"lab {state.lab} is down")
    return EXIT_OK


def _lab_status(args: argparse.Namespace) -> int:
    from l3fabric.lab.status import inspect_lab

    status = inspect_lab(StateFile(_state_dir(args)).load())
    if args.output == "json":
        print(json.dumps(status.to_json(), indent=2))
    else:
        make_console().print(render_status(status))
    return EXIT_OK if status.healthy else EXIT_FAILED


def _pod_journal(args: argparse.Namespace) -> StateFile:
    return StateFile(find_state_dir(args.lab, args.state_dir and _absolute(args.state_dir)))


def _absolute(path: str) -> Path:
    # Recorded in the state file and passed to daemons: it must not depend on the cwd.
    return Path(path).absolute()


def _pod_add(args: argparse.Namespace) -> int:
    from l3fabric.lab.pods import attach_pod

    pod = attach_pod(_pod_journal(args), args.node, args.name, args.namespace)
    print(pod.address)
    return EXIT_OK


def _pod_del(args: argparse.Namespace) -> int:
    from l3fabric.lab.pods import delete_pod

    delete_pod(_pod_journal(args), args.name)
    return EXIT_OK


def _pod_exec(args: argparse.Namespace) -> int:
    from l3fabric.lab.pods import exec_in_pod

    command: list[str] = args.command
    if "--" in command:  # `exec NAME [--lab LAB | --state-dir DIR] -- CMD...`
        split = command.index("--")
        ours, command = command[:split], command[split + 1 :]
        if ours:
            which = argparse.ArgumentParser(prog="l3fabric lab pod exec NAME", add_help=False)
            which.add_argument("--lab")
            which.add_argument("--state-dir")
            given, unknown = which.parse_known_args(ours)
            if unknown:
                raise InvalidInput("command", f"unknown options before `--`: {' '.join(unknown)}")
            args.lab, args.state_dir = given.lab or args.lab, given.state_dir or args.state_dir
    return exec_in_pod(_pod_journal(args), args.name, command)


def render_status(status: LabStatus) -> Table:
    table = Table(title=f"lab {status.lab} ({status.phase})", caption=f"store: {status.store}")
    for column in ("NODE", "ROLE", "NETNS", "PROCESSES", "AGENT"):
        table.add_column(column, no_wrap=True)
    for node in status.nodes:
        procs = " ".join(
            f"{p.daemon}:{p.pid if p.pid is not None else '?'}:{'up' if p.running else 'DOWN'}"
            for p in node.processes
        )
        agent = {None: "-", True: "answers", False: "NOT ANSWERING"}[node.agent_answers]
        netns = node.netns if node.netns_present else f"{node.netns} (MISSING)"
        table.add_row(node.name, node.role, netns, procs or "-", agent)
    for pod in status.pods:
        netns = pod.pod.netns if pod.netns_present else f"{pod.pod.netns} (MISSING)"
        table.add_row(
            f"pod {pod.pod.name}", f"on {pod.pod.node}", netns, pod.pod.namespace,
            pod.pod.address or "-",
        )  # fmt: skip
    return table
