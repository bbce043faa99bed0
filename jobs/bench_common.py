"""What the job scripts share: progress lines on stderr and nearest-rank percentiles."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence


def stderr_log(benchmark: str) -> Callable[[str], None]:
    """A `log(message)` that prints `[benchmark] message` to stderr (stdout carries the JSON)."""

    def log(message: str) -> None:
        print(f"[{benchmark}] {message}", file=sys.stderr, flush=True)

    return log


def nearest_rank(values: Sequence[float], q: float) -> float:
    """The q-quantile (0 < q <= 1) of `values` by the nearest-rank method: always an observed
    value, never interpolated (a p99 of 100 samples is the 99th smallest)."""
    if not values:
        raise ValueError("nearest_rank needs at least one value")
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered) - 1e-9) - 1)]  # 1e-9: 0.99 * 100 is 99.00000000000001
