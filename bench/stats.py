"""Latency statistics: percentiles by linear interpolation between closest ranks (numpy's default)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from pydantic import BaseModel


class LatencySummary(BaseModel):
    count: int
    mean_ms: float
    min_ms: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float


def percentile(samples: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100): rank ``q/100 * (n-1)`` in the sorted samples, interpolated."""
    if not samples:
        raise ValueError("percentile of no samples")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    ordered = sorted(samples)
    rank = q / 100 * (len(ordered) - 1)
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize(samples_ms: Sequence[float]) -> LatencySummary:
    if not samples_ms:
        raise ValueError("summary of no samples")
    return LatencySummary(
        count=len(samples_ms),
        mean_ms=sum(samples_ms) / len(samples_ms),
        min_ms=min(samples_ms),
        p50_ms=percentile(samples_ms, 50),
        p95_ms=percentile(samples_ms, 95),
        p99_ms=percentile(samples_ms, 99),
        max_ms=max(samples_ms),
    )
