"""`l3fabric cni install`: the plugin launcher and the conflist."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from cni.install import CONFLIST_NAME, PLUGIN_NAME, install, render_conflist
from ipam_blocks.errors import InvalidInput
from l3fabric.cli import main

REPO = Path(__file__).resolve().parents[2]


def test_the_shipped_example_is_what_install_writes() -> None:
    example = json.loads((REPO / "examples" / CONFLIST_NAME).read_text())
    assert example == render_conflist(mtu=1500)
    assert [p["type"] for p in example["plugins"]] == ["l3fabric", "tuning", "portmap"]


def test_install_writes_a_runnable_plugin_and_the_conflist(tmp_path: Path) -> None:
    done = install(tmp_path / "bin", tmp_path / "net.d", mtu=1400, socket="/run/x.sock")
    assert done.plugin == tmp_path / "bin" / PLUGIN_NAME
    assert os.access(done.plugin, os.X_OK)
    conf = json.loads(done.conflist.read_text())
    assert conf["plugins"][0] == {
        "type": "l3fabric", "mtu": 1400, "socket": "/run/x.sock", "log_level": "info",
        "ipam": {"pools": []},
    }  # fmt: skip
    # Run as a runtime runs it: by path, with a bare environment.
    run = subprocess.run(
        [str(done.plugin)], input=b"{}", env={"CNI_COMMAND": "VERSION"}, capture_output=True
    )
    assert run.returncode == 0, run
    assert json.loads(run.stdout)["supportedVersions"] == ["0.4.0", "1.0.0", "1.1.0"]
    # Reinstalling replaces both atomically and leaves no temporary files behind.
    install(tmp_path / "bin", tmp_path / "net.d")
    assert sorted(p.name for p in (tmp_path / "bin").iterdir()) == [PLUGIN_NAME]
    assert sorted(p.name for p in (tmp_path / "net.d").iterdir()) == [CONFLIST_NAME]
    assert "mtu" not in json.loads(done.conflist.read_text())["plugins"][0]


def test_the_cli_verb(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["cni", "install", "--bin-dir", str(tmp_path / "b"), "--conf-dir", str(tmp_path / "c")]
    assert main([*argv, "--mtu", "9000"]) == 0
    assert CONFLIST_NAME in capsys.readouterr().out
    assert main([*argv, "--mtu", "10"]) == 2
    assert "mtu" in capsys.readouterr().err


def test_invalid_settings() -> None:
    with pytest.raises(InvalidInput, match="socket"):
        render_conflist(socket="relative")
