"""The FIB programmer: puts the routes the RIB chose into one kernel routing table.

Ownership. Every route the FIB writes carries our rtnetlink protocol number (``PROTO_BGP``)
and only such routes are dumped, replaced or removed; DESIGN §5: "never replace a route the
agent does not own" (a BIRD reflector reflects connected routes, an operator adds statics).
A prefix that already has a route of another protocol in the table is *foreign*: it is left
to its owner, counted in ``last_skipped`` and logged, never an error. How that is detected:

- ``reconcile`` dumps the whole table once (ours and theirs) and skips foreign prefixes
  (any metric) before sending anything;
- ``apply`` (the hot path) keeps two caches filled by the last dump and by its own acks:
  prefixes we own are sent ``NLM_F_CREATE|NLM_F_REPLACE``, all others
  ``NLM_F_CREATE|NLM_F_EXCL`` so the kernel refuses (EEXIST) instead of overwriting whatever
  sits at the same key. Only when some adds come back EEXIST does ``apply`` dump the table,
  then re-sends those that turn out to be ours with REPLACE and skips the foreign ones.
  A prefix known foreign from the last dump is skipped without asking the kernel; the
  caches are exact again after every ``dump``/``reconcile``. Their one blind spot: a
  foreign route that takes over the very key of one of ours after our last look (an
  operator's ``ip route replace``) is replaced by our next REPLACE — the kernel has no
  "replace only if the owner is" — and a foreign route at another IPv4 metric, which the
  kernel lets coexist with ours, is noticed only by the next dump.
- removals carry our protocol, so the kernel itself matches only our route (ESRCH, taken
  as "already gone", when there is none).

Speed. Route changes are hand-packed (``netlink_batch``) and sent over one netlink socket in
chunks of up to ``CHUNK`` messages per ``send``. rtnetlink handles a send synchronously, so
when ``send`` returns every ack of the chunk is already queued: they are read, matched to
requests by sequence number, and every failure is collected per prefix. After the whole
batch ``FibError`` lists the failed prefixes; everything else has been applied (partial
success is reported, never hidden and never rolled back). The receive buffer is raised and
chunks are sized to what was granted, so a chunk's acks cannot overrun it; if they ever do
(ENOBUFS), the unacknowledged prefixes are reported as failures with an unknown outcome, and
the next ``reconcile`` settles them. Measured here (bench/RESULTS.md): 20k routes in about
the time ``ip -batch`` takes.

Namespaces. With ``netns`` the socket is created in a short-lived thread that entered the
namespace (``bgp_speaker.kernel.netns.run_in_netns``, no fork); a netlink socket stays bound to the
namespace it was created in, whichever thread later uses it. Interface names are resolved
through the same socket, so they are the namespace's names.

Threads. A Fib is not thread-safe: use it from one thread at a time (sequence numbers,
caches and the socket's receive queue are shared state without locks).
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from bgp_speaker.bgp.routes import PROTO_BGP, IPAddr, IPNet, KernelRoute, NextHop
from bgp_speaker.kernel import netlink_batch as nl
from bgp_speaker.kernel.netns import NetnsUnavailable, netns_path, open_netns, run_in_netns
from ipam_blocks.errors import L3FabricError

__all__ = ["CHUNK", "Fib", "FibError", "KernelFib", "ManagedFib"]

log = logging.getLogger("l3fabric.agent.fib")

CHUNK = 500  # messages per send, at most (see _chunk_for)
_CHUNK_BYTES = 128 * 1024  # and never a datagram near the send buffer's size
_RCVBUF = 8 * 1024 * 1024  # asked for; each queued ack is its own skb, ~0.9 KB of truesize
_ACK_TRUESIZE = 2048  # budgeted per ack when sizing chunks: twice what was measured here
_SNDBUF = 1024 * 1024
_RECV_SIZE = 1024 * 1024  # dump replies are batched into skbs of up to tens of KB
_ACK_WAIT = 5.0  # seconds; acks are queued before send() returns, this is a safety net
_DUMP_RETRIES = 3  # a dump interrupted by concurrent changes is started again

SOL_NETLINK = 270
NETLINK_CAP_ACK = 10
NETLINK_EXT_ACK = 11
NETLINK_GET_STRICT_CHK = 12
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33
_ADD_OWNED = nl.NLM_F_CREATE | nl.NLM_F_REPLACE
_ADD_NEW = nl.NLM_F_CREATE | nl.NLM_F_EXCL


class KernelFib(Protocol):
    """What the routing controller programs: our routes in one kernel table (``Fib``, or
    ``overlay.tunnels.EncapFib`` around one). Blocking, and for one thread at a time."""

    def dump(self) -> dict[IPNet, KernelRoute]:
        """Our routes in the table."""
        ...

    def apply(self, add_or_replace: Iterable[KernelRoute], remove: Iterable[IPNet]) -> None:
        """Install or replace, and remove; FibError lists what failed, the rest is applied."""
        ...

    def reconcile(self, desired: Mapping[IPNet, KernelRoute]) -> tuple[int, int]:
        """Make our routes equal ``desired``: (routes added or changed, removed)."""
        ...


class ManagedFib(KernelFib, Protocol):
    """A KernelFib on its own netlink socket, caching interface indexes (``Fib``): what
    ``EncapFib`` wraps, telling it when a tunnel device was replaced."""

    def links_changed(self) -> None:
        """Interfaces were replaced: resolve their names anew."""
        ...

    def close(self) -> None: ...


class FibError(L3FabricError):
    """Route changes failed (``failures``: prefix -> reason), or the FIB is unusable.

    Everything not listed in ``failures`` was applied. Causes are mostly transient or stale
    (a gateway not reachable yet, a device that went away): retry on the next reconcile.
    """

    def __init__(self, message: str, failures: Mapping[IPNet, str] | None = None) -> None:
        super().__init__(message)
        self.failures: dict[IPNet, str] = dict(failures or {})

    @classmethod
    def from_failures(cls, failures: Mapping[IPNet, str], attempted: int) -> FibError:
        shown = "; ".join(f"{prefix}: {reason}" for prefix, reason in list(failures.items())[:10])
        more = f"; … {len(failures) - 10} more" if len(failures) > 10 else ""
        return cls(f"{len(failures)} of {attempted} route changes failed: {shown}{more}", failures)


@dataclass
class _Batch:
    """Requests of one send round (by sequence number) and what became of them."""

    requests: dict[int, tuple[str, IPNet, KernelRoute | None]] = field(default_factory=dict)
    failed: dict[int, nl.Ack] = field(default_factory=dict)  # acked with an error
    unacked: set[int] = field(default_factory=set)  # sent, no ack came back
    unpacked: set[int] = field(default_factory=set)  # never sent (PackError)


@dataclass
class _Outcome:
    changed: int = 0
    removed: int = 0
    skipped: set[IPNet] = field(default_factory=set)
    failures: dict[IPNet, str] = field(default_factory=dict)


class Fib:
    """Routes of protocol ``protocol`` in table ``table`` of one network namespace.

    ``netns``: a name under /run/netns, a path to a namespace file, or None for the
    namespace of the calling thread.
    """

    def __init__(
        self, netns: str | None = None, table: int = 254, protocol: int = PROTO_BGP
    ) -> None:
        if not 0 < table < 2**32 or table in (253, 255):  # 253 default, 255 local
            raise FibError(f"table {table}: not a usable routing table")
        if not 4 < protocol < 256:  # 0-4 belong to the kernel (unspec, redirect, kernel, …)
            raise FibError(f"protocol {protocol}: not a routing protocol number we may own")
        self.table = table
        self.protocol = protocol
        self._sock = _open_socket(netns)
        self._chunk = _chunk_for(self._sock)
        self._buf = bytearray(_RECV_SIZE)
        self._seq = 0
        self._links: dict[str, int] = {}
        self._names: dict[int, str] = {}
        self._owned: set[IPNet] = set()  # ours in the kernel, as of the last dump + acks
        self._foreign: set[IPNet] = set()  # someone else's, as of the last dump
        self.last_skipped: frozenset[IPNet] = frozenset()
        """Prefixes the last apply/reconcile left to a foreign route."""

    # --- public --------------------------------------------------------------------------------

    def dump(self) -> dict[IPNet, KernelRoute]:
        """Our routes in the table (IPv4 and IPv6), next hops sorted; refreshes the caches."""
        return self._observe()

    def apply(self, add_or_replace: Iterable[KernelRoute], remove: Iterable[IPNet]) -> None:
        """Install or replace ``add_or_replace`` and remove our routes for ``remove``.

        A prefix in both is replaced, not removed; a prefix given twice takes the last route.
        Prefixes held by a foreign route are skipped (``last_skipped``). Raises FibError
        listing every prefix that failed, after all the others have been applied.
        """
        self._apply(add_or_replace, remove)

    def reconcile(self, desired: Mapping[IPNet, KernelRoute]) -> tuple[int, int]:
        """Make our routes equal ``desired``: returns (routes added or changed, removed).

        One dump, then only the differences are sent. A desired next hop without a device
        matches an installed one through any device (the kernel resolved it).
        """
        observed = self._observe()
        foreign = {prefix for prefix in desired if prefix in self._foreign}
        changes = [
            route
            for prefix, route in desired.items()
            if prefix not in foreign and not _satisfies(observed.get(prefix), route)
        ]
        stale = [prefix for prefix in observed if prefix not in desired]
        outcome = self._apply(changes, stale, already_skipped=foreign)
        return outcome.changed, outcome.removed

    def links_changed(self) -> None:
        """Interfaces were deleted and created again (a tunnel device replaced): resolve
        names anew before the next change, since an interface's index is not its name's."""
        self._links = {}
        self._names = {}

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Fib:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- applying -------------------------------------------------------------------------------

    def _apply(
        self,
        add_or_replace: Iterable[KernelRoute],
        remove: Iterable[IPNet],
        already_skipped: set[IPNet] | None = None,
    ) -> _Outcome:
        adds = {route.prefix: route for route in add_or_replace}
        removes = [prefix for prefix in dict.fromkeys(remove) if prefix not in adds]
        outcome = _Outcome(skipped=set(already_skipped or ()))
        batch = self._plan_adds(adds, outcome)
        for prefix in removes:
            batch.requests[self._next_seq()] = ("del", prefix, None)
        self._run(batch, outcome)
        self._settle(batch, outcome)
        self.last_skipped = frozenset(outcome.skipped)
        _log_outcome(outcome)
        if outcome.failures:
            raise FibError.from_failures(outcome.failures, len(adds) + len(removes))
        return outcome

    def _plan_adds(self, adds: Mapping[IPNet, KernelRoute], outcome: _Outcome) -> _Batch:
        batch = _Batch()
        foreign, owned = self._foreign, self._owned
        for prefix, route in adds.items():
            if foreign and prefix in foreign:
                outcome.skipped.add(prefix)
            else:
                op = "replace" if prefix in owned else "create"
                batch.requests[self._next_seq()] = (op, prefix, route)
        return batch

    def _run(self, batch: _Batch, outcome: _Outcome) -> None:
        """Pack, send in chunks, collect every ack (or a failure for a request without one)."""
        chunk: list[bytes] = []
        seqs: list[int] = []
        size = 0
        for seq, (op, prefix, route) in batch.requests.items():
            try:
                message = self._pack(seq, op, prefix, route)
            except nl.PackError as err:
                outcome.failures[prefix] = str(err)
                batch.unpacked.add(seq)
                continue
            chunk.append(message)
            seqs.append(seq)
            size += len(message)
            if len(chunk) >= self._chunk or size >= _CHUNK_BYTES:
                self._exchange(chunk, seqs, batch)
                chunk, seqs, size = [], [], 0
        if chunk:
            self._exchange(chunk, seqs, batch)

    def _pack(self, seq: int, op: str, prefix: IPNet, route: KernelRoute | None) -> bytes:
        if route is None:
            return nl.pack_delroute(seq, prefix, self.table, self.protocol)
        for hop in route.nexthops:
            if hop.device is not None and hop.device not in self._links:
                self._refresh_links()  # a device we have not seen: names may have changed
                break
        flags = _ADD_OWNED if op == "replace" else _ADD_NEW
        return nl.pack_newroute(seq, flags, route, self.table, self.protocol, self._links)

    def _exchange(self, messages: list[bytes], seqs: list[int], batch: _Batch) -> None:
        """Send one chunk and read the acks it produced into ``batch``."""
        try:
            self._sock.send(b"".join(messages))
        except OSError as err:
            raise FibError(f"netlink send failed: {err}") from err
        pending = set(seqs)
        wait = True
        while pending:
            try:
                size = self._recv(wait)
            except OSError as err:
                if err.errno != errno.ENOBUFS:
                    raise FibError(f"netlink receive failed: {err}") from err
                # Acks were dropped: take what is queued, the rest never comes.
                log.warning("netlink receive buffer overrun", extra={"op": "fib_apply"})
                wait = False
                continue
            if not size:
                break
            nl.collect_acks(self._buf, size, pending, batch.failed)
        batch.unacked |= pending

    def _settle(self, batch: _Batch, outcome: _Outcome, contest: bool = True) -> None:
        """Turn acks into cache updates, failures and — for EEXIST — an ownership check.

        ``contest=False`` (the re-send after that check) makes EEXIST a plain failure, so a
        route racing in and out of the table cannot keep us going round.
        """
        contested: dict[IPNet, KernelRoute] = {}
        owned, failed, unacked = self._owned, batch.failed, batch.unacked
        for seq, (_op, prefix, route) in batch.requests.items():
            if failed and seq in failed:
                ack = failed[seq]
                if route is None and ack.errno == errno.ESRCH:
                    owned.discard(prefix)  # none of ours there, which is the goal
                elif contest and route is not None and ack.errno == errno.EEXIST:
                    contested[prefix] = route
                else:
                    outcome.failures[prefix] = _reason(ack)
            elif unacked and seq in unacked:
                outcome.failures[prefix] = "no acknowledgement (outcome unknown until next dump)"
            elif batch.unpacked and seq in batch.unpacked:
                continue  # its PackError is already recorded
            elif route is None:
                owned.discard(prefix)
                outcome.removed += 1
            else:
                owned.add(prefix)
                outcome.changed += 1
        if contested:
            self._resolve_contested(contested, outcome)

    def _resolve_contested(self, contested: dict[IPNet, KernelRoute], outcome: _Outcome) -> None:
        """Some route already sat at an add's key: replace it if ours, else leave it."""
        self._observe()
        retry = _Batch()
        for prefix, route in contested.items():
            if prefix in self._foreign:
                outcome.skipped.add(prefix)
            else:  # ours: replace it; or gone since: create it (EXCL still guards)
                op = "replace" if prefix in self._owned else "create"
                retry.requests[self._next_seq()] = (op, prefix, route)
        if retry.requests:
            self._run(retry, outcome)
            self._settle(retry, outcome, contest=False)

    # --- netlink I/O ---------------------------------------------------------------------------

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF or 1
        return self._seq

    def _recv(self, wait: bool) -> int:
        """Size of the next datagram in ``_buf``; 0 if none is queued (after _ACK_WAIT if
        ``wait``). rtnetlink answers within send(), so waiting is only a safety net."""
        while True:
            try:
                return self._sock.recv_into(self._buf, _RECV_SIZE, socket.MSG_DONTWAIT)
            except BlockingIOError:
                if not wait or not select.select([self._sock], [], [], _ACK_WAIT)[0]:
                    return 0

    def _dump_messages(self, request: bytes, seq: int) -> Iterator[tuple[int, int, int]]:
        """(type, offset in ``_buf``, length) of each reply to a dump request.

        FibError if the kernel refuses or replies go missing; _Interrupted at the end when
        the kernel flagged the dump inconsistent (the table changed meanwhile).
        """
        try:
            self._sock.send(request)
        except OSError as err:
            raise FibError(f"netlink send failed: {err}") from err
        interrupted = False
        while True:
            try:
                size = self._recv(wait=True)
            except OSError as err:  # ENOBUFS included: a dump with holes is useless
                raise FibError(f"netlink dump failed: {err}") from err
            if not size:
                raise FibError("netlink dump ended without NLMSG_DONE")
            for kind, flags, reply_seq, offset, length in nl.iter_messages(self._buf, size):
                if reply_seq != seq:
                    continue  # a late ack of an earlier, abandoned exchange
                interrupted |= bool(flags & nl.NLM_F_DUMP_INTR)
                if kind == nl.NLMSG_DONE:
                    if interrupted:
                        raise _Interrupted
                    return
                if kind == nl.NLMSG_ERROR:
                    ack = nl.parse_ack(self._buf, offset, length)
                    raise FibError(f"netlink dump refused: {_reason(ack)}")
                yield kind, offset, length

    def _refresh_links(self) -> None:
        """Learn the namespace's interface names and indexes (names resolve per netns)."""
        for _attempt in range(_DUMP_RETRIES):
            try:
                links = self._dump_links()
            except _Interrupted:
                continue
            self._links = links
            self._names = {index: name for name, index in links.items()}
            return
        raise FibError(f"link dump interrupted {_DUMP_RETRIES} times by concurrent changes")

    def _dump_links(self) -> dict[str, int]:
        seq = self._next_seq()
        links: dict[str, int] = {}
        for kind, offset, length in self._dump_messages(nl.pack_link_dump(seq), seq):
            if kind == nl.RTM_NEWLINK:
                index, name = nl.parse_link(self._buf, offset, length)
                links[name] = index
        return links

    # --- observing -----------------------------------------------------------------------------

    def _observe(self) -> dict[IPNet, KernelRoute]:
        """Dump the table: returns our routes, refreshes the owned and foreign caches."""
        for _attempt in range(_DUMP_RETRIES):
            try:
                ours, foreign = self._dump_table()
            except _Interrupted:
                continue
            self._owned = set(ours)
            self._foreign = foreign
            return ours
        raise FibError(f"route dump interrupted {_DUMP_RETRIES} times by concurrent changes")

    def _dump_table(self) -> tuple[dict[IPNet, KernelRoute], set[IPNet]]:
        seq = self._next_seq()
        entries: list[nl.RouteEntry] = []
        foreign: set[IPNet] = set()
        request = nl.pack_route_dump(seq, self.table)
        for kind, offset, length in self._dump_messages(request, seq):
            if kind != nl.RTM_NEWROUTE:
                continue
            # Cheap header peek: decode next hops only for our routes.
            entry = nl.parse_route(self._buf, offset, length, want_hops=self._is_ours(offset))
            if entry is None or entry.table != self.table:
                continue
            if entry.protocol == self.protocol:
                entries.append(entry)
            else:
                foreign.add(entry.prefix)
        return self._to_routes(entries), foreign

    def _is_ours(self, offset: int) -> bool:
        return self._buf[offset + 16 + 5] == self.protocol  # rtmsg.rtm_protocol

    def _to_routes(self, entries: list[nl.RouteEntry]) -> dict[IPNet, KernelRoute]:
        if any(i and i not in self._names for e in entries for _gw, i, _o in e.hops):
            self._refresh_links()
        # Thousands of routes share a handful of next-hop sets: decode each set once.
        hop_sets: dict[tuple[tuple[IPAddr | None, int, bool], ...], tuple[NextHop, ...]] = {}
        routes: dict[IPNet, KernelRoute] = {}
        for entry in entries:
            if entry.prefix in routes:
                continue  # several of ours (other metrics): the first, as the kernel lists
            if entry.kind == nl.RTN_BLACKHOLE:
                routes[entry.prefix] = KernelRoute(entry.prefix, (), blackhole=True)
                continue
            hops = hop_sets.get(entry.hops)
            if hops is None:
                hops = hop_sets[entry.hops] = self._to_nexthops(entry.hops)
            routes[entry.prefix] = KernelRoute(entry.prefix, hops)
        return routes

    def _to_nexthops(self, raw: tuple[tuple[IPAddr | None, int, bool], ...]) -> tuple[NextHop, ...]:
        hops = [NextHop(gw, self._names.get(index), onlink) for gw, index, onlink in raw]
        return tuple(sorted(hops, key=_hop_key))


