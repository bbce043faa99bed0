"""Benchmark: how fast a loaded backbone switches identity adapters.

Three ways to put an identity's LoRA weights into a loaded UNet, timed per switch:

- resident: the weights are already in memory (the serving replica's LRU cache); pv-ray copies
  them into the injected adapter in place (`IdentityAdapter.load_weights`).
- store: read the adapter from a local `AdapterStore` (`read_weights_bytes`: completion mark,
  read, sha256 check), parse it (`LoraWeights.from_bytes`) and swap it in as above.
- diffusers fresh: what a plain diffusers server does per identity: `unet.load_lora_adapter`
  from the adapter folder (reads the file and injects new LoRA layers) and `delete_adapters`
  after use, on a UNet without pv-ray's adapter.

Models: the tiny preset, and an SD1.5-size AnimateDiff UNet (SD1.5's UNet2DConditionModel
config + a default MotionAdapter, `UNetMotionModel.from_unet2d`) with random weights, rank 16.
Prints one JSON object on stdout (progress on stderr). Reports, never asserts, the targets:
resident switch p99 <= 5 ms at SD1.5 size, store load >= 3x faster than diffusers' fresh load.

    python jobs/benchmarks/bench_swap.py [--models tiny,sd15] [--adapters 8] [--iters 100] [--fresh-iters 20]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench_common import nearest_rank, stderr_log  # noqa: E402  (this folder is on sys.path: scripts run from here)

from pv_ray.config import AdapterConfig, load_config  # noqa: E402
from pv_ray.model.adapter import ADAPTER_NAME, IdentityAdapter  # noqa: E402
from pv_ray.model.animatediff.backbone import spatial_attention_targets  # noqa: E402
from pv_ray.storage.adapter_folder import WEIGHTS_NAME, AdapterFolder, LoraWeights  # noqa: E402
from pv_ray.storage.adapter_store import AdapterStore  # noqa: E402

NUM_TRAIN_TIMESTEPS = 1000
RESIDENT_P99_TARGET_MS = 5.0
STORE_SPEEDUP_TARGET = 3.0


log = stderr_log("bench_swap")


def sd15_unet_parts() -> tuple[torch.nn.Module, torch.nn.Module]:
    """SD1.5's UNet2DConditionModel config and a default-config MotionAdapter (the v1.5 motion
    module layout), random weights (no download)."""
    from diffusers import MotionAdapter, UNet2DConditionModel

    unet2d = UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        cross_attention_dim=768,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    return unet2d, MotionAdapter()


def sd15_motion_unet() -> torch.nn.Module:
    """The AnimateDiff UNet at SD1.5 size with random weights."""
    from diffusers import UNetMotionModel

    return UNetMotionModel.from_unet2d(*sd15_unet_parts())


def tiny_motion_unet() -> torch.nn.Module:
    from diffusers import UNetMotionModel

    from pv_ray.presets.tiny import tiny_unet_and_motion_adapter

    torch.manual_seed(0)
    unet2d, motion_adapter = tiny_unet_and_motion_adapter()
    return UNetMotionModel.from_unet2d(unet2d, motion_adapter)


def percentiles(samples_s: list[float]) -> dict[str, float]:
    ms = sorted(s * 1e3 for s in samples_s)

    def pct(q: float) -> float:
        return nearest_rank(ms, q)

    return {
        "n": len(ms),
        "p50_ms": round(pct(0.50), 3),
        "p99_ms": round(pct(0.99), 3),
        "mean_ms": round(statistics.fmean(ms), 3),
        "max_ms": round(ms[-1], 3),
    }


def timed(fn: Callable[[int], None], iters: int, warmup: int) -> list[float]:
    for i in range(warmup):
        fn(i)
    samples = []
    for i in range(iters):
        t0 = time.perf_counter()
        fn(i)
        samples.append(time.perf_counter() - t0)
    return samples


def random_adapter_weights(adapter: IdentityAdapter, count: int) -> list[LoraWeights]:
    """`count` distinct adapters' weights that fit the injected adapter."""
    out = []
    for seed in range(count):
        gen = torch.Generator().manual_seed(1000 + seed)
        shape = adapter.weights()
        tensors = {k: torch.randn(v.shape, generator=gen) * 0.01 for k, v in shape.tensors.items()}
        out.append(dataclasses.replace(shape, tensors=tensors))
    return out


