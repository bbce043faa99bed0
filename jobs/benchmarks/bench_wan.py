"""Benchmark: one PersonalVideo tuning step on Wan (a DiT), counted, and timed where a GPU is at hand.

1. FLOPs, counted with `torch.utils.flop_counter.FlopCounterMode` on the meta device (never
   guessed), for Wan 2.1 T2V 1.3B at 480x832 with 33 and 81 frames and 14B at 33 frames, as
   configs/wan2.1-t2v-*.yaml tune: an 8-step flow-matching rollout with CFG (two samples per
   forward), gradients through the last step with every transformer block checkpointed, the causal
   VAE decoding the latent frames up to the loss frames (counted for the worst case, the last
   frame: the whole clip), the recogniser (IResNet-100) on 2 crops. No text encoder: the job's
   prompt embeddings are computed once (`pv_ray.model.prompt_embeddings`). From them the ideal step
   time and minutes per identity at 800 steps at the H100's and H200's bf16 dense peak (989 TFLOP/s
   each, NVIDIA's data sheets: the H200 is the H100's compute with more, faster memory).
2. Timing (`--device cuda`, or `cpu` at tiny size): the 1.3B architecture with random weights in
   bf16 (float32 on a CPU; `--size tiny` is the tiny-wan preset's), tuned with pv-ray's own loop
   (`tune_batch`) from a prompt-embeddings cache (the product's path: no text encoder in the
   worker): seconds per step (median after warm-up), peak GPU memory, MFU, minutes per identity,
   for K=1 at `--height/--width/--frames` and K=1 vs K=4 at `--batching-*` size.

Writes `OUT/bench_wan.json` after every measurement (a run cut short keeps what it measured).

    python jobs/benchmarks/bench_wan.py --out DIR [--device cuda] [--size 1.3b|tiny] [--flops-only]
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import counted_flops, stderr_log  # noqa: E402  (this folder is on sys.path: scripts run from here)

log = stderr_log("bench_wan")
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}  # bf16 dense, SXM
TINY = {"num_attention_heads": 2, "attention_head_dim": 12, "ffn_dim": 32, "num_layers": 2, "text_dim": 32}
SIZES = {  # diffusers' configs of Wan-AI/Wan2.1-T2V-{1.3B,14B}-Diffusers/transformer
    "1.3b": {"num_attention_heads": 12, "attention_head_dim": 128, "ffn_dim": 8960, "num_layers": 30, "text_dim": 4096},
    "14b": {"num_attention_heads": 40, "attention_head_dim": 128, "ffn_dim": 13824, "num_layers": 40, "text_dim": 4096},
    "tiny": TINY,
}
TEXT_TOKENS = 512  # WanPipeline pads prompts to 512 tokens


def transformer(size: str):
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2), in_channels=16, out_channels=16, freq_dim=256, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024 if size != "tiny" else 32, **SIZES[size],
    )  # fmt: skip


def vae(size: str):
    from diffusers import AutoencoderKLWan

    if size == "tiny":
        return AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1)
    return AutoencoderKLWan()  # its defaults are Wan 2.1's VAE (base_dim 96, dim_mult 1,2,4,4)


@functools.cache
def count_flops(size: str, height: int, width: int, frames: int, rollout_steps: int = 8, loss_frames: int = 2) -> dict:
    """FLOPs of one tuning step of configs/wan2.1-t2v-*.yaml, part by part, on the meta device."""
    import torch
    from bench_fullsize import iresnet100
    from peft import LoraConfig

    from pv_ray.config import AdapterConfig
    from pv_ray.model.checkpointing import checkpointed_blocks
    from pv_ray.model.wan.backbone import latent_frames_for, wan_attention_targets

    with torch.device("meta"):
        model, decoder, recogniser = transformer(size), vae(size), iresnet100()
    model.requires_grad_(False)
    decoder.requires_grad_(False)
    model.add_adapter(LoraConfig(r=16, lora_alpha=16, target_modules=wan_attention_targets(AdapterConfig())))
    for name, p in model.named_parameters():
        p.requires_grad_("lora" in name)
    latent_frames = latent_frames_for(frames)
    latents = torch.randn(2, 16, latent_frames, height // 8, width // 8, device="meta")  # CFG: two samples
    embeds = torch.randn(2, TEXT_TOKENS, SIZES[size]["text_dim"], device="meta")
    timestep = torch.tensor([100.0, 100.0], device="meta")

    def forward():
        with torch.no_grad():
            model(latents, timestep, embeds)

    def forward_backward():
        with checkpointed_blocks(list(model.blocks)):
            model(latents, timestep, embeds).sample.sum().backward()

    def decode():  # the worst case: the last frame is a loss frame, so every latent frame is decoded
        z = torch.randn(1, 16, latent_frames, height // 8, width // 8, device="meta", requires_grad=True)
        decoder.decode(z).sample.sum().backward()

    def recognise():
        recogniser(torch.randn(loss_frames, 3, 112, 112, device="meta", requires_grad=True)).sum().backward()

    one_forward = counted_flops(forward)
    parts = {
        "rollout_no_grad_steps": (rollout_steps - 1) * one_forward,
        "grad_step_forward_backward_ckpt": counted_flops(forward_backward),
        "vae_decode_up_to_loss_frames_worst": counted_flops(decode),
        "recogniser_loss_frames": counted_flops(recognise),
    }
    total = sum(parts.values())
    result = {"size": size, "height": height, "width": width, "frames": frames, "latent_frames": latent_frames}
    result.update(parts=parts, transformer_forward_cfg=one_forward, flops_per_step=total)
    for gpu, peak in PEAK_TFLOPS.items():
        result[f"ideal_step_s_{gpu}"] = round(total / (peak * 1e12), 3)
        result[f"ideal_minutes_per_identity_800_steps_{gpu}"] = round(800 * total / (peak * 1e12) / 60, 2)
    return result


def wan_rig(size: str, device, dtype, folder: Path, prompts: list[str]):
    """A `WanBackbone` of `size` with random weights built on `device`, conditioned from a prompt
    embeddings cache of random rows (no text encoder: the product's worker path), the tiny face
    pack's analyser and recogniser, and an identity adapter of 4 slots."""
    import torch
    from diffusers import UniPCMultistepScheduler

    from pv_ray.config import load_config
    from pv_ray.faces.analysis import FaceAnalyzer
    from pv_ray.faces.recognizer import load_recognizer
    from pv_ray.faces.tiny_pack import build_tiny_face_pack
    from pv_ray.model.adapter import IdentityAdapter
    from pv_ray.model.prompt_embeddings import PromptEmbeddings
    from pv_ray.model.wan.backbone import WanBackbone, WanPaths

    faces = build_tiny_face_pack(folder / "faces")
    with torch.device(device):
        torch.manual_seed(0)
        model, decoder = transformer(size).to(dtype), vae(size).to(dtype)
    for module in (model, decoder):
        module.requires_grad_(False).eval()
    gen = torch.Generator().manual_seed(0)
    rows = {p: torch.randn(12, SIZES[size]["text_dim"], generator=gen).to(dtype) for p in prompts}
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    paths = WanPaths(base=folder, faces=faces, experts=("transformer",), boundary_ratio=None)
    backbone = WanBackbone([model], decoder, scheduler, device, dtype, paths, {"family": "wan"})
    backbone.prompt_embeddings = PromptEmbeddings(rows, "")
    analyzer = FaceAnalyzer(faces, det_size=512, det_thresh=0.2, min_face_size=8)
    adapter_cfg = load_config(ROOT / "configs" / "wan2.1-t2v-1.3b.yaml", ["model.base=/unused"]).adapter
    adapter = IdentityAdapter.on(backbone, adapter_cfg, slots=4)  # K=1 runs slot 0 alone
    return backbone, analyzer, load_recognizer(analyzer.recognition_model_path).to(device), adapter


def time_tuning(rig, device, height: int, width: int, frames: int, k: int, steps: int, warmup: int) -> dict:
    """Seconds per tuning step of configs/wan2.1-t2v-1.3b.yaml's loop at this size, K per rollout."""
    import numpy as np
    import torch

    from pv_ray.config import load_config
    from pv_ray.method.losses import IdentityLoss
    from pv_ray.method.tuner import IdentityTuning, tune_batch

    backbone, analyzer, recognizer, adapter = rig
    half = device.type == "cuda"
    cfg = load_config(ROOT / "configs" / "wan2.1-t2v-1.3b.yaml", [
        "model.base=/unused", f"train.steps={warmup + steps}", f"train.height={height}", f"train.width={width}",
        f"train.num_frames={frames}", f"train.identities_per_batch={k}", "train.face_det_thresh=0.05",
        "train.mixed_precision=" + ("bf16" if half else "no"), "model.dtype=" + ("bfloat16" if half else "float32"),
    ])  # fmt: skip
    rng = np.random.default_rng(0)
    prompts = list(backbone.prompt_embeddings.rows)
    tunings = []
    for slot in range(k):
        target = rng.standard_normal(512).astype(np.float32)
        loss = IdentityLoss(analyzer, recognizer, target / np.linalg.norm(target), det_thresh=0.05)
        tunings.append(IdentityTuning(slot, loss, prompts))
    seconds: list[float] = []
    faces: list[float] = []
    if half:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    def on_step(tuning, metrics) -> None:
        if tuning.slot == 0:
            seconds.append(metrics.seconds)
            faces.append(metrics.no_face_rate)

    tune_batch(backbone, adapter, tunings, cfg.train, height=height, width=width, on_step=on_step)
    timed = seconds[warmup:]
    result = {
        "height": height, "width": width, "frames": frames, "identities_per_batch": k,
        "step_s": round(statistics.median(timed) * k, 4), "identity_step_s": round(statistics.median(timed), 4),
        "steps_timed": len(timed), "no_face_rate": round(statistics.mean(faces), 3),
    }  # fmt: skip
    if half:
        result["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for bench_wan.json")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (timing; FLOPs are counted on meta)")
    parser.add_argument("--size", default="1.3b", choices=["1.3b", "tiny"], help="the timed architecture")
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--frames", type=int, default=33)
    parser.add_argument("--batching-height", type=int, default=256)
    parser.add_argument("--batching-width", type=int, default=256)
    parser.add_argument("--batching-frames", type=int, default=17)
    parser.add_argument("--steps-timed", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--flops-only", action="store_true", help="count FLOPs, time nothing")
    parser.add_argument(
        "--flops-at", default="1.3b:33,1.3b:81,14b:33", help="size:frames pairs whose step FLOPs are counted (480x832)"
    )
    args = parser.parse_args(argv)

    import torch

    args.out.mkdir(parents=True, exist_ok=True)
    result: dict = {"flops": [], "timing": []}

    def save() -> None:
        (args.out / "bench_wan.json").write_text(json.dumps(result, indent=2) + "\n")

    log("counting FLOPs on the meta device")
    for pair in args.flops_at.split(","):
        size, frames = pair.split(":")
        result["flops"].append(count_flops(size, 480, 832, int(frames)))
        save()
    if args.flops_only:
        print(json.dumps(result, indent=2))
        return
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if args.device == "auto" else args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    result["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    from pv_ray.prompts import training_prompts

    with tempfile.TemporaryDirectory(prefix="pv-ray-bench-wan-") as tmp:
        rig = wan_rig(args.size, device, dtype, Path(tmp), training_prompts("person")[:32] + [""])
        runs = [(args.height, args.width, args.frames, 1)]
        runs += [(args.batching_height, args.batching_width, args.batching_frames, k) for k in (1, 4)]
        for height, width, frames, k in runs:
            log(f"timing {args.size} at {height}x{width}x{frames}, K={k}")
            try:
                timing = time_tuning(rig, device, height, width, frames, k, args.steps_timed, args.warmup)
            except torch.OutOfMemoryError as e:
                timing = {"height": height, "width": width, "frames": frames, "identities_per_batch": k,
                          "out_of_memory": str(e).splitlines()[0]}  # fmt: skip
            if "step_s" in timing:
                timing["minutes_per_identity_800_steps"] = round(800 * timing["identity_step_s"] / 60, 2)
            if "step_s" in timing and args.size != "tiny":  # the tiny run's recogniser is not the counted IResNet-100
                flops = k * count_flops(args.size, height, width, frames)["flops_per_step"]
                timing["tflops_per_s"] = round(flops / timing["step_s"] / 1e12, 3)
                if device.type == "cuda":
                    for gpu, peak in PEAK_TFLOPS.items():
                        timing[f"mfu_at_{gpu}_peak"] = round(flops / timing["step_s"] / (peak * 1e12), 4)
            result["timing"].append(timing)
            save()
        pairs = {t["identities_per_batch"]: t for t in result["timing"][1:] if "identity_step_s" in t}
        if 1 in pairs and 4 in pairs:
            ratio = pairs[1]["identity_step_s"] / pairs[4]["identity_step_s"]
            result["k4_over_k1_identity_steps_per_s"] = round(ratio, 3)
        save()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
