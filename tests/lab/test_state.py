"""The lab state file: round trip, atomic replacement, refusal while a lab is up."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from l3fabric.lab import state as lab_state
from l3fabric.lab.errors import LabAlreadyUp, LabError, LabNotUp
from l3fabric.lab.state import LabState, PodRecord, ProcessRecord, StateFile, find_state_dir


def sample(tmp: Path) -> LabState:
    s = LabState("t", "/t.clab.yml", str(tmp), "sqlite:/x.db", True)
    s.netns.append("t-a")
    s.processes.append(ProcessRecord("a", "bird", "t-a", ["bird", "-f"], "/log", None))
    s.pods["web"] = PodRecord("web", "a", "default", "t-web", "t-web", address="10.0.0.1")
    return s


def test_round_trip(tmp_path: Path) -> None:
    journal = StateFile(tmp_path / "lab")
    journal.create(sample(tmp_path))
    assert journal.load() == sample(tmp_path)
    doc = json.loads(journal.path.read_text())
    assert doc["version"] == 1 and doc["phase"] == "starting"
    assert doc["processes"][0]["pid"] is None
    assert not list((tmp_path / "lab").glob("*.tmp"))  # replaced, not left behind


def test_refuses_a_second_create(tmp_path: Path) -> None:
    journal = StateFile(tmp_path)
    journal.create(sample(tmp_path))
    with pytest.raises(LabAlreadyUp, match="lab down"):
        journal.create(sample(tmp_path))


def test_missing_and_unreadable(tmp_path: Path) -> None:
    with pytest.raises(LabNotUp):
        StateFile(tmp_path).load()
    (tmp_path / "state.json").write_text("{")
    with pytest.raises(LabError, match="cannot read"):
        StateFile(tmp_path).load()


def test_remove_keeps_foreign_files(tmp_path: Path) -> None:
    journal = StateFile(tmp_path / "lab")
    with journal.locked():
        journal.create(sample(tmp_path))
    (tmp_path / "lab" / "mine.txt").write_text("x")
    journal.remove()
    assert sorted(p.name for p in (tmp_path / "lab").iterdir()) == ["mine.txt"]
    (tmp_path / "lab" / "mine.txt").unlink()
    journal.remove()
    assert not (tmp_path / "lab").exists()


def test_find_state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lab_state, "DEFAULT_STATE_ROOT", tmp_path)
    assert find_state_dir(None, "/x") == Path("/x")
    assert find_state_dir("lab1", None) == tmp_path / "lab1"
    with pytest.raises(LabNotUp):
        find_state_dir(None, None)
    for name in ("lab1", "lab2"):
        StateFile(tmp_path / name).create(sample(tmp_path))
        if name == "lab1":
            assert find_state_dir(None, None) == tmp_path / "lab1"
    with pytest.raises(LabError, match="several labs"):
        find_state_dir(None, None)
