"""docs/architecture.md is the map of the code: every path and module it names must exist, and
the README's layout section must send readers to it."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "architecture.md"
ROOTS = ("l3fabric", "bgp_speaker", "cni", "ipam_blocks", "tests", "charts", "bench", "scripts")
PATH = re.compile(rf"\b(?:{'|'.join(ROOTS)})/[\w./-]*")
MODULE = re.compile(rf"`((?:{'|'.join(ROOTS[:4])})(?:\.\w+)+)`")


def named_paths(text: str) -> set[str]:
    return {m.group(0).rstrip(".") for m in PATH.finditer(text)}


def module_file(module: str) -> Path:
    base = REPO.joinpath(*module.split("."))
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


def test_every_path_in_the_doc_exists() -> None:
    paths = named_paths(DOC.read_text())
    assert len(paths) > 50  # the doc names the files; an empty match would prove nothing
    missing = sorted(p for p in paths if not (REPO / p).exists())
    assert not missing, f"docs/architecture.md names paths that do not exist: {missing}"


def test_every_module_in_the_doc_exists() -> None:
    modules = set(MODULE.findall(DOC.read_text()))
    assert len(modules) > 5
    missing = sorted(m for m in modules if not module_file(m).exists())
    assert not missing, f"docs/architecture.md names modules that do not exist: {missing}"


def test_the_checker_catches_a_missing_path() -> None:
    assert named_paths("see `bgp_speaker/nowhere.py` and bgp_speaker/kernel/fib.py.") == {
        "bgp_speaker/nowhere.py",
        "bgp_speaker/kernel/fib.py",
    }
    assert not (REPO / "bgp_speaker/nowhere.py").exists()


def test_every_package_room_is_on_the_map() -> None:
    text = DOC.read_text()
    rooms = [
        f"{p.parent.relative_to(REPO)}/"
        for root in ROOTS[:4]
        for p in (REPO / root).glob("*/__init__.py")
    ]
    assert rooms
    unmapped = sorted(room for room in rooms if f"`{room}`" not in text)
    assert not unmapped, f"folders missing from docs/architecture.md: {unmapped}"


def test_the_readme_layout_points_to_the_doc() -> None:
    readme = (REPO / "README.md").read_text()
    layout = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    assert "docs/architecture.md" in layout
    missing = sorted(p for p in named_paths(layout) if not (REPO / p).exists())
    assert not missing, f"README's Layout names paths that do not exist: {missing}"
    assert "../shared" not in readme
