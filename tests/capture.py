"""Packet capture for tests: tcpdump in a namespace, its lines collected while a block runs."""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator


@contextlib.contextmanager
def capture(
    netns: str, device: str, bpf: str, *, start_timeout: float = 15, settle: float = 0.5
) -> Iterator[list[str]]:
    """tcpdump lines seen on `device` in `netns` while the block runs (filled in at its end;
    `settle` seconds let the last packets reach tcpdump first)."""
    lines: list[str] = []
    proc = subprocess.Popen(
        ["ip", "netns", "exec", netns, "tcpdump", "-n", "-l", "-i", device, bpf],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + start_timeout
        while "listening on" not in proc.stderr.readline():
            assert time.monotonic() < deadline and proc.poll() is None, "tcpdump did not start"
        yield lines
        time.sleep(settle)
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
        lines += out.splitlines()
