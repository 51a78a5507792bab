"""The lab state file: a journal of everything `lab up` and `lab pod add` create.

Every resource is written here *before* it is created, so `lab down` can remove everything
even after `lab up` crashed half-way (removing a recorded resource that was never created is
a no-op). The file lives in the lab's state directory (default
`/var/run/l3fabric/lab/<lab>/state.json`) and is replaced atomically (write, fsync, rename):
a crash leaves the previous version or the new one, never half of one.

Format (version 1):

    {
      "version": 1,
      "lab": "mesh3",                                  # topology name
      "topology": "/abs/path/mesh3.clab.yml",
      "state_dir": "/var/run/l3fabric/lab/mesh3",
      "store": "sqlite:/var/run/l3fabric/lab/mesh3/store.db",
      "owned_store": true,                             # created by `lab up`: down deletes it
      "phase": "starting" | "up" | "stopping",
      "nodes": {"n1": {"role": "l3fabric", "netns": "mesh3-n1"}, ...},   # the whole topology
      "netns": ["mesh3-n1", "mesh3-sw", ...],           # every namespace created, in order
      "bridges": [{"node": "sw", "netns": "mesh3-sw", "name": "sw"}],
      "links": [{"a": "n1:eth1", "b": "sw:eth1", "a_netns": "mesh3-n1", "b_netns": "mesh3-sw"}],
      "processes": [{"node": "n1", "daemon": "agent", "netns": "mesh3-n1",
                     "argv": [...], "log": ".../nodes/n1/agent.log", "pid": 4242}],
      "paths": ["/var/run/frr/mesh3-r1", ...],         # files/dirs to remove on down
      "pods": {"web": {"name": "web", "node": "n1", "namespace": "default",
                       "netns": "mesh3-web", "container_id": "mesh3-web",
                       "ifname": "eth0", "address": "10.244.0.1"}}
    }

`pid` is null between "about to start" and "started": `lab down` then finds the process by
its network namespace instead (see `l3fabric.lab.realise`). `argv` is what `/proc/PID/cmdline` reads
once `ip netns exec` has exec-ed the daemon; down only signals a PID whose command line still
matches, so a recycled PID is never killed.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from l3fabric.lab.errors import LabAlreadyUp, LabError, LabNotUp

FORMAT_VERSION = 1
DEFAULT_STATE_ROOT = Path("/var/run/l3fabric/lab")
STATE_FILE = "state.json"
LOCK_FILE = "state.lock"


class Phase:
    STARTING = "starting"
    UP = "up"
    STOPPING = "stopping"


@dataclass
class ProcessRecord:
    node: str
    daemon: str
    netns: str
    argv: list[str]
    log: str
    pid: int | None = None


@dataclass
class PodRecord:
    name: str
    node: str
    namespace: str
    netns: str
    container_id: str
    ifname: str = "eth0"
    address: str | None = None


@dataclass
class LabState:
    lab: str
    topology: str
    state_dir: str
    store: str
    owned_store: bool
    phase: str = Phase.STARTING
    nodes: dict[str, dict[str, str]] = field(default_factory=dict)
    netns: list[str] = field(default_factory=list)
    bridges: list[dict[str, str]] = field(default_factory=list)
    links: list[dict[str, str]] = field(default_factory=list)
    processes: list[ProcessRecord] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    pods: dict[str, PodRecord] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"version": FORMAT_VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> LabState:
        if doc.get("version") != FORMAT_VERSION:
            raise LabError(f"state file version {doc.get('version')!r} is not {FORMAT_VERSION}")
        fields = {k: v for k, v in doc.items() if k != "version"}
        fields["processes"] = [ProcessRecord(**p) for p in fields.get("processes", [])]
        fields["pods"] = {k: PodRecord(**p) for k, p in fields.get("pods", {}).items()}
        return cls(**fields)


def default_state_dir(lab: str) -> Path:
    return DEFAULT_STATE_ROOT / lab


class StateFile:
    """One lab's state file, and the lock that serialises the `lab` commands touching it."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir
        self.path = state_dir / STATE_FILE

    def exists(self) -> bool:
        return self.path.exists()

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the lab's lock: one `lab up/down/pod` at a time changes the journal."""
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def load(self) -> LabState:
        try:
            doc = json.loads(self.path.read_text())
        except FileNotFoundError:
            raise LabNotUp(f"no lab state at {self.path} (is the lab up?)") from None
        except (OSError, ValueError) as err:
            raise LabError(f"cannot read {self.path}: {err}") from None
        return LabState.from_json(doc)

    def refuse_if_present(self, lab: str) -> None:
        if self.exists():
            raise LabAlreadyUp(
                f"lab {lab!r} is already up, or its last `lab up` crashed "
                f"(state in {self.path}); run `l3fabric lab down` first"
            )

    def create(self, state: LabState) -> None:
        self.refuse_if_present(state.lab)
        self.save(state)

    def save(self, state: LabState) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as out:
            json.dump(state.to_json(), out, indent=2)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self.path)

    def remove(self) -> None:
        """Forget the lab: the state file and the lock, and the directory if now empty."""
        for name in (STATE_FILE, LOCK_FILE):
            with contextlib.suppress(FileNotFoundError):
                (self.dir / name).unlink()
        with contextlib.suppress(OSError):  # not empty: someone else's files, keep them
            self.dir.rmdir()


def find_state_dir(lab: str | None, state_dir: str | Path | None) -> Path:
    """The state directory the `lab pod` verbs act on: `--state-dir`, else `--lab`'s default,
    else the only lab that is up under the default root."""
    if state_dir:
        return Path(state_dir)
    if lab:
        return default_state_dir(lab)
    running = sorted(p.parent for p in DEFAULT_STATE_ROOT.glob(f"*/{STATE_FILE}"))
    if len(running) == 1:
        return running[0]
    if not running:
        raise LabNotUp(f"no lab is up under {DEFAULT_STATE_ROOT} (or pass --state-dir)")
    names = ", ".join(p.name for p in running)
    raise LabError(f"several labs are up ({names}): choose one with --lab or --state-dir")
