"""Benchmark: the batch job at scale, where per-identity overhead (not tuning) decides the night.

`run_batch` over `--identities` identities (default 1,000) on the tiny preset, 1 tuning step and
1 evaluation prompt each, `--workers` Ray Train workers on a private local cluster, sqlite MLflow:
the tuning is tiny, so what is measured is everything around it. Reports:

- overhead per identity, first and last `--window` (default 100) finished: the wall time between
  one identity's end and the previous end on the same worker, less its tuning steps (analysis
  wait, evaluation, store writes, MLflow, the progress actor); a job that slows as it grows shows
  it here;
- the time from the start to the first finished identity (the analysis streams into the tuning);
- the driver's peak RSS (`ru_maxrss`), MLflow seconds per worker (lock waits included), the size
  of report.json and rejects.json.

    PV_RAY_CACHE=/tmp/pvray-bench-cache python jobs/benchmarks/bench_scale.py [--identities 1000] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench_common import build_identities, stderr_log  # noqa: E402  (this folder is on sys.path: scripts run from here)

log = stderr_log("bench_scale")


def overheads(identities: dict[str, dict]) -> list[tuple[float, float]]:
    """(finished time, overhead seconds) per done identity, in finishing order: the wall time since
    the previous finish on the same worker (or its own start, for a worker's first), less tuning."""
    done = sorted((e for e in identities.values() if e["status"] == "done"), key=lambda e: e["finished"])
    previous: dict[int, float] = {}
    out = []
    for entry in done:
        since = previous.get(entry["worker"], entry["started"])
        out.append((entry["finished"], entry["finished"] - since - entry["tune_seconds"]))
        previous[entry["worker"]] = entry["finished"]
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--identities", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--window", type=int, default=100, help="identities in the first/last overhead window")
    parser.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    parser.add_argument("--work-dir", default=None, help="where the input tree and the output go (default: temp)")
    args = parser.parse_args(argv)
    if args.identities < 1 or args.workers < 1 or not 1 <= args.window <= args.identities:
        parser.error("--identities and --workers must be >= 1, and 1 <= --window <= --identities")

    import ray

    from pv_ray.cluster.batch import run_batch
    from pv_ray.config import load_config

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="pv-ray-bench-scale-"))
    log(f"writing {args.identities} identity folders under {work / 'in'}")
    build_identities(work / "in", args.identities)
    cfg = load_config(args.config, ["train.steps=1", "eval.num_prompts=1", "eval.num_frames=2"])
    ray.init(
        address="local",
        num_cpus=args.workers + 2,  # logical: the workers, the analysis tasks beside them
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        runtime_env={"env_vars": {"PV_RAY_CACHE": os.environ.get("PV_RAY_CACHE", ""), "OMP_NUM_THREADS": "1"}},
    )
    last_log = [0.0]

    def on_progress(counts: dict[str, int]) -> None:
        if time.monotonic() - last_log[0] > 30:
            last_log[0] = time.monotonic()
            log(f"done {counts['done']} failed {counts['failed']} remaining {counts['remaining']}")

    try:
        t0 = time.time()
        report = run_batch(cfg, str(work / "in"), str(work / "out"), workers=args.workers, on_progress=on_progress)
    finally:
        ray.shutdown()
    ordered = overheads(report.identities)
    first, last = ordered[: args.window], ordered[-args.window :]
    first_mean = statistics.mean(o for _, o in first)
    last_mean = statistics.mean(o for _, o in last)
    loops = report.worker_loops or []
    result = {
        "identities": args.identities,
        "workers": args.workers,
        "counts": report.counts,
        "wall_s": round(report.seconds, 1),
        "identities_per_hour": round(report.counts["done"] / report.seconds * 3600, 1),
        "first_identity_done_s": round(ordered[0][0] - t0, 1) if ordered else None,
        "overhead_first_window_s": round(first_mean, 3),
        "overhead_last_window_s": round(last_mean, 3),
        "overhead_last_over_first": round(last_mean / first_mean, 3) if first_mean else None,
        "tune_seconds_mean": round(
            statistics.mean(e["tune_seconds"] for e in report.identities.values() if e["status"] == "done"), 3
        ),  # fmt: skip
        "driver_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "mlflow_seconds_per_worker": [w.get("tracking_seconds") for w in loops],
        "report_json_bytes": (work / "out" / "report.json").stat().st_size,
        "rejects_json_bytes": (work / "out" / "rejects.json").stat().st_size,
        "step_efficiency": report.step_efficiency,
        "error": report.error,
        "work_dir": str(work),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
