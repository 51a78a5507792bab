"""`l3fabric demo`: the fabric demo end to end, and the topology it embeds."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from l3fabric.lab import demo, host
from l3fabric.lab.demo import MESH3_CLAB_YML, PODS, REACHABLE, UNREACHABLE

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "tests" / "topologies" / "mesh3.clab.yml"
POD_NAMES = [pod for pods in PODS.values() for pod in pods]


def test_embedded_topology_is_the_shipped_mesh3() -> None:
    # The demo carries mesh3 as a string so an installed `l3fabric demo` works from any
    # directory; it must stay the very file that is validated against containerlab's schema.
    assert SHIPPED.read_text() == MESH3_CLAB_YML


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{proc.name}: {cmdline}")
    return found


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ping") is None or shutil.which("ip") is None,
    reason="needs root, iproute2 and ping",
)
def test_demo_proves_every_pod_reaches_every_pod_and_leaves_nothing_behind() -> None:
    env = {k: v for k, v in os.environ.items() if k != "L3FABRIC_STORE"}
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "l3fabric.cli", "demo"], cwd="/", env=env,
        capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    took = time.monotonic() - start
    print(f"\n`l3fabric demo` took {took:.1f} s\n{done.stdout}{done.stderr}")
    assert done.returncode == 0, done.stdout + done.stderr

    lab = re.search(r"^l3fabric demo: lab (\S+),", done.stdout, re.M)
    workdir = re.search(r"^lab state and embedded store: (\S+)$", done.stdout, re.M)
    assert lab and workdir, done.stdout
    # The matrix: one row per pod, one ✓ per pod, no ✗ anywhere.
    rows = [
        line for line in done.stdout.splitlines()
        if re.match(r"^\W*(" + "|".join(map(re.escape, POD_NAMES)) + r") \(n\d\)", line)
    ]  # fmt: skip
    assert len(rows) == len(POD_NAMES), done.stdout
    for row in rows:
        assert row.count(REACHABLE) == len(POD_NAMES), row
    assert UNREACHABLE not in done.stdout
    assert f"{len(POD_NAMES) ** 2}/{len(POD_NAMES) ** 2} pod pairs reachable" in done.stdout
    assert "IPv4 BGP status" in done.stdout and "IP pool usage" in done.stdout
    assert "ipam check: clean" in done.stdout

    # Nothing left: no namespace of the lab, no process started from its directory, no files.
    leftover_netns = sorted(
        p.name for p in host.NETNS_DIR.glob(f"{lab.group(1)}-*")
    ) if host.NETNS_DIR.exists() else []  # fmt: skip
    assert leftover_netns == []
    assert _processes_mentioning(workdir.group(1)) == []
    assert not Path(workdir.group(1)).exists()


def test_demo_refuses_to_run_without_root(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(demo.os, "geteuid", lambda: 1000)
    assert demo.run_demo() == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and "needs root" in err, err
