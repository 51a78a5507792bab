"""The import contracts of pyproject.toml (import-linter) hold for the tree, and they are not
toothless: a copy of the tree with one module importing upward, or a pure core importing an
I/O module, is refused with the contract's name."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("ipam_blocks", "cni", "bgp_speaker", "l3fabric")
BROKEN = r" BROKEN( \(\d+ ignored imports?\))?$"
LINT_IMPORTS = "from importlinter.cli import lint_imports_command; lint_imports_command()"


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    # PYTHONPATH first, so the copy under `root` is analysed, not the installed tree; wide
    # columns, so a contract's name stays on one line.
    env = {**os.environ, "PYTHONPATH": str(root), "COLUMNS": "400"}
    return subprocess.run(
        [sys.executable, "-c", LINT_IMPORTS, "--no-cache"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def tree_copy(tmp_path: Path) -> Path:
    for package in PACKAGES:
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("*.pyc"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_the_tree_keeps_every_contract() -> None:
    run = lint_imports(REPO)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "BROKEN" not in run.stdout


def test_a_clean_copy_keeps_every_contract(tree_copy: Path) -> None:
    # The baseline for the violation tests below: the copy itself is not what fails.
    run = lint_imports(tree_copy)
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.parametrize(
    ("module", "source", "contract", "chain"),
    [
        (
            "ipam_blocks/upward.py",
            "from l3fabric import console\n",
            "Packages import downward",
            "ipam_blocks.upward -> l3fabric.console",
        ),
        (
            "bgp_speaker/bgp/upward.py",
            "from bgp_speaker.overlay import encap\n",
            "Node agent rooms import downward",
            "bgp_speaker.bgp.upward -> bgp_speaker.overlay.encap",
        ),
        (
            "bgp_speaker/bgp/doing_io.py",
            "import subprocess\n",
            "Pure cores do no I/O",
            "bgp_speaker.bgp.doing_io -> subprocess",
        ),
        (
            "cni/heavy.py",
            "import pyroute2\n",
            "The CNI shim imports only the standard library",
            "cni.heavy -> pyroute2",
        ),
        (
            "bgp_speaker/pods/kube_client.py",
            "import kubernetes\n",
            "Only the Kubernetes store backend imports kubernetes",
            "bgp_speaker.pods.kube_client -> kubernetes",
        ),
    ],
)
def test_a_violation_is_refused(
    tree_copy: Path, module: str, source: str, contract: str, chain: str
) -> None:
    (tree_copy / module).write_text(source)
    if module == "cni/heavy.py":
        # Only reachable from the shim counts: make the shim import it.
        shim = tree_copy / "cni" / "shim.py"
        shim.write_text(shim.read_text() + "\nimport cni.heavy  # noqa\n")
    run = lint_imports(tree_copy)
    assert run.returncode == 1, run.stdout + run.stderr
    broken = [line for line in run.stdout.splitlines() if re.search(BROKEN, line)]
    assert len(broken) == 1 and broken[0].startswith(contract), run.stdout
    assert chain in run.stdout, run.stdout
