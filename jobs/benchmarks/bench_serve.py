"""Benchmark: the HTTP service under one hot identity vs many identities with Zipf popularity.

Starts a private local Ray cluster and Ray Serve on 127.0.0.1, deploys `serving.app.app_builder`
(tiny preset, generator replicas caching `--cache` adapters, each with `--threads` torch threads)
over a local adapter store of `--identities` random adapters, and drives `POST /v1/generate` from
`--concurrency` client threads in three scenarios:

- one: every request asks for the same identity (always resident after the first), one replica;
- zipf: identity of rank k drawn with probability ~ 1 / k^s among all identities, with the
  replica's cache smaller than the identity count, so cold identities are read from the store;
- zipf_2_replicas: the same sequence with two generator replicas: identity requests spread over
  both (the router sends a request to a free replica, holding its identity or not).

Per scenario: requests/s, p50/p99 latency, errors, and adapter reads from the store (the
`x-pv-ray-adapter-loads` response header). Each scenario stops after `--requests` requests or
`--seconds` seconds, whichever first. Prints one JSON object on stdout (progress on stderr).

    python jobs/benchmarks/bench_serve.py [--identities 50 --cache 8 --requests 120 --concurrency 6]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench_common import nearest_rank, stderr_log  # noqa: E402  (this folder is on sys.path: scripts run from here)

TINY = ROOT / "configs" / "tiny.yaml"
LOADS_HEADER = "x-pv-ray-adapter-loads"
REPLICA_HEADER = "x-pv-ray-replica"


log = stderr_log("bench_serve")


def build_store(root: Path, count: int) -> list[str]:
    """`count` distinct random adapters for the tiny backbone, written by pv-ray's writer."""
    from pv_ray.backbones import load_backbone
    from pv_ray.config import load_config
    from pv_ray.presets.tiny import write_random_adapters

    cfg = load_config(TINY)
    ids = [f"id-{i:03d}" for i in range(count)]
    return write_random_adapters(load_backbone(cfg.model), cfg, str(root / "store"), ids)


def zipf_choices(ids: list[str], count: int, exponent: float, seed: int) -> list[str]:
    import numpy as np

    weights = 1.0 / np.arange(1, len(ids) + 1) ** exponent
    rng = np.random.default_rng(seed)
    return [ids[i] for i in rng.choice(len(ids), size=count, p=weights / weights.sum())]


def percentile_ms(samples_s: list[float], q: float) -> float | None:
    if not samples_s:
        return None
    return round(nearest_rank([s * 1e3 for s in samples_s], q), 1)