def bench_model(
    name: str, build: Callable[[], torch.nn.Module], rank: int, workdir: Path, args: argparse.Namespace
) -> dict:
    log(f"{name}: building the UNet (random weights)")
    t0 = time.perf_counter()
    unet = build().eval().requires_grad_(False)
    build_s = time.perf_counter() - t0
    params = sum(p.numel() for p in unet.parameters())
    cfg = AdapterConfig(rank=rank, alpha=rank)
    ids = [f"id-{i:03d}" for i in range(args.adapters)]

    # Write the adapters with pv-ray's writer, then measure diffusers' fresh load on a UNet that
    # has no pv-ray adapter yet (an injected adapter would make it a multi-adapter model).
    adapter = IdentityAdapter(
        unet, cfg, NUM_TRAIN_TIMESTEPS, target_modules=spatial_attention_targets(cfg), component="unet"
    )
    weights = random_adapter_weights(adapter, args.adapters)
    store = AdapterStore(str(workdir / "store"))
    folders = []
    for identity_id, identity_weights in zip(ids, weights):
        folder = workdir / "local" / identity_id
        AdapterFolder(folder).write(identity_weights, {"identity_id": identity_id})
        store.put(identity_id, folder)
        folders.append(folder)
    file_bytes = (folders[0] / WEIGHTS_NAME).stat().st_size
    adapter.remove()
    unet.delete_adapters(ADAPTER_NAME)

    log(f"{name}: diffusers fresh load ({args.fresh_iters} iters)")

    def fresh(i: int) -> None:
        unet.load_lora_adapter(
            str(folders[i % len(folders)]),
            weight_name=WEIGHTS_NAME,
            prefix="unet",
            adapter_name="fresh",
            use_safetensors=True,
        )
        unet.delete_adapters("fresh")

    fresh_samples = timed(fresh, args.fresh_iters, warmup=2)

    adapter = IdentityAdapter(
        unet, cfg, NUM_TRAIN_TIMESTEPS, target_modules=spatial_attention_targets(cfg), component="unet"
    )
    log(f"{name}: resident switch ({args.iters} iters)")
    resident_samples = timed(lambda i: adapter.load_weights(weights[i % len(weights)]), args.iters, warmup=3)

    log(f"{name}: store load + parse + swap ({args.iters} iters)")

    def from_store(i: int) -> None:
        identity_id = ids[i % len(ids)]
        adapter.load_weights(LoraWeights.from_bytes(store.read_weights_bytes(identity_id), source=identity_id))

    store_samples = timed(from_store, args.iters, warmup=3)

    # Lower bound of any in-place swap: the bare tensor copies, without the key and shape checks.
    # Shows how much of a switch is overhead.
    targets = [
        (adapter.layers[k.removeprefix("unet.").rpartition(".lora.")[0]], k.endswith("down.weight"))
        for k in weights[0].tensors
    ]

    def raw_copy(i: int) -> None:
        with torch.no_grad():
            for (layer, is_down), value in zip(targets, weights[i % len(weights)].tensors.values()):
                (layer.lora_A if is_down else layer.lora_B)[ADAPTER_NAME].weight.copy_(value)

    raw_samples = timed(raw_copy, args.iters, warmup=3)
    from_store(args.iters - 1)  # the measured path leaves the adapter holding a store adapter
    # The last swap must have put exactly the stored weights in place: checks the path measured.
    last = LoraWeights.from_bytes(store.read_weights_bytes(ids[(args.iters - 1) % len(ids)])).tensors
    current = adapter.weights().tensors
    if not all(torch.equal(current[k], v) for k, v in last.items()):
        raise RuntimeError(f"{name}: the adapter does not hold the weights just loaded from the store")

    resident, store_stats, fresh_stats = (
        percentiles(resident_samples),
        percentiles(store_samples),
        percentiles(fresh_samples),
    )
    return {
        "unet_params": params,
        "unet_build_s": round(build_s, 1),
        "adapter_rank": rank,
        "adapter_layers": len(adapter.layers),
        "adapter_file_bytes": file_bytes,
        "resident_switch": resident,
        "store_load": store_stats,
        "raw_tensor_copy_lower_bound": percentiles(raw_samples),
        "diffusers_fresh_load": fresh_stats,
        "store_vs_fresh_speedup_p50": round(fresh_stats["p50_ms"] / store_stats["p50_ms"], 2),
        "store_vs_fresh_speedup_p99": round(fresh_stats["p99_ms"] / store_stats["p99_ms"], 2),
        "resident_vs_fresh_speedup_p50": round(fresh_stats["p50_ms"] / resident["p50_ms"], 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="tiny,sd15", help="comma-separated: tiny, sd15 (default: both)")
    parser.add_argument("--adapters", type=int, default=8, help="distinct adapters cycled through (default 8)")
    parser.add_argument(
        "--iters", type=int, default=100, help="timed resident and store switches per model (default 100)"
    )
    parser.add_argument(
        "--fresh-iters", type=int, default=20, help="timed diffusers fresh loads per model (default 20)"
    )
    parser.add_argument(
        "--rank", type=int, default=16, help="LoRA rank at SD1.5 size (default 16; tiny uses its config's rank)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = set(models) - {"tiny", "sd15"}
    if unknown or not models:
        parser.error(f"--models: unknown model(s) {sorted(unknown)}; choose from tiny, sd15")
    if args.adapters < 1 or args.iters < 1 or args.fresh_iters < 1:
        parser.error("--adapters, --iters and --fresh-iters must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)

    tiny_rank = load_config(ROOT / "configs" / "tiny.yaml").adapter.rank
    builders = {"tiny": (tiny_motion_unet, tiny_rank), "sd15": (sd15_motion_unet, args.rank)}
    results = {}
    for m in models:
        workdir = Path(tempfile.mkdtemp(prefix=f"pv-ray-bench-swap-{m}-"))
        try:
            results[m] = bench_model(m, *builders[m], workdir, args)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    targets = {}
    if "sd15" in results:
        sd15 = results["sd15"]
        targets = {
            "sd15_resident_switch_p99_le_5ms": sd15["resident_switch"]["p99_ms"] <= RESIDENT_P99_TARGET_MS,
            "sd15_store_vs_fresh_speedup_ge_3x": sd15["store_vs_fresh_speedup_p50"] >= STORE_SPEEDUP_TARGET,
        }
    print(
        json.dumps(
            {
                "benchmark": "swap",
                "machine": {
                    "cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(),
                    "python": platform.python_version(),
                    "torch": torch.__version__,
                },
                "params": vars(args),
                "results": results,
                "targets_met": targets,
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
