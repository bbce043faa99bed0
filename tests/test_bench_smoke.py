"""The benchmark scripts (jobs/bench_*.py) start and document their options: `--help` only.

The benchmarks themselves are slow measurements, run by hand (docs/BENCHMARKS.md), never in CI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

JOBS = Path(__file__).resolve().parents[1] / "jobs"


@pytest.mark.parametrize("script", ["bench_swap.py", "bench_memory.py", "bench_tuning.py", "bench_serve.py"])
def test_help(script):
    done = subprocess.run([sys.executable, str(JOBS / script), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: " + script)


def test_bad_option_is_refused_with_a_message():
    done = subprocess.run([sys.executable, str(JOBS / "bench_swap.py"), "--models", "sdxl"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "unknown model(s) ['sdxl']" in done.stderr


def test_percentiles_are_observed_values_by_nearest_rank():
    sys.path.insert(0, str(JOBS))
    from bench_common import nearest_rank

    samples = [float(v) for v in range(100, 0, -1)]  # 1..100, unsorted
    assert nearest_rank(samples, 0.50) == 50.0
    assert nearest_rank(samples, 0.99) == 99.0  # not 100: 0.99 * 100 must not round up
    assert nearest_rank(samples, 1.0) == 100.0
    assert nearest_rank([3.0, 1.0, 2.0], 0.5) == 2.0
    assert nearest_rank([7.5], 0.01) == 7.5
    with pytest.raises(ValueError, match="at least one value"):
        nearest_rank([], 0.5)
