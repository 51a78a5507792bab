"""Where a lab's files live, under its state directory.

- `state.json`: the journal (`l3fabric.lab.state`);
- `store.db`: the lab's own embedded store, when `lab up` got no --store;
- `nodes/<node>/`: one node's daemon logs (`<daemon>.log`), `agent.sock` and the agent's
  --state-dir (`agent/`), BIRD's `bird.ctl` and `bird.pid`, and `frr/<instance>/frr.conf`
  (vtysh's --config_dir).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

STORE_FILE = "store.db"


@dataclass(frozen=True)
class NodeDirs:
    """The files of one node: `<state_dir>/nodes/<node>/`."""

    root: Path

    @property
    def agent_socket(self) -> Path:
        return self.root / "agent.sock"

    @property
    def agent_state(self) -> Path:
        return self.root / "agent"

    @property
    def bird_socket(self) -> Path:
        return self.root / "bird.ctl"

    @property
    def bird_pidfile(self) -> Path:
        return self.root / "bird.pid"

    @property
    def frr_config_dir(self) -> Path:
        """vtysh's --config_dir: it reads `<dir>/<instance>/frr.conf`."""
        return self.root / "frr"

    def log(self, daemon: str) -> Path:
        return self.root / f"{daemon}.log"


@dataclass(frozen=True)
class LabPaths:
    """The files of one lab."""

    state_dir: Path

    @property
    def nodes(self) -> Path:
        return self.state_dir / "nodes"

    def node(self, name: str) -> NodeDirs:
        return NodeDirs(self.nodes / name)

    @property
    def store_url(self) -> str:
        return f"sqlite:{self.state_dir / STORE_FILE}"
