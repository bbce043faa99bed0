"""The benchmark scripts (jobs/benchmarks/bench_*.py) start and document their options: `--help` only.

The benchmarks themselves are slow measurements, run by hand (docs/BENCHMARKS.md); only the
full-size one's GPU path runs in CI, at a tiny size (tests/test_bench_fullsize.py)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "jobs" / "benchmarks"


@pytest.mark.parametrize(
    "script",
    ["bench_swap.py", "bench_memory.py", "bench_tuning.py", "bench_serve.py", "bench_fullsize.py", "bench_scale.py"],
)
def test_help(script):
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: " + script)


def test_bad_option_is_refused_with_a_message():
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_swap.py"), "--models", "sdxl"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "unknown model(s) ['sdxl']" in done.stderr


def test_percentiles_are_observed_values_by_nearest_rank():
    sys.path.insert(0, str(BENCHMARKS))
    from bench_common import nearest_rank

    samples = [float(v) for v in range(100, 0, -1)]  # 1..100, unsorted
    assert nearest_rank(samples, 0.50) == 50.0
    assert nearest_rank(samples, 0.99) == 99.0  # not 100: 0.99 * 100 must not round up
    assert nearest_rank(samples, 1.0) == 100.0
    assert nearest_rank([3.0, 1.0, 2.0], 0.5) == 2.0
    assert nearest_rank([7.5], 0.01) == 7.5
    with pytest.raises(ValueError, match="at least one value"):
        nearest_rank([], 0.5)


def test_process_cpu_meter_charges_each_process_its_cpu_time_inside_the_window():
    sys.path.insert(0, str(BENCHMARKS))
    from bench_common import ProcessCpuMeter

    busy = "import time\nt = time.process_time()\nwhile time.process_time() - t < {}: pass\n"
    with ProcessCpuMeter(interval=0.25) as meter:
        spinner = subprocess.Popen([sys.executable, "-c", busy.format(1.5)])  # born inside the window
        sleeper = subprocess.Popen(["sleep", "1"])
        spinner.wait(timeout=60)
        sleeper.wait(timeout=60)
    cores = meter.by_process(top=2)
    assert meter.seconds >= 1.5
    spun = cores["python"]["cores"] * meter.seconds  # CPU seconds charged to the spinning process
    assert 1.2 <= spun <= 1.6  # 1.5 s, less at most the 0.25 s interval it may have exited within
    assert next(iter(cores)) == "python"  # the busiest first
    assert "sleep" not in cores or cores["sleep"]["cores"] < 0.05
    assert cores["(others)"]["processes"] >= 1  # everything beyond the top 2 is summed

    # CPU time spent before start() is not charged: the spinner's CPU seconds at that moment are
    # read from the kernel, so the expectation holds however loaded the machine is.
    late = ProcessCpuMeter(interval=0.25)
    spinner = subprocess.Popen([sys.executable, "-c", busy.format(2.0)])
    while sum(psutil.Process(spinner.pid).cpu_times()[:2]) < 0.5:  # user + system
        time.sleep(0.05)
    before = sum(psutil.Process(spinner.pid).cpu_times()[:2])
    late.start()
    spinner.wait(timeout=60)
    late.stop()
    spun = late.by_process()["python"]["cores"] * late.seconds
    # At most 2.0 s of spinning (+ start-up) in all, less what ran before start(); the last
    # interval before it exited (0.25 s) may go uncounted.
    assert 2.0 - before - 0.3 <= spun <= 2.0 + 0.2 - before + 0.05, (before, spun)
