"""Run a function inside a network namespace, in-process and without forking.

Why not pyroute2's own mechanism: in pyroute2 0.9.7 ``IPRoute(netns=...)`` (and the legacy
``NetNS``) obtain their socket through ``pyroute2.netns.create_socket``, which forks a
``ChildProcess`` per socket, and ``netns=`` names default to ``O_CREAT`` (a typo creates an
empty namespace). A fork per CNI call is exactly the cost and fragility we want to avoid.

How instead: ``run_in_netns`` starts a short-lived thread that ``setns(2)``-es into the
namespace, runs the function there and then *ends*. ``setns`` changes only the calling
thread, and because that thread never returns to a pool, no other code can ever run in a
thread left in the wrong namespace; the caller's thread is never switched. Everything
namespace-bound must be created *and used* inside the function:

- a netlink socket is bound to the namespace of the thread that created it — and pyroute2
  0.9.7 keeps its sockets thread-local: an ``IPRoute`` used from a second thread silently
  opens a *new* socket in that thread's namespace. So one ``IPRoute`` per function call,
  created and closed in it.
- ``/proc/sys/net/...`` resolves against the namespace of the *calling thread* (verified
  on this kernel: a thread setns-ed into a pod sees the pod's interfaces under
  ``/proc/sys/net/ipv4/conf``, the main thread does not). ``/proc/net`` is different: it
  follows the *process* (thread-group leader) and must not be relied on here.

Opening the namespace first (``open_netns``) lets callers validate it once, report a clean
error, and pass the same fd to netlink (``IFLA_NET_NS_FD``) and to ``run_in_netns``.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

__all__ = ["NetnsUnavailable", "netns_path", "open_netns", "run_in_netns"]

T = TypeVar("T")

CLONE_NEWNET = 0x40000000  # os.CLONE_NEWNET only exists from Python 3.12
NS_GET_NSTYPE = 0xB703  # ioctl on an nsfs fd: which kind of namespace it is (Linux >= 4.11)

_libc = ctypes.CDLL(None, use_errno=True)


class NetnsUnavailable(Exception):
    """The path does not exist or is not a network namespace."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"network namespace {path!r}: {reason}")
        self.path = path
        self.reason = reason


NAMED_NETNS_DIR = "/run/netns"  # where `ip netns add NAME` mounts NAME


def netns_path(netns: str) -> str:
    """A namespace as given on the command line, a name (`ip netns`) or a path, as a path."""
    return netns if "/" in netns else f"{NAMED_NETNS_DIR}/{netns}"


@contextmanager
def open_netns(path: str) -> Iterator[int]:
    """Open ``path`` read-only, check it is a network namespace, yield the fd, close it.

    Opened non-blocking: a FIFO (or any other special file) given as a namespace would
    otherwise block the opening thread until somebody writes to it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except FileNotFoundError as err:
        raise NetnsUnavailable(path, "does not exist") from err
    except OSError as err:
        raise NetnsUnavailable(path, err.strerror or str(err)) from err
    try:
        _check_is_netns(path, fd)
        yield fd
    finally:
        os.close(fd)


def _check_is_netns(path: str, fd: int) -> None:
    # A leftover bind-mount target (plain empty file after the namespace was unmounted)
    # opens fine; only the nsfs ioctl tells it apart from a real namespace.
    try:
        nstype = fcntl.ioctl(fd, NS_GET_NSTYPE)
    except OSError as err:
        raise NetnsUnavailable(path, "not a namespace file") from err
    if nstype != CLONE_NEWNET:
        raise NetnsUnavailable(path, f"namespace type {nstype:#x} is not a network namespace")


def run_in_netns(netns_fd: int | None, fn: Callable[[], T]) -> T:
    """Return ``fn()`` evaluated in the network namespace ``netns_fd`` (None: right here).

    Exceptions raised by ``fn`` propagate to the caller unchanged.
    """
    if netns_fd is None:
        return fn()
    outcome: list[T] = []
    failure: list[BaseException] = []

    def enter_and_run() -> None:
        try:
            _setns(netns_fd)
            outcome.append(fn())
        except BaseException as err:  # handed to the caller's thread, re-raised there
            failure.append(err)

    worker = threading.Thread(target=enter_and_run, name="l3fabric-netns", daemon=True)
    worker.start()
    worker.join()
    if failure:
        raise failure[0]
    return outcome[0]


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"setns: {os.strerror(code)}")