class _Interrupted(Exception):
    """The kernel marked a dump NLM_F_DUMP_INTR: the table changed while being dumped."""


def _open_socket(netns: str | None) -> socket.socket:
    if netns is None:
        return _new_socket()
    path = netns_path(netns)
    try:
        with open_netns(path) as fd:
            return run_in_netns(fd, _new_socket)
    except NetnsUnavailable as err:
        raise FibError(str(err)) from err
    except OSError as err:
        raise FibError(f"netlink socket in {path}: {err}") from err


def _new_socket() -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
    try:
        # Acks echo only the request's header, plus the kernel's error text.
        sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
        sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)
        _try_setsockopt(sock, SOL_NETLINK, NETLINK_GET_STRICT_CHK, 1)  # kernel-side filters
        _set_buffer(sock, SO_RCVBUFFORCE, socket.SO_RCVBUF, _RCVBUF)
        _set_buffer(sock, SO_SNDBUFFORCE, socket.SO_SNDBUF, _SNDBUF)
        sock.bind((0, 0))
    except OSError:
        sock.close()
        raise
    return sock


def _chunk_for(sock: socket.socket) -> int:
    """Messages per send such that all their acks fit the receive buffer we actually got
    (without CAP_NET_ADMIN it is capped by net.core.rmem_max): an overrun loses acks."""
    rcvbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    return max(1, min(CHUNK, rcvbuf // _ACK_TRUESIZE))


def _set_buffer(sock: socket.socket, forced: int, plain: int, size: int) -> None:
    # The FORCE variants pass net.core.[rw]mem_max but need CAP_NET_ADMIN.
    if not _try_setsockopt(sock, socket.SOL_SOCKET, forced, size):
        sock.setsockopt(socket.SOL_SOCKET, plain, size)


def _try_setsockopt(sock: socket.socket, level: int, option: int, value: int) -> bool:
    try:
        sock.setsockopt(level, option, value)
    except OSError:
        return False
    return True


def _reason(ack: nl.Ack) -> str:
    text = os.strerror(ack.errno)
    return f"{text} ({ack.message})" if ack.message else text


def _hop_key(hop: NextHop) -> tuple[bool, int, int, str, bool]:
    # NextHop's own ordering, made total: None gateways and devices cannot be compared.
    gateway = hop.gateway
    return (
        gateway is None,
        0 if gateway is None else gateway.version,
        0 if gateway is None else int(gateway),
        hop.device or "",
        hop.onlink,
    )


def _satisfies(observed: KernelRoute | None, desired: KernelRoute) -> bool:
    """Whether the installed route already is the desired one."""
    if observed is None or observed.blackhole != desired.blackhole:
        return False
    if len(observed.nexthops) != len(desired.nexthops):
        return False
    unmatched = list(observed.nexthops)
    for want in desired.nexthops:
        match = next((hop for hop in unmatched if _hop_matches(hop, want)), None)
        if match is None:
            return False
        unmatched.remove(match)
    return True


def _hop_matches(have: NextHop, want: NextHop) -> bool:
    return (
        have.gateway == want.gateway
        and have.onlink == want.onlink
        and (want.device is None or have.device == want.device)
    )


def _log_outcome(outcome: _Outcome) -> None:
    if outcome.skipped:
        sample = ", ".join(str(p) for p in sorted(outcome.skipped, key=str)[:5])
        log.info(
            "routes left to their foreign owner",
            extra={"op": "fib_apply", "count": len(outcome.skipped), "prefix": sample,
                   "reason": "a route of another protocol holds the prefix"},
        )  # fmt: skip
    for prefix, reason in list(outcome.failures.items())[:20]:
        log.warning("route change failed", extra={"op": "fib_apply", "prefix": str(prefix),
                                                  "reason": reason})  # fmt: skip
