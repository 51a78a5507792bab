"""The one place that decides how store operations are retried.

`retry_conflicts` re-runs a read-modify-CAS-write closure when the write lost a race; the
closure must re-read on every attempt. `retry_unavailable` backs off while the store is down.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from ipam_blocks.errors import Conflict, ContentionBudgetExceeded, StoreUnavailable

T = TypeVar("T")
log = logging.getLogger("l3fabric.retry")


@dataclass(frozen=True)
class RetryBudget:
    """How hard to try before giving up."""

    attempts: int = 200
    """Tries in all, the first included."""
    base_delay: float = 0.0005
    """Seconds before the second try; doubled per try, with full jitter."""
    max_delay: float = 0.05
    """Ceiling of one pause, in seconds."""


CONFLICT_BUDGET = RetryBudget()
UNAVAILABLE_BUDGET = RetryBudget(attempts=6, base_delay=0.2, max_delay=2.0)


def backoff_delay(budget: RetryBudget, attempt: int) -> float:
    """Seconds to wait before try `attempt` + 2: exponential, capped, with full jitter (many
    clients failing together do not come back together)."""
    return random.uniform(0, min(budget.max_delay, budget.base_delay * (2 ** min(attempt, 62))))


def _pause(budget: RetryBudget, attempt: int) -> None:
    time.sleep(backoff_delay(budget, attempt))


def retry_conflicts(op: Callable[[], T], what: str, budget: RetryBudget = CONFLICT_BUDGET) -> T:
    for attempt in range(budget.attempts):
        try:
            return op()
        except Conflict:
            log.debug("conflict, retrying", extra={"op": what, "attempt": attempt})
            _pause(budget, attempt)
    raise ContentionBudgetExceeded(f"{what}: still conflicting after {budget.attempts} attempts")


def retry_unavailable(
    op: Callable[[], T], what: str, budget: RetryBudget = UNAVAILABLE_BUDGET
) -> T:
    for attempt in range(budget.attempts - 1):
        try:
            return op()
        except StoreUnavailable as e:
            log.warning("store unavailable, backing off", extra={"op": what, "reason": str(e)})
            _pause(budget, attempt)
    return op()
