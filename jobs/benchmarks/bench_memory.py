"""Benchmark: peak memory of one PersonalVideo tuning step at full SD1.5 + AnimateDiff size.

The architecture is the real one with random weights (no download): a diffusers pipeline folder
built once with SD1.5's UNet, VAE and CLIP-L text-encoder configs, a default-config MotionAdapter,
the tiny preset's byte-level tokenizer, scheduler and face pack. Each variant (gradient
checkpointing off, of the outer blocks, of every block; channels_last) runs in a fresh subprocess
that loads it through `Personalizer` and runs `tune` for `--steps` steps: rollout with gradients
through the last denoising step, VAE decode of `loss_frames` frames, identity loss, backward,
AdamW step.

Measured per variant: peak RSS of the tuning step alone (the kernel's high-water mark is reset
after loading, glibc's free memory is trimmed first), RSS after loading, the bytes autograd
keeps for backward (unique storages seen by a saved-tensors hook) and the step time.
torch has no CPU allocator statistics (`torch.cpu.memory_stats` does not exist), so RSS is the
measure. Prints one JSON object on stdout (progress on stderr).

    python jobs/benchmarks/bench_memory.py [--height 64 --width 64 --frames 4] [--variants no-ckpt,ckpt]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import stderr_log  # noqa: E402  (this folder is on sys.path: scripts run from here)

FOLDER_VERSION = 1  # bump when the random full-size architecture below changes
# variant -> (train.gradient_checkpointing, model.channels_last)
VARIANTS = {
    "no-ckpt": (False, False),
    "ckpt-outer": ("outer", False),
    "ckpt": (True, False),
    "channels-last": (False, True),
}
_COMPLETE = ".complete"


log = stderr_log("bench_memory")


# ------------------------------------------------------------------------- the model folder


def build_full_size_folder(out: Path, seed: int = 0) -> None:
    """An AnimateDiff pipeline folder at SD1.5 size with seeded random weights."""
    import torch
    from bench_swap import sd15_unet_parts  # this folder is on sys.path: scripts run from here
    from diffusers import AutoencoderKL

    from pv_ray.presets.tiny import clip_text_encoder_and_tokenizer, ensure_tiny_models, tiny_scheduler

    torch.manual_seed(seed)
    unet2d, motion_adapter = sd15_unet_parts()
    unet2d.save_pretrained(out / "unet")
    motion_adapter.save_pretrained(out / "motion_adapter")
    del unet2d, motion_adapter
    AutoencoderKL(  # SD1.5's VAE config
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=512,
    ).save_pretrained(out / "vae")
    # CLIP ViT-L/14's text tower, as in SD1.5, with the tiny preset's byte-level tokenizer
    # (no download, any text).
    text_encoder, tokenizer = clip_text_encoder_and_tokenizer(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12
    )
    text_encoder.save_pretrained(out / "text_encoder")
    tokenizer.save_pretrained(out / "tokenizer")
    # The tiny preset's scheduler (v-prediction, trailing): random weights cannot predict noise.
    tiny_scheduler().save_pretrained(out / "scheduler")
    shutil.copytree(ensure_tiny_models(seed=0) / "faces", out / "faces")


def ensure_full_size_folder(cache: Path) -> Path:
    target = cache / f"bench-sd15-random-v{FOLDER_VERSION}"
    if (target / _COMPLETE).exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=cache))
    try:
        log(f"building the random full-size pipeline folder into {target} (once; ~6 GB)")
        # A subprocess, so that building does not count in any measured process.
        subprocess.run([sys.executable, __file__, "--build", str(tmp)], check=True, stdout=sys.stderr)
        (tmp / _COMPLETE).write_text("")
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# --------------------------------------------------------------------------- the measurement


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (Linux: `5` to clear_refs); False if refused."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed load-time buffers back first
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class SavedTensorBytes:
    """Bytes of the distinct storages autograd saves for backward while active, leaving out the
    model's own weights (saved by reference, they cost nothing extra): the activations."""

    def __init__(self, *modules) -> None:
        self.weights = {t.untyped_storage().data_ptr() for m in modules for t in (*m.parameters(), *m.buffers())}
        self.storages: dict[int, int] = {}

    def pack(self, tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.weights:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    @staticmethod
    def unpack(tensor):
        return tensor

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def run_variant(folder: Path, args: argparse.Namespace, variant: tuple[bool | str, bool]) -> dict:
    import numpy as np
    import torch

    from pv_ray.config import load_config
    from pv_ray.method.losses import IdentityLoss
    from pv_ray.method.personalizer import Personalizer
    from pv_ray.method.tuner import tune
    from pv_ray.presets.demo import demo_photos
    from pv_ray.prompts import build_prompt_sets

    checkpointing, channels_last = variant
    overrides = [
        "model.preset=null",
        f"model.base={folder}",
        "model.device=cpu",
        "model.dtype=float32",
        f"adapter.rank={args.rank}",
        f"adapter.alpha={args.rank}",
        f"train.steps={args.steps}",
        f"train.num_frames={args.frames}",
        f"train.height={args.height}",
        f"train.width={args.width}",
        f"train.guidance_scale={args.guidance_scale}",
        f"train.rollout_steps={args.rollout_steps}",
        "train.grad_steps=1",
        f"train.loss_frames={args.loss_frames}",
        f"train.gradient_checkpointing={str(checkpointing).lower()}",
        f"model.channels_last={str(channels_last).lower()}",
    ]
    cfg = load_config(ROOT / "configs" / "tiny.yaml", overrides)
    t0 = time.perf_counter()
    personalizer = Personalizer(cfg)
    load_s = time.perf_counter() - t0
    portrait, class_word = demo_photos()["astronaut"]
    from io import BytesIO

    buffer = BytesIO()
    portrait.save(buffer, format="PNG")
    reference = personalizer.analyzer.reference({"astronaut.png": buffer.getvalue()})
    prompts = build_prompt_sets(class_word or reference.class_word, seed=0, eval_count=1).train
    identity_loss = IdentityLoss(personalizer.analyzer, personalizer.recognizer, np.asarray(reference.embedding))
    rss_after_load = _status_kib("VmRSS")
    peak_after_load = _status_kib("VmHWM")
    reset = _reset_peak_rss()
    rss_before_step = _status_kib("VmRSS")

    backbone = personalizer.backbone
    saved = SavedTensorBytes(backbone.unet, backbone.vae, backbone.text_encoder, personalizer.recognizer)
    t0 = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
        history = tune(
            personalizer.backbone,
            personalizer.adapter,
            identity_loss,
            prompts,
            cfg.train,
            height=args.height,
            width=args.width,
        )
    step_s = time.perf_counter() - t0
    peak_step = _status_kib("VmHWM")
    mib = 1 / 1024
    return {
        "gradient_checkpointing": checkpointing,
        "channels_last": channels_last,
        "peak_rss_step_mib": round(peak_step * mib, 1) if reset else None,
        "peak_rss_step_above_loaded_mib": round((peak_step - rss_before_step) * mib, 1) if reset else None,
        "rss_after_load_mib": round(rss_after_load * mib, 1),
        "peak_rss_during_load_mib": round(peak_after_load * mib, 1),
        "ru_maxrss_process_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * mib, 1),
        "peak_reset_ok": reset,
        "autograd_saved_activations_mib": round(saved.total / 2**20, 1),
        "load_s": round(load_s, 1),
        "tune_s": round(step_s, 1),  # includes encoding every training prompt once
        "step_s": round(sum(m.seconds for m in history) / len(history), 2),
        "steps": [
            {"seconds": round(m.seconds, 2), "loss": m.loss, "grad_norm": m.grad_norm, "no_face_rate": m.no_face_rate}
            for m in history
        ],
    }


# ------------------------------------------------------------------------------------ driver


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"comma-separated, of: {', '.join(VARIANTS)} (default: all)"
    )
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--frames", type=int, default=4, help="frames per training rollout (default 4)")
    parser.add_argument("--loss-frames", type=int, default=2, help="frames VAE-decoded and scored (default 2)")
    parser.add_argument("--rollout-steps", type=int, default=4, help="denoising steps per rollout (default 4)")
    parser.add_argument(
        "--guidance-scale",
        type=float,
        default=7.5,
        help="CFG in the rollout; > 1 doubles the UNet batch (default 7.5, as the full config)",
    )
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=1, help="tuning steps per variant (default 1)")
    parser.add_argument(
        "--cache",
        default=None,
        help="where the random model folder is kept (default: $PV_RAY_CACHE or ~/.cache/pv-ray)",
    )
    parser.add_argument("--build", help=argparse.SUPPRESS)  # internal: build the folder here
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: run one variant on this folder
    args = parser.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not variants or set(variants) - set(VARIANTS):
        parser.error(f"--variants: choose from {', '.join(VARIANTS)}")
    if args.height % 8 or args.width % 8 or min(args.height, args.width) < 32:
        parser.error("--height/--width must be multiples of 8, >= 32")

    if args.build:
        build_full_size_folder(Path(args.build))
        return 0
    if args.child:
        folder, variant = args.child.split("::")
        print(json.dumps(run_variant(Path(folder), args, VARIANTS[variant])))
        return 0

    from pv_ray.presets.tiny import default_cache_dir

    folder = ensure_full_size_folder(Path(args.cache).expanduser() if args.cache else default_cache_dir())
    results = {}
    for variant in variants:
        log(f"variant {variant}: fresh subprocess")
        child = [
            sys.executable,
            __file__,
            "--child",
            f"{folder}::{variant}",
            *(argv if argv is not None else sys.argv[1:]),
        ]
        done = subprocess.run(child, check=True, stdout=subprocess.PIPE, text=True)
        results[variant] = json.loads(done.stdout.strip().splitlines()[-1])
    summary = {}
    off = results.get("no-ckpt")
    for name, on in results.items():
        if off is None or name == "no-ckpt" or not (off["peak_rss_step_mib"] and on["peak_rss_step_mib"]):
            continue
        summary[name] = {
            "saves_peak_step_mib": round(off["peak_rss_step_mib"] - on["peak_rss_step_mib"], 1),
            "saves_activations_mib": round(
                off["autograd_saved_activations_mib"] - on["autograd_saved_activations_mib"], 1
            ),
            "step_time_ratio": round(on["step_s"] / off["step_s"], 2),
        }
    import torch

    print(
        json.dumps(
            {
                "benchmark": "memory",
                "machine": {
                    "cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__,
                },
                "model": (
                    "SD1.5 UNet + VAE + CLIP-L text encoder configs, default MotionAdapter, "
                    "random weights, float32, CPU"
                ),
                "params": {k: v for k, v in vars(args).items() if k not in ("build", "child")},
                "results": results,
                "summary": summary,
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
