"""Which sessions a rise of the kernel's TCP-MD5 counters is blamed on (pure).

The kernel drops a segment with a wrong or missing MD5 signature silently (see
kernel/tcp_md5.py): the session stays down and ExaBGP reports nothing new, so without
this ``node status`` would keep showing whatever ended the session last. The counters are
per network namespace, not per peer, so a rise is blamed on every session that is not
established and could have caused it: a wrong signature or a missing one on the sessions
with a password here, an unexpected one on those without.
"""

from __future__ import annotations

from collections.abc import Container, Iterable

from bgp_speaker.bgp.routes import IPAddr, SessionSpec

__all__ = ["MD5_MISMATCH", "MD5_UNEXPECTED", "blame"]

MD5_MISMATCH = "TCP-MD5 mismatch or no password on the peer"
MD5_UNEXPECTED = "the peer signs with TCP-MD5 but no password is set here"


def blame(
    sessions: Iterable[SessionSpec],
    established: Container[IPAddr],
    mismatch_rose: bool,
    unexpected_rose: bool,
) -> dict[IPAddr, str]:
    """The sessions not established that the counters' rise may explain, and why.

    ``mismatch_rose``: TCPMD5Failure or TCPMD5NotFound rose; ``unexpected_rose``:
    TCPMD5Unexpected rose (since the last look).
    """
    out: dict[IPAddr, str] = {}
    for spec in sessions:
        if spec.peer_ip in established:
            continue
        if spec.md5_password and mismatch_rose:
            out[spec.peer_ip] = MD5_MISMATCH
        elif not spec.md5_password and unexpected_rose:
            out[spec.peer_ip] = MD5_UNEXPECTED
    return out
