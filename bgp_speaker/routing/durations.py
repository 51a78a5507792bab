"""A histogram of durations, kept as Prometheus reads one (cumulative buckets, sum, count)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["RECONCILE_BUCKETS", "Durations"]

# A reconcile from the caches takes milliseconds; one that writes many routes, up to seconds.
RECONCILE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


@dataclass
class Durations:
    buckets: tuple[float, ...] = RECONCILE_BUCKETS
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.buckets)

    def observe(self, seconds: float) -> None:
        self.total += seconds
        self.count += 1
        for i, bound in enumerate(self.buckets):
            if seconds <= bound:
                self.counts[i] += 1

    def to_dict(self) -> dict[str, Any]:
        """Cumulative counts per upper bound (as text, "+Inf" last), the sum and the count."""
        buckets = [(str(b), c) for b, c in zip(self.buckets, self.counts, strict=True)]
        return {"buckets": [*buckets, ("+Inf", self.count)], "sum": self.total, "count": self.count}
