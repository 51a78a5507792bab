"""Labs for tests: topology files written to a temporary directory under a unique lab name,
and the real `l3fabric lab ...` console verbs run as processes against them.

Lab names are unique per test (the pid and a counter), so concurrent runs never share a
namespace. `close` runs `lab down`; if that fails it still deletes every namespace named
after the lab (killing what runs in them by PID), so a failing test leaks nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from l3fabric.lab import host
from tests.lab.schema import schema_errors

REPO = Path(__file__).resolve().parents[2]
_counter = iter(range(1_000_000))


@dataclass(frozen=True)
class Run:
    code: int
    out: str
    err: str


def l3fabric(*argv: str, timeout: float = 60) -> Run:
    env = {k: v for k, v in os.environ.items() if k != "L3FABRIC_STORE"}
    done = subprocess.run(
        [sys.executable, "-m", "l3fabric.cli", *argv], cwd=REPO, env=env,
        capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip
    return Run(done.returncode, done.stdout, done.stderr)


def in_netns(netns: str, *argv: str, timeout: float = 10) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", netns, *argv],
        capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


def pings(netns: str, address: str) -> bool:
    return in_netns(netns, "ping", "-c", "1", "-W", "2", address).returncode == 0


def lab_netns() -> set[str]:
    return {p.name for p in host.NETNS_DIR.iterdir()} if host.NETNS_DIR.exists() else set()


@dataclass
class Lab:
    """One topology file in `tmp`, named uniquely, and the `lab` verbs for it."""

    tmp: Path
    document: dict[str, Any]
    files: dict[str, str] = field(default_factory=dict)
    """Extra files beside the topology (bound configs), relative path -> text."""

    def __post_init__(self) -> None:
        self.name = f"lt{os.getpid() % 100000}x{next(_counter)}"
        self.document = {**self.document, "name": self.name}
        assert schema_errors(self.document) == []  # every test topology is valid containerlab
        self.tmp.mkdir(parents=True, exist_ok=True)
        for rel, text in self.files.items():
            (self.tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (self.tmp / rel).write_text(text)
        self.file = self.tmp / f"{self.name}.clab.yml"
        self.file.write_text(yaml.safe_dump(self.document, sort_keys=False))
        self.state_dir = self.tmp / "state"

    def netns(self, node: str) -> str:
        return f"{self.name}-{node}"

    def run(self, *argv: str, timeout: float = 60) -> Run:
        return l3fabric(*argv, timeout=timeout)

    def up(self, *extra: str) -> Run:
        return self.run("lab", "up", str(self.file), "--state-dir", str(self.state_dir), *extra)

    def up_ok(self, *extra: str) -> None:
        done = self.up(*extra)
        assert done.code == 0, done

    def down(self) -> Run:
        return self.run("lab", "down", str(self.file), "--state-dir", str(self.state_dir))

    def status(self) -> tuple[int, dict[str, Any]]:
        done = self.run("lab", "status", str(self.file), "--state-dir", str(self.state_dir),
                        "-o", "json")  # fmt: skip
        return done.code, json.loads(done.out) if done.out.strip() else {}

    def pod(self, verb: str, *argv: str) -> Run:
        return self.run("lab", "pod", verb, "--state-dir", str(self.state_dir), *argv)

    def up_process(self) -> subprocess.Popen[str]:
        """`lab up` as a process the test can kill half-way."""
        return subprocess.Popen(
            [sys.executable, "-m", "l3fabric.cli", "lab", "up", str(self.file),
             "--state-dir", str(self.state_dir)],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip

    def state(self) -> dict[str, Any]:
        return json.loads((self.state_dir / "state.json").read_text())

    def namespaces(self) -> set[str]:
        return {ns for ns in lab_netns() if ns.startswith(f"{self.name}-")}

    def close(self) -> None:
        if not (self.state_dir / "state.json").exists() and not self.namespaces():
            return
        done = self.down()
        if done.code == 0 and not self.namespaces():
            return
        for ns in self.namespaces():  # down failed: remove by name, kill by PID
            with contextlib.suppress(Exception):
                for pid in host.netns_pids(ns):
                    os.kill(pid, signal.SIGKILL)
                host.delete_netns(ns)


def wait_for(predicate: Any, timeout: float = 15, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)