def drive(url: str, identities: list[str], body: dict, concurrency: int, deadline_s: float) -> dict:
    """Send one request per entry of `identities` (in order) from `concurrency` threads."""
    import requests

    latencies: list[float] = []
    errors: dict[str, int] = {}
    loads: list[int] = []
    replicas: dict[str, int] = {}
    lock = threading.Lock()
    next_index = iter(range(len(identities)))
    t_end = time.monotonic() + deadline_s

    def worker() -> None:
        session = requests.Session()
        while time.monotonic() < t_end:
            with lock:
                i = next(next_index, None)
            if i is None:
                return
            t0 = time.perf_counter()
            try:
                response = session.post(
                    f"{url}/v1/generate",
                    json=body | {"identity": identities[i]},
                    timeout=max(5.0, t_end - time.monotonic() + 60),
                )
                elapsed = time.perf_counter() - t0
                with lock:
                    if response.status_code == 200:
                        latencies.append(elapsed)
                        loads.append(int(response.headers[LOADS_HEADER]))
                        replica = response.headers[REPLICA_HEADER]
                        replicas[replica] = replicas.get(replica, 0) + 1
                    else:
                        errors[str(response.status_code)] = errors.get(str(response.status_code), 0) + 1
            except requests.RequestException as e:
                with lock:
                    errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(worker) for _ in range(concurrency)]:
            future.result()
    elapsed = time.perf_counter() - t0
    return {
        "requests_ok": len(latencies),
        "errors": errors,
        "seconds": round(elapsed, 1),
        "requests_per_s": round(len(latencies) / elapsed, 3),
        "p50_ms": percentile_ms(latencies, 0.50),
        "p99_ms": percentile_ms(latencies, 0.99),
        "mean_ms": round(statistics.fmean(latencies) * 1e3, 1) if latencies else None,
        "adapter_loads_header_max": max(loads) if loads else None,
        "replicas": sorted(replicas.values(), reverse=True),  # answers per replica
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--identities", type=int, default=50, help="identities in the store (default 50)")
    parser.add_argument(
        "--cache", type=int, default=8, help="adapters cached per replica; must be < --identities (default 8)"
    )
    parser.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of identity popularity (default 1.1)")
    parser.add_argument("--requests", type=int, default=120, help="requests per scenario (default 120)")
    parser.add_argument("--seconds", type=float, default=180.0, help="time limit per scenario (default 180)")
    parser.add_argument("--concurrency", type=int, default=6, help="client threads (default 6)")
    parser.add_argument(
        "--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2), help="torch threads per replica (cores/2)"
    )
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2, help="denoising steps per request (default 2)")
    parser.add_argument("--format", choices=("gif", "mp4"), default="gif")
    parser.add_argument("--seed", type=int, default=0, help="seed of the Zipf request sequence")
    args = parser.parse_args(argv)
    if args.identities < 2 or not 1 <= args.cache < args.identities:
        parser.error("need --identities >= 2 and 1 <= --cache < --identities")
    if args.requests < 1 or args.concurrency < 1 or args.seconds <= 0:
        parser.error("--requests, --concurrency and --seconds must be positive")

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    import requests
    from ray import serve

    from pv_ray.presets.tiny import default_cache_dir
    from serving.app import app_builder

    work = Path(tempfile.mkdtemp(prefix="pv-ray-bench-serve-"))
    log(f"writing {args.identities} adapters under {work}")
    ids = build_store(work, args.identities)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        runtime_env={"env_vars": {"PV_RAY_CACHE": str(default_cache_dir()), "OMP_NUM_THREADS": str(args.threads)}},
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        url = f"http://127.0.0.1:{port}"

        def deploy(replicas: int) -> None:
            app_args = {"config": str(TINY), "store": str(work / "store"), "max_adapters_per_replica": args.cache}
            app_args |= {"replica_cpus": 1, "min_replicas": replicas, "max_replicas": replicas}
            serve.run(app_builder(app_args), name="pv-ray-bench", route_prefix="/")

        t0 = time.perf_counter()
        deploy(1)
        body = {
            "prompt": "a person walking on a beach",
            "num_frames": args.frames,
            "num_inference_steps": args.steps,
            "seed": 0,
            "format": args.format,
        }
        # One untimed request first: the replica's first generate pays one-off costs (lazy imports,
        # the video encoder) that are not what the scenarios compare.
        warm = requests.post(f"{url}/v1/generate", json=body | {"identity": ids[-1]}, timeout=300)
        warm.raise_for_status()
        startup_s = time.perf_counter() - t0
        log(f"deployed and warm in {startup_s:.1f} s")
        scenarios = {}
        zipf = zipf_choices(ids, args.requests, args.zipf, args.seed)
        for name, sequence, replicas in (
            ("one", [ids[0]] * args.requests, 1),
            ("zipf", zipf, 1),
            ("zipf_2_replicas", zipf, 2),
        ):
            if replicas > 1:
                deploy(replicas)
                for _ in range(2 * replicas):  # each replica's first request pays one-off costs
                    requests.post(f"{url}/v1/generate", json=body | {"identity": ids[-1]}, timeout=300)
            loads_before = int(
                requests.post(f"{url}/v1/generate", json=body | {"identity": ids[-1]}, timeout=300).headers[
                    LOADS_HEADER
                ]
            )
            log(f"scenario {name}: {len(sequence)} requests, {len(set(sequence))} distinct identities")
            result = drive(url, sequence, body, args.concurrency, args.seconds)
            result["distinct_identities"] = len(set(sequence[: result["requests_ok"] + sum(result["errors"].values())]))
            if result["adapter_loads_header_max"] is not None and replicas == 1:  # the header is per replica
                result["adapter_store_reads"] = result["adapter_loads_header_max"] - loads_before
            result["replicas_answering"] = result.pop("replicas")
            scenarios[name] = result
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    ratios = {}
    for name, (a, b) in {"zipf_vs_one": ("zipf", "one"), "two_vs_one_replicas": ("zipf_2_replicas", "zipf")}.items():
        if scenarios[a]["requests_per_s"] and scenarios[b]["requests_per_s"]:
            ratios[f"{name}_requests_per_s"] = round(scenarios[a]["requests_per_s"] / scenarios[b]["requests_per_s"], 3)
            ratios[f"{name}_p50"] = round(scenarios[a]["p50_ms"] / scenarios[b]["p50_ms"], 3)
            ratios[f"{name}_p99"] = round(scenarios[a]["p99_ms"] / scenarios[b]["p99_ms"], 3)
    print(
        json.dumps(
            {
                "benchmark": "serve",
                "machine": {"cpus": os.cpu_count()},
                "params": vars(args),
                "startup_s": round(startup_s, 1),
                "scenarios": scenarios,
                "ratios": ratios,
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
