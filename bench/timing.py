"""Shared timer of the benchmark scripts."""

from __future__ import annotations

import time


def best_of(fn, repeat: int) -> tuple[float, object]:
    """Fastest wall time of ``repeat`` calls of ``fn`` (at least one), and the last result."""
    best, result = float("inf"), None
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result
