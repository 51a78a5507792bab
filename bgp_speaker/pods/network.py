"""The agent's CNI verbs: ADD, DEL, CHECK, STATUS and GC for pods on this node.

Orderings that keep IPAM, records and the kernel consistent through crashes and retries:

- ADD writes the Workload record *before* allocating (GC never sees an allocation without an
  owner), stores the addresses in it *before* building the veth (a retried ADD or a DEL finds
  them), and on any failure after allocating releases the handle and forgets the record
  (the dataplane removes what a failed attach created).
- A repeated ADD for a recorded attachment re-applies the dataplane with the recorded
  addresses (idempotent) and allocates nothing.
- DEL detaches, releases the handle, and only then forgets the record. Unknown containers,
  vanished namespaces and released addresses are success.

Every call runs in a worker thread; calls for one attachment (IPAM handle) are serialised.
Errors leave here as `CniError` with the spec's codes (`to_cni_error`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, Protocol, TypeVar

from netaddr import IPAddress, IPNetwork

from bgp_speaker.kernel.netns import NetnsUnavailable, open_netns
from bgp_speaker.pods import dataplane
from bgp_speaker.pods.dataplane import DataplaneError, NetnsNotFound, PodAttachment, host_veth_name
from bgp_speaker.pods.locks import KeyedLock
from bgp_speaker.pods.records import WorkloadRecords
from cni import errors
from cni.errors import CniError
from cni.request import CniRequest, parse_request
from cni.result import Attachment, parse_prev_result, render_result
from ipam_blocks.allocator import IPAM, AssignRequest
from ipam_blocks.errors import (
    ContentionBudgetExceeded,
    InvalidInput,
    L3FabricError,
    NoUsablePool,
    PoolExhausted,
    StoreUnavailable,
)
from ipam_blocks.model import Workload, handle_name
from ipam_blocks.retry import retry_unavailable

log = logging.getLogger("l3fabric.agent.pods")
T = TypeVar("T")
Op = Callable[[dict[str, Any]], Any]


class Dataplane(Protocol):
    """The pod dataplane as the CNI verbs use it (`bgp_speaker.pods.dataplane` behind
    `HostDataplane`)."""

    def attach(
        self,
        netns: str,
        container_ifname: str,
        host_ifname: str,
        addresses: Sequence[IPAddress],
        mtu: int,
    ) -> PodAttachment: ...

    def detach(self, host_ifname: str, netns: str | None, container_ifname: str) -> None: ...

    def inspect(self, att: PodAttachment) -> list[str]: ...


class HostDataplane:
    """`bgp_speaker.pods.dataplane` in the namespace that plays the host (None: the agent's own)."""

    def __init__(self, host_netns: str | None = None) -> None:
        self.host_netns = host_netns

    def attach(
        self,
        netns: str,
        container_ifname: str,
        host_ifname: str,
        addresses: Sequence[IPAddress],
        mtu: int,
    ) -> PodAttachment:
        return dataplane.attach_pod(
            netns, container_ifname, host_ifname, addresses, mtu, host_netns=self.host_netns
        )

    def detach(self, host_ifname: str, netns: str | None, container_ifname: str) -> None:
        dataplane.detach_pod(host_ifname, netns, container_ifname, host_netns=self.host_netns)

    def inspect(self, att: PodAttachment) -> list[str]:
        return dataplane.inspect_pod(att, host_netns=self.host_netns)


def to_cni_error(err: BaseException) -> CniError:
    """The one place that decides which CNI code an error becomes (see `cni.errors`)."""
    match err:
        case CniError():
            return err
        case NetnsNotFound():
            return CniError(errors.NETNS_NOT_FOUND, "pod network namespace not found", str(err))
        case InvalidInput():
            return CniError(errors.INVALID_CONFIG, f"invalid {err.field}", err.message)
        case StoreUnavailable():
            return CniError(errors.TRY_AGAIN_LATER, "IPAM store unavailable", str(err))
        case ContentionBudgetExceeded():
            return CniError(errors.TRY_AGAIN_LATER, "IPAM store too contended", str(err))
        case PoolExhausted():
            return CniError(errors.POOL_EXHAUSTED, "pool exhausted", str(err))
        case NoUsablePool():
            return CniError(errors.NO_USABLE_POOL, "no usable IP pool", str(err))
        case DataplaneError():
            return CniError(errors.DATAPLANE_FAILED, "pod dataplane failed", str(err))
        case L3FabricError():
            return CniError(errors.INTERNAL_ERROR, type(err).__name__, str(err))
    return CniError(errors.INTERNAL_ERROR, "internal error", f"{type(err).__name__}: {err}")


def pod_host_ifname(namespace: str, pod: str, container_id: str) -> str:
    """The host veth name: from namespace.pod (stable across sandboxes, as in Calico), or
    from the container ID for a runtime that names no pod."""
    return host_veth_name(namespace, pod) if pod else host_veth_name("", container_id)


class PodNetwork:
    def __init__(
        self,
        node: str,
        ipam: IPAM,
        records: WorkloadRecords,
        dp: Dataplane,
        default_mtu: int | Callable[[], int],
    ) -> None:
        self.node = node
        self.ipam = ipam
        self.records = records
        self.dp = dp
        self._default_mtu = default_mtu
        self._locks = KeyedLock()

    @property
    def default_mtu(self) -> int:
        """The pod MTU when the CNI config names none: fixed, or (a callable) following the
        overlay's encapsulation (1480 under IP-in-IP, 1450 under VXLAN on a 1500 underlay)."""
        mtu = self._default_mtu
        return mtu() if callable(mtu) else mtu

    @property
    def in_flight(self) -> int:
        return self._locks.held()

    def ops(self) -> dict[str, Op]:
        """The socket ops this serves: each takes `{"env": {...}, "config": {...}}`."""
        return {
            "cni.add": self._op("ADD", self.add),
            "cni.del": self._op("DEL", self.delete),
            "cni.check": self._op("CHECK", self.check),
            "cni.status": self._op("STATUS", self.status),
            "cni.gc": self._op("GC", self.gc),
        }

    def _op(self, command: str, verb: Callable[[CniRequest], Any]) -> Op:
        def run(args: dict[str, Any]) -> Any:
            env, config = args.get("env"), args.get("config")
            if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
                raise CniError(errors.INVALID_ENV, "env: expected an object of strings")
            req = parse_request(env, config)
            if req.command != command:
                raise CniError(
                    errors.INVALID_ENV, f"CNI_COMMAND is {req.command}, expected {command}"
                )
            start = time.monotonic()
            fields = {"op": command.lower(), "node": self.node, "pod": _pod_of(req)}
            if req.container_id:
                fields["handle"] = req.handle_id
            if req.ignored:
                fields["ignored"] = "; ".join(req.ignored)
            try:
                result = verb(req)
            except Exception as err:
                cni_err = to_cni_error(err)
                log.warning(
                    "cni %s failed",
                    command,
                    exc_info=cni_err.code == errors.INTERNAL_ERROR,
                    extra={**fields, "reason": str(cni_err), "code": cni_err.code},
                )
                raise cni_err from err
            ms = round((time.monotonic() - start) * 1000, 1)
            log.info("cni %s", command, extra={**fields, "ms": ms})
            return result

        return run

    # --- ADD ------------------------------------------------------------------------------

    def add(self, req: CniRequest) -> dict[str, Any]:
        handle = _checked_handle(req)
        host_ifname = pod_host_ifname(req.pod_namespace, req.pod_name, req.container_id)
        mtu = req.config.mtu or self.default_mtu
        with self._locks.hold(handle):
            record = _store(lambda: self.records.get(handle), "get workload")
            if record is not None and record.ifname != req.ifname:
                raise CniError(
                    errors.ATTACHMENT_CONFLICT,
                    f"container already attached to network {req.config.name}",
                    f"as interface {record.ifname!r}, not {req.ifname!r}",
                )
            # Fresh: this call allocates. Otherwise the recorded addresses may be a running
            # pod's, and a failed re-ADD must not take them away (the runtime's DEL may).
            fresh = record is None or not record.addresses
            if fresh:
                _check_netns(req.netns)  # before anything is written: a clean error
            interrupted = record is not None  # an earlier ADD stopped before recording IPs
            try:
                if record is None:
                    record = _store(lambda: self.records.create(self._new_record(req)), "record")
                if not record.addresses:
                    record = self._allocate(req, record, clean_first=interrupted)
                att = self.dp.attach(req.netns, req.ifname, host_ifname, _ips(record), mtu)
            except BaseException:
                if fresh:
                    self._roll_back(handle)
                raise
        return render_result(
            req.config.cni_version,
            Attachment(
                host_ifname=att.host_ifname,
                host_mac=dataplane.HOST_VETH_MAC,
                container_ifname=att.container_ifname,
                container_mac=att.container_mac,
                sandbox=att.netns,
                addresses=att.addresses,
                gateway=dataplane.GATEWAY,
                gateway_v6=dataplane.GATEWAY_V6,
            ),
        )

    def _new_record(self, req: CniRequest) -> Workload:
        return Workload(
            handle_id=req.handle_id,
            node=self.node,
            namespace=req.pod_namespace,
            pod=req.pod_name,
            container_id=req.container_id,
            ifname=req.ifname,
            netns=req.netns,
        )

    def _allocate(self, req: CniRequest, record: Workload, *, clean_first: bool) -> Workload:
        """Assign an address and store it in the record."""
        clean = [clean_first]

        def attempt() -> list[IPAddress]:
            if clean[0]:
                # An earlier attempt (or an ADD interrupted by a crash) may have allocated
                # before failing: start from a clean handle so it never holds two.
                self.ipam.release_handle(req.handle_id)
            clean[0] = True
            return self.ipam.auto_assign(
                AssignRequest(
                    node=self.node,
                    handle_id=req.handle_id,
                    pod=req.pod_name,
                    namespace=req.pod_namespace,
                    pools=req.config.pools,
                )
            )

        ips = retry_unavailable(attempt, f"assign {req.handle_id}")
        addresses = tuple(str(ip) for ip in ips)
        return _store(lambda: self.records.set_addresses(record, addresses), "record addresses")

    def _roll_back(self, handle: str) -> None:
        """After a failed ADD: give the address back and forget the attachment."""
        try:
            _store(lambda: self.ipam.release_handle(handle), f"release {handle}")
            _store(lambda: self.records.forget(handle), f"forget {handle}")
        except Exception as err:  # the runtime's DEL will finish the job
            log.error(
                "rollback after failed ADD incomplete",
                extra={"op": "add", "node": self.node, "handle": handle, "reason": str(err)},
            )

    # --- DEL ------------------------------------------------------------------------------

    def delete(self, req: CniRequest) -> None:
        if not req.container_id or not req.ifname:
            return  # left out as invalid (req.ignored): ADD attached nothing by such values
        try:
            handle = _checked_handle(req)
        except CniError:
            return  # ADD refuses a container ID no handle can be named after: nothing to do
        with self._locks.hold(handle):
            record = _store(lambda: self.records.get(handle), "get workload")
            if record is not None and record.ifname != req.ifname:
                # Another interface of this container holds the handle (this one's ADD was
                # refused as a conflict): nothing of this interface is ours to remove.
                return
            self._release(req, record, handle)

    def _release(self, req: CniRequest | None, record: Workload | None, handle: str) -> None:
        """Detach, release, forget: what DEL and GC do for one attachment."""
        if record is not None:
            namespace, pod, cid = record.namespace, record.pod, record.container_id
            netns, ifname = (req.netns if req else "") or record.netns, record.ifname
        elif req is not None:
            # Never attached by us (or already forgotten): remove a host veth by name, but
            # never reach into the pod for an interface that may be another plugin's.
            namespace, pod, cid = req.pod_namespace, req.pod_name, req.container_id
            netns, ifname = "", req.ifname
        else:
            namespace = pod = cid = netns = ifname = ""
        host_ifname = pod_host_ifname(namespace, pod, cid) if cid else ""
        if host_ifname and not self._taken_over(handle, host_ifname):
            self.dp.detach(host_ifname, netns or None, ifname)
        _store(lambda: self.ipam.release_handle(handle), f"release {handle}")
        _store(lambda: self.records.forget(handle), f"forget {handle}")

    def _taken_over(self, handle: str, host_ifname: str) -> bool:
        """Whether another attachment now owns the host veth name: a new sandbox of the same
        pod whose ADD came before this DEL (its attach replaced our veth already)."""
        others = _store(self.records.on_node, "list workloads")
        return any(
            w.handle_id != handle
            and w.container_id
            and pod_host_ifname(w.namespace, w.pod, w.container_id) == host_ifname
            for w in others
        )

    # --- CHECK ----------------------------------------------------------------------------

    def check(self, req: CniRequest) -> None:
        handle = _checked_handle(req)
        assert req.config.prev_result is not None  # parse_request demands it for CHECK
        prev = parse_prev_result(req.config.prev_result, req.ifname, req.netns)
        with self._locks.hold(handle):
            record = _store(lambda: self.records.get(handle), "get workload")
        if record is None:
            raise CniError(errors.CONTAINER_UNKNOWN, "container unknown", f"no attachment {handle}")
        host_ifname = pod_host_ifname(record.namespace, record.pod, record.container_id)
        problems = []
        recorded = {str(ip) for ip in _ips(record)}
        if {str(n.ip) for n in prev.addresses} != recorded:
            problems.append(
                f"prevResult addresses {sorted(str(n) for n in prev.addresses)} "
                f"differ from the attachment's {sorted(recorded)}"
            )
        if prev.host_ifname is not None and prev.host_ifname != host_ifname:
            problems.append(f"prevResult host interface {prev.host_ifname}, want {host_ifname}")
        problems += self.dp.inspect(
            PodAttachment(
                host_ifname=host_ifname,
                container_ifname=req.ifname,
                netns=req.netns,
                container_mac=prev.container_mac,
                addresses=_nets(record),
                mtu=req.config.mtu or self.default_mtu,
            )
        )
        if problems:
            raise CniError(errors.CHECK_FAILED, "CHECK failed", "; ".join(problems))

    # --- STATUS and GC (CNI 1.1) ----------------------------------------------------------

    def status(self, req: CniRequest) -> None:
        """Ready when the store answers and a pool can serve this node (no retries: the
        runtime asks again)."""
        try:
            pools = self.ipam.usable_pools(self.ipam.node(self.node), 4, req.config.pools)
        except (StoreUnavailable, InvalidInput) as err:
            raise CniError(errors.NOT_AVAILABLE, "l3fabric cannot add pods", str(err)) from err
        if not pools:
            raise CniError(
                errors.NOT_AVAILABLE, "l3fabric cannot add pods", f"no usable pool for {self.node}"
            )

    def gc(self, req: CniRequest) -> None:
        """Release this network's attachments on this node that the runtime no longer lists,
        and allocations of this node left without a record. In-flight calls are skipped."""
        assert req.config.valid_attachments is not None  # parse_request demands it for GC
        valid = {(cid, ifname) for cid, ifname in req.config.valid_attachments}
        prefix = f"{req.config.name}."
        released = []
        recorded = set()
        for record in _store(self.records.on_node, "list workloads"):
            if not record.handle_id.startswith(prefix):
                continue
            recorded.add(record.handle_id)
            if (record.container_id, record.ifname) in valid:
                continue
            with self._locks.hold_if_free(record.handle_id) as free:
                if free:
                    self._release(None, record, record.handle_id)
                    released.append(record.handle_id)
        valid_handles = {f"{prefix}{cid}" for cid, _ in valid}
        for handle in self._allocated_handles(prefix) - recorded - valid_handles:
            with self._locks.hold_if_free(handle) as free:
                # A record appearing meanwhile means an ADD started after our listing.
                if free and _store(partial(self.records.get, handle), "get") is None:
                    _store(partial(self.ipam.release_handle, handle), f"release {handle}")
                    released.append(handle)
        log.info(
            "cni gc",
            extra={"op": "gc", "node": self.node, "released": released, "valid": len(valid)},
        )

    def _allocated_handles(self, prefix: str) -> set[str]:
        return {
            attr.handle_id
            for blk in _store(self.ipam.blocks, "list blocks")
            for attr in blk.attributes
            if attr.node == self.node and attr.handle_id.startswith(prefix)
        }


# --- helpers ---------------------------------------------------------------------------------


def _store(op: Callable[[], T], what: str) -> T:
    return retry_unavailable(op, what)


def _checked_handle(req: CniRequest) -> str:
    try:
        handle_name(req.handle_id)
    except InvalidInput:
        raise CniError(
            errors.INVALID_CONFIG,
            "cannot name the IPAM handle",
            f"{req.handle_id!r} (network name + '.' + CNI_CONTAINERID) must be a DNS "
            "subdomain: letters, digits, '-' and '.', at most 253 characters",
        ) from None
    return req.handle_id


def _check_netns(path: str) -> None:
    try:
        with open_netns(path):
            pass
    except NetnsUnavailable as err:
        raise CniError(errors.NETNS_NOT_FOUND, "pod network namespace not found", str(err)) from err


def _ips(record: Workload) -> list[IPAddress]:
    return [IPAddress(a) for a in record.addresses]


def _nets(record: Workload) -> tuple[IPNetwork, ...]:
    return tuple(IPNetwork(f"{ip}/{32 if ip.version == 4 else 128}") for ip in _ips(record))


def _pod_of(req: CniRequest) -> str:
    return f"{req.pod_namespace}/{req.pod_name}" if req.pod_name else ""
