"""Summaries of repeated measurements: the median and the spread.

A figure is measured once per run (`--repeats` runs, peers interleaved
within a run); within a run a latency figure is itself the median of many
handoffs. summary() keeps the per-run values, so the JSON shows them all.
"""

from __future__ import annotations

import statistics
from typing import Iterable


def quantile(values: list[float], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default)."""
    s = sorted(values)
    if not s:
        return float("nan")
    pos = (len(s) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summary(values: Iterable[float]) -> dict[str, object]:
    v = [float(x) for x in values]
    if not v:
        return {"median": None, "min": None, "max": None, "q1": None, "q3": None, "runs": []}
    return {
        "median": statistics.median(v),
        "min": min(v),
        "max": max(v),
        "q1": quantile(v, 0.25),
        "q3": quantile(v, 0.75),
        "runs": v,
    }


def median(values: Iterable[float]) -> float:
    return float(statistics.median(list(values)))
