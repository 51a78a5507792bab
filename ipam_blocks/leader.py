"""Leader election on a `coordination.k8s.io/v1` Lease, as client-go's leaderelection does it.

Several copies of a controller (the IPAM GC Deployment during a rollout, or with more than one
replica) compete for one Lease in their namespace; the one named in `spec.holderIdentity`
leads while it keeps renewing `spec.renewTime`.

- Expiry is judged on the contender's *own* monotonic clock: a Lease whose content has not
  changed for `leaseDurationSeconds` since this contender first saw it is expired. Clocks of
  different machines are never compared (the timestamps in the Lease are informative only).
- Every write is a compare-and-swap on `metadata.resourceVersion` (409 → someone else wrote
  first: this round is lost, look again next round); creating an existing Lease is the same.
- The leader renews every `retry_period`; when it has not renewed successfully for
  `renew_deadline` it stops leading, before any other contender may take over
  (`renew_deadline` < `lease_duration`).
- On a clean stop the leader releases the Lease (empty holder), so a successor takes over at
  once instead of after `lease_duration`.

Leadership is an efficiency measure for IPAM GC, not what keeps it correct: every GC write is
itself a CAS at the revision it read, so two collectors briefly overlapping (a leader that has
not yet noticed it lost the Lease) cannot free an address twice or free a reused one.

Layers: `decide` is pure (records in, record to write out); a `LeaseClient` (`lease`; the
Kubernetes store backend's, from `Store.lease`) reads and writes the Lease; `LeaderElector`
runs the loop in a thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from ipam_blocks.errors import Conflict, InvalidInput, L3FabricError, StoreUnavailable
from ipam_blocks.lease import LeaseClient, LeaseRecord
from ipam_blocks.model import check_object_name

log = logging.getLogger("l3fabric.leader")


@dataclass(frozen=True)
class LeaseSettings:
    """Which Lease to compete for, as whom, and the timing (client-go's defaults)."""

    namespace: str
    """Namespace of the Lease (the controller's own)."""
    name: str
    """Lease name; every contender of one election uses the same."""
    identity: str
    """This contender's unique name (the pod name)."""
    lease_duration: float = 15.0
    """Seconds a non-leader waits, after the Lease last changed, before taking it over."""
    renew_deadline: float = 10.0
    """Seconds the leader keeps leading without a successful renewal."""
    retry_period: float = 2.0
    """Seconds between attempts to acquire or renew."""

    def __post_init__(self) -> None:
        check_object_name(self.namespace, "lease-namespace")
        check_object_name(self.name, "lease-name")
        if not self.identity:
            raise InvalidInput("identity", "must not be empty")
        if not 0 < self.retry_period < self.renew_deadline < self.lease_duration:
            raise InvalidInput(
                "lease-duration",
                "needs 0 < retry period < renew deadline < lease duration, got "
                f"{self.retry_period:g} / {self.renew_deadline:g} / {self.lease_duration:g}",
            )


@dataclass(frozen=True)
class Observed:
    """A Lease as read: its record, its resourceVersion, and when (this contender's monotonic
    clock) that resourceVersion was first seen."""

    record: LeaseRecord
    revision: str
    seen_at: float


def decide(
    observed: Observed | None, identity: str, duration: int, now: float, wall: datetime
) -> LeaseRecord | None:
    """The record to write (create when `observed` is None, else replace), or None when
    another contender holds a Lease that has not expired on our clock."""
    if observed is None:
        return LeaseRecord(identity, duration, wall, wall, 0)
    current = observed.record
    if current.holder == identity:
        return replace(current, duration=duration, renew_time=wall)
    expired = now - observed.seen_at >= current.duration
    if current.holder and not expired:
        return None
    return LeaseRecord(identity, duration, wall, wall, current.transitions + 1)


class LeaderElector:
    """Competes for the Lease in a background thread; `leading` is set while this contender
    leads. `clock` (monotonic) and `wall` are injectable for tests."""

    def __init__(
        self,
        lease: LeaseClient,
        settings: LeaseSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.lease = lease
        self.settings = settings
        self.leading = threading.Event()
        self._clock = clock
        self._wall = wall
        self._observed: Observed | None = None
        self._last_renewal: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def _fields(self) -> dict[str, str]:
        s = self.settings
        return {"op": "leader", "lease": f"{s.namespace}/{s.name}", "identity": s.identity}

    def try_acquire_or_renew(self) -> bool:
        """One round: read, decide, write. True when this contender leads afterwards."""
        now = self._clock()
        try:
            won = self._round(now)
        except Conflict:
            won = False  # someone else wrote first; the next round reads their write
        except StoreUnavailable as err:
            log.warning("lease round failed", extra={**self._fields, "reason": str(err)})
            won = False
        if won:
            self._last_renewal = now
            if not self.leading.is_set():
                log.info("became leader", extra=self._fields)
            self.leading.set()
        elif self.leading.is_set() and (
            self._last_renewal is None
            or now - self._last_renewal >= self.settings.renew_deadline
            or self._held_by_other()
        ):
            log.warning("stopped leading", extra=self._fields)
            self.leading.clear()
        return self.leading.is_set()

    def _held_by_other(self) -> bool:
        observed = self._observed
        return observed is not None and observed.record.holder != self.settings.identity

    def _round(self, now: float) -> bool:
        current = self.lease.get()
        if current is None:
            self._observed = None
        else:
            record, revision = current
            if self._observed is None or self._observed.revision != revision:
                self._observed = Observed(record, revision, now)
        duration = max(1, round(self.settings.lease_duration))
        wanted = decide(self._observed, self.settings.identity, duration, now, self._wall())
        if wanted is None:
            return False
        if self._observed is None:
            revision = self.lease.create(wanted)
        else:
            revision = self.lease.replace(wanted, self._observed.revision)
        self._observed = Observed(wanted, revision, now)
        return True

    def release(self) -> None:
        """Give the Lease up (empty holder) if this contender holds it; stop leading."""
        was_leading = self.leading.is_set()
        self.leading.clear()
        observed = self._observed
        if not was_leading or observed is None or observed.record.holder != self.settings.identity:
            return
        wall = self._wall()
        released = LeaseRecord("", 1, wall, wall, observed.record.transitions)
        try:
            self.lease.replace(released, observed.revision)
            log.info("released lease", extra=self._fields)
        except L3FabricError as err:
            log.warning("lease not released", extra={**self._fields, "reason": str(err)})

    # -- the background loop ----------------------------------------------------------------

    def start(self) -> LeaderElector:
        self._thread = threading.Thread(target=self._run, name="leader-election", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop competing and release the Lease if held."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.settings.renew_deadline)
        self.release()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.try_acquire_or_renew()
            self._stop.wait(self.settings.retry_period)


__all__ = ["LeaderElector", "LeaseSettings", "Observed", "decide"]
