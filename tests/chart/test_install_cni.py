"""files/install-cni.sh, the agent's init container: it copies the plugin's Python runtime (and
nothing else) from the image to the host under a versioned name, switches the host's symlink
in one rename, keeps the previous copy, drops older ones, then runs `l3fabric cni install`.
Run here with /bin/sh on a tree laid out like the image's /opt/l3fabric/python."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest

from l3fabric.cli import build_parser
from tests.chart.conftest import CHART_DIR

SCRIPT = CHART_DIR / "files" / "install-cni.sh"
STDLIB = "lib/python3.11"


def make_image(root: Path, bundle_id: str) -> Path:
    """The image's /opt/l3fabric/python, in miniature."""
    py = root / "opt" / "l3fabric" / "python"
    files = {
        "bin/python3.11": "interpreter",
        "bin/l3fabric": "#!console script",
        "lib/libpython3.11.so.1.0": "libpython",
        f"{STDLIB}/os.py": "stdlib",
        f"{STDLIB}/json/__init__.py": "stdlib",
        f"{STDLIB}/lib-dynload/_socket.so": "extension",
        f"{STDLIB}/site-packages/cni/shim.py": "the plugin",
        f"{STDLIB}/site-packages/kubernetes/client.py": "not for the host",
        ".bundle-id": bundle_id + "\n",
    }
    for name, text in files.items():
        (py / name).parent.mkdir(parents=True, exist_ok=True)
        (py / name).write_text(text)
    (py / "bin" / "python3").symlink_to("python3.11")
    return py


def run(tmp: Path, image: Path, *, ok: bool = True) -> subprocess.CompletedProcess[str]:
    calls = tmp / "calls"
    fake_cli = tmp / "fake-l3fabric"
    fake_cli.write_text(f'#!/bin/sh\necho "$@" >> {shlex.quote(str(calls))}\n')
    fake_cli.chmod(0o755)
    env = {
        "PATH": os.environ["PATH"],
        "L3FABRIC_PYTHON": str(image),
        "HOST_INSTALL_DIR": str(tmp / "host" / "opt" / "l3fabric"),
        "CNI_BIN_DIR": str(tmp / "host" / "opt" / "cni" / "bin"),
        "CNI_CONF_DIR": str(tmp / "host" / "etc" / "cni" / "net.d"),
        "CNI_MTU": "1450",
        "L3FABRIC": str(fake_cli),
    }
    done = subprocess.run(
        ["/bin/sh", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=30
    )
    assert (done.returncode == 0) is ok, done.stderr
    return done


def host(tmp: Path) -> Path:
    return tmp / "host" / "opt" / "l3fabric"


def tree(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*") if not p.is_dir()}


def test_copies_only_the_plugin_runtime_then_installs(tmp_path):
    image = make_image(tmp_path / "img", "0123abcd")
    run(tmp_path, image)
    copy = host(tmp_path) / "python-0123abcd"
    assert tree(copy) == {
        ".bundle-id",
        "bin/python3",
        "bin/python3.11",
        "lib/libpython3.11.so.1.0",
        f"{STDLIB}/os.py",
        f"{STDLIB}/json/__init__.py",
        f"{STDLIB}/lib-dynload/_socket.so",
        f"{STDLIB}/site-packages/cni/shim.py",
    }
    assert (copy / "bin" / "python3").is_symlink()
    assert os.readlink(host(tmp_path) / "python") == "python-0123abcd"
    # The launcher's #! path (/opt/l3fabric/python/bin/python3) resolves through the symlink.
    assert (host(tmp_path) / "python" / "bin" / "python3").read_text() == "interpreter"
    (call,) = (tmp_path / "calls").read_text().splitlines()
    args = build_parser().parse_args(call.split())
    assert (args.bin_dir, args.conf_dir, args.mtu) == (
        str(tmp_path / "host/opt/cni/bin"),
        str(tmp_path / "host/etc/cni/net.d"),
        1450,
    )
    assert args.socket == "/var/run/l3fabric/agent.sock"


def test_rerun_with_the_same_image_copies_nothing(tmp_path):
    image = make_image(tmp_path / "img", "0123abcd")
    first = run(tmp_path, image)
    assert "copied" in first.stderr
    marker = host(tmp_path) / "python-0123abcd" / "bin" / "python3.11"
    marker.write_text("in use by a running plugin")
    second = run(tmp_path, image)
    assert "copied" not in second.stderr
    assert marker.read_text() == "in use by a running plugin"
    assert len((tmp_path / "calls").read_text().splitlines()) == 2  # the config is rewritten


def test_upgrades_switch_the_link_keep_the_previous_and_drop_older(tmp_path):
    for bundle in ("aaaa", "bbbb", "cccc"):
        run(tmp_path, make_image(tmp_path / f"img-{bundle}", bundle))
        assert os.readlink(host(tmp_path) / "python") == f"python-{bundle}"
    assert sorted(p.name for p in host(tmp_path).iterdir()) == [
        "python",
        "python-bbbb",
        "python-cccc",
    ]


def test_an_interrupted_copy_is_made_again(tmp_path):
    image = make_image(tmp_path / "img", "0123abcd")
    half = host(tmp_path) / "python-0123abcd" / "bin"
    half.mkdir(parents=True)  # a copy without its .bundle-id: interrupted
    (host(tmp_path) / ".staging-0123abcd").mkdir()
    run(tmp_path, image)
    assert (host(tmp_path) / "python-0123abcd" / ".bundle-id").read_text() == "0123abcd\n"
    assert not (host(tmp_path) / ".staging-0123abcd").exists()


@pytest.mark.parametrize("bundle_id", ["", "../etc", "ABC DEF"])
def test_a_bad_bundle_id_is_refused(tmp_path, bundle_id):
    done = run(tmp_path, make_image(tmp_path / "img", bundle_id), ok=False)
    assert "bad bundle id" in done.stderr
    assert not (tmp_path / "calls").exists()
