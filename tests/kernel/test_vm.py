"""Runs tests/kernel/test_ipip.py inside a throw-away VM whose kernel has IP-in-IP (this
machine's has none), and asserts the inner pytest passed without skipping anything.

DESIGN §8: virtme-ng (`vng`, PyPI) boots Debian's `linux-image-amd64` kernel over this
machine's own filesystem with qemu (`qemu-system-x86`, `busybox-static`). Always
`--disable-kvm` (no KVM here), always a timeout, stdout and stderr kept apart, and the
guest writes only to a directory passed with `--rwdir`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
INNER = "tests/kernel/test_ipip.py"
VM_TIMEOUT = 420  # seconds: boot ≈ 10 s, the inner tests ≈ 1-2 min under emulation
IN_VM = "L3FABRIC_IN_VM"


def _kernel() -> Path | None:
    images = sorted(Path("/boot").glob("vmlinuz-*"))
    return images[-1] if images else None


def _missing() -> str:
    if os.environ.get(IN_VM):
        return "already inside the VM"
    if os.geteuid() != 0:
        return "needs root"
    missing = [t for t in ("vng", "qemu-system-x86_64", "busybox") if shutil.which(t) is None]
    if missing:
        return f"{', '.join(missing)} not installed (pip install virtme-ng; apt-get install " \
            "qemu-system-x86 busybox-static)"  # fmt: skip
    if _kernel() is None:
        return "no kernel image in /boot (apt-get install linux-image-amd64)"
    return ""


pytestmark = [
    pytest.mark.vm,
    pytest.mark.slow,
    pytest.mark.root,
    pytest.mark.skipif(bool(_missing()), reason=_missing() or "ok"),
]


def test_ipip_inside_a_vm(tmp_path: Path) -> None:
    out = tmp_path / "vm"
    out.mkdir()
    out.chmod(0o777)
    junit, log, rc = out / "junit.xml", out / "pytest.log", out / "rc"
    inner = (
        f"cd {REPO} && {IN_VM}=1 PYTHONDONTWRITEBYTECODE=1 {sys.executable} -m pytest -q "
        f"-p no:cacheprovider -o addopts= {INNER} --junitxml={junit} -rs "
        f"> {log} 2>&1; echo $? > {rc}"
    )
    argv = [
        "timeout", str(VM_TIMEOUT), "vng", "--run", str(_kernel()), "--disable-kvm",
        "--memory", "2G", "--rwdir", str(out), "--exec", inner,
    ]  # fmt: skip
    done = subprocess.run(
        argv, cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True, text=True,
        timeout=VM_TIMEOUT + 30, check=False,
    )  # fmt: skip
    text = log.read_text(errors="replace") if log.exists() else "(no log)"
    print(text[-3000:])
    assert rc.exists(), (
        f"the VM did not finish (exit {done.returncode}):\n{done.stdout[-2000:]}\n"
        f"{done.stderr[-2000:]}\n{text[-2000:]}"
    )
    assert rc.read_text().strip() == "0", text[-4000:]
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")  # type: ignore[assignment]
    assert suite is not None
    tests, skipped = int(suite.get("tests", 0)), int(suite.get("skipped", 0))
    failures = int(suite.get("failures", 0)) + int(suite.get("errors", 0))
    assert tests >= 4 and skipped == 0 and failures == 0, (tests, skipped, failures, text[-3000:])
