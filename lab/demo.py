"""`l3fabric demo`: block IPAM at work on a throwaway embedded store.

Each step is an `l3fabric` command line, echoed as `$ l3fabric ...` and run in-process by
`l3fabric.cli.main`: the demo exercises exactly what users run, prints through the same
renderers, and its output doubles as a walkthrough. (The BGP fabric demo of DESIGN §7, with
pods on real network namespaces, arrives with the agent.)
"""

from __future__ import annotations

import contextlib
import io
import shlex
import shutil
import tempfile
from collections.abc import Sequence

from l3fabric.cli import EXIT_OK, main

POOL_CIDR = "10.244.0.0/16"
BLOCK_SIZE = 26
NAMESPACE = "demo"
# node -> (rack label, node address, its pods)
NODES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "node-a": ("r1", "192.168.0.1/24", ("web-0", "web-1", "web-2")),
    "node-b": ("r1", "192.168.0.2/24", ("api-0", "api-1")),
    "node-c": ("r2", "192.168.0.3/24", ("db-0", "db-1", "db-2")),
}
RELEASED_PODS = ("web-1", "db-2")


class StepFailed(Exception):
    def __init__(self, argv: Sequence[str], code: int) -> None:
        super().__init__(f"`l3fabric {shlex.join(argv)}` exited {code}")
        self.code = code


class _Session:
    """Runs CLI steps against one store, echoing each command line first."""

    def __init__(self, store_url: str) -> None:
        self.store_url = store_url

    def _main(self, argv: Sequence[str]) -> int:
        print(f"$ l3fabric {shlex.join(argv)}", flush=True)
        return main([*argv, "--store", self.store_url])

    def run(self, *argv: str, ok: Sequence[int] = (EXIT_OK,)) -> int:
        code = self._main(argv)
        if code not in ok:
            raise StepFailed(argv, code)
        return code

    def capture(self, *argv: str) -> str:
        """Run a step whose output the demo needs (an assigned address); echo it too."""
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            code = main([*argv, "--store", self.store_url])
        print(f"$ l3fabric {shlex.join(argv)}\n{buffer.getvalue()}", end="", flush=True)
        if code != EXIT_OK:
            raise StepFailed(argv, code)
        return buffer.getvalue().strip()


def _say(text: str) -> None:
    print(f"\n# {text}", flush=True)


def _handle(pod: str) -> str:
    return f"{NAMESPACE}.{pod}"


def _script(session: _Session) -> int:
    _say(f"one pool, carved into /{BLOCK_SIZE} blocks that nodes claim on demand")
    session.run("pool", "add", "default", "--cidr", POOL_CIDR, "--block-size", str(BLOCK_SIZE))
    _say("three nodes")
    for node, (rack, address, _) in NODES.items():
        session.run("node", "add", node, "--label", f"rack={rack}", "--ipv4", address)
    _say("pods get addresses from a block affine to their node (claimed on first use)")
    addresses: dict[str, str] = {}
    for node, (_, _, pods) in NODES.items():
        for pod in pods:
            addresses[pod] = session.capture(
                "ipam", "assign", "--node", node, "--handle", _handle(pod),
                "--pod", pod, "--namespace", NAMESPACE,
            )  # fmt: skip
    _say("pods go away: their addresses return to the tail of their block's free list")
    for pod in RELEASED_PODS:
        session.run("ipam", "release", "--handle", _handle(pod))
    _say("who holds an address, and one that was released")
    session.run("ipam", "show", "--ip", addresses["web-0"])
    session.run("ipam", "show", "--ip", addresses[RELEASED_PODS[0]])
    _say("a pool whose addresses are in use cannot be deleted (exit 1)")
    session.run("pool", "delete", "default", ok=(1,))
    _say("usage per pool and per block")
    session.run("ipam", "show", "--show-blocks")
    _say("consistency: no leaks, handles match allocations, every block adds up")
    return session.run("ipam", "check", ok=(0, 1))


def run_demo(keep: bool = False) -> int:
    """Run the demo in a fresh temporary store; 0 when `ipam check` comes out clean."""
    workdir = tempfile.mkdtemp(prefix="l3fabric-demo-")
    store_url = f"sqlite:{workdir}/store.db"
    print(f"# a throwaway embedded store: {store_url}")
    try:
        return _script(_Session(store_url))
    except StepFailed as e:
        print(f"demo failed: {e}", flush=True)
        return e.code
    finally:
        if keep:
            print(f"\n# kept: L3FABRIC_STORE={store_url}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
