"""The kernel's TCP-MD5 counters: the only trace a password mismatch leaves.

A segment whose MD5 signature is wrong or missing is dropped by the kernel before any
socket sees it, so ExaBGP never hears of the peer and the session just stays down. The
network namespace's TcpExt counters (``/proc/net/netstat``) are the one place it shows:

- ``TCPMD5Failure``: a signed segment with the wrong signature (the passwords differ);
- ``TCPMD5NotFound``: an unsigned segment where we expect a signature (no password there);
- ``TCPMD5Unexpected``: a signed segment where we expect none (no password here).

They count per namespace, not per peer. ``/proc/thread-self/net`` is read from a thread
in the namespace (``/proc/net`` follows the process, see kernel/netns.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bgp_speaker.kernel.netns import netns_path, open_netns, run_in_netns

__all__ = ["Md5Counters", "parse_md5_counters", "read_md5_counters"]

NETSTAT = Path("/proc/thread-self/net/netstat")


@dataclass(frozen=True)
class Md5Counters:
    failure: int = 0
    not_found: int = 0
    unexpected: int = 0


def parse_md5_counters(netstat: str) -> Md5Counters:
    """The MD5 counters from the text of ``/proc/net/netstat`` (absent ones read 0).

    The file pairs a header line (``TcpExt: Name ...``) with a value line (``TcpExt: 1 ...``).
    """
    lines = [line.split() for line in netstat.splitlines() if line.startswith("TcpExt:")]
    values: dict[str, int] = {}
    for names, numbers in zip(lines[::2], lines[1::2], strict=False):
        values.update(zip(names[1:], (int(n) for n in numbers[1:]), strict=False))
    return Md5Counters(
        values.get("TCPMD5Failure", 0),
        values.get("TCPMD5NotFound", 0),
        values.get("TCPMD5Unexpected", 0),
    )


def read_md5_counters(netns: str | None) -> Md5Counters:
    """The counters of ``netns`` (a name under /var/run/netns or a path; None: the calling
    thread's namespace). Blocking."""
    if netns is None:
        return parse_md5_counters(NETSTAT.read_text())
    with open_netns(netns_path(netns)) as fd:
        return run_in_netns(fd, lambda: parse_md5_counters(NETSTAT.read_text()))
