"""Benchmark: one tuning step at the paper's size, counted, and timed where a GPU is at hand.

1. FLOPs, counted (never guessed) with `torch.utils.flop_counter.FlopCounterMode` on the meta
   device, at the paper's settings (SD1.5 UNet + the AnimateDiff motion adapter, 16 frames at
   512x512, 4 denoising steps with CFG 7.5, gradients through the last one, 2 frames decoded and
   scored), part by part: the no-grad rollout steps, the gradient step's forward and backward,
   the VAE decode of the loss frames, the recogniser (glintr100's IResNet-100) on their crops; with
   and without gradient checkpointing (one more UNet forward), and CFG-free. From them the ideal
   step time at a peak (`--peak-tflops`, H200 bf16 dense: about 790) and minutes per identity.
2. Timing (`--device cuda`, or `cpu` at a reduced `--height/--width/--frames`): the full-size
   architecture with random weights built in memory (no download, no model folder), tuned with
   pv-ray's own loop in bf16 with gradient checkpointing on and off: seconds per step (median
   after warm-up), peak GPU memory, achieved TFLOP/s and MFU, minutes per identity at 800 steps,
   and one evaluation clip (25 steps, 16 frames).
3. Identities per rollout (`train.identities_per_batch`): identity-steps per second with K=1 and
   K=4 on the tiny preset (CPU) or at `--batch-size` on a GPU.

Writes one JSON file to `--out` (and prints it). On a GPU with no internet: bring diffusers and
insightface as wheels; no Ray, MLflow or serving package is needed.

    python jobs/benchmarks/bench_fullsize.py --out DIR [--device cuda] [--steps-timed 20]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import stderr_log  # noqa: E402  (this folder is on sys.path: scripts run from here)

log = stderr_log("bench_fullsize")
LORA_TARGETS = r".*attentions\.\d+\.transformer_blocks\.\d+\.attn1\.(to_q|to_k|to_v|to_out\.0)"


# --------------------------------------------------------------------------- the architecture


def sd15_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(  # SD1.5's VAE config
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
        latent_channels=4, norm_num_groups=32, sample_size=512,
    )  # fmt: skip


def iresnet100():
    """insightface's IResNet-100 (glintr100 in antelopev2), the recogniser whose FLOPs count."""
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int):
            super().__init__()
            self.body = nn.Sequential(
                nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.PReLU(cout),
                nn.Conv2d(cout, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
            )  # fmt: skip
            self.down = (
                None
                if stride == 1 and cin == cout
                else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            )

        def forward(self, x):
            return self.body(x) + (x if self.down is None else self.down(x))

    layers, widths, blocks, cin = (3, 13, 30, 3), (64, 128, 256, 512), [], 64
    for n, width in zip(layers, widths):
        for i in range(n):
            blocks.append(Block(cin, width, 2 if i == 0 else 1))
            cin = width
    model = nn.Sequential(
        nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.PReLU(64), *blocks, nn.BatchNorm2d(512),
        nn.Flatten(), nn.Linear(512 * 7 * 7, 512), nn.BatchNorm1d(512),
    )  # fmt: skip
    return model.eval().requires_grad_(False)


def sd15_backbone(device, dtype, tokenizer_dir: Path):
    """The full-size Backbone with random weights, built in memory on `device`."""
    import torch
    from bench_swap import sd15_unet_parts
    from diffusers import UNetMotionModel
    from transformers import CLIPTokenizer

    from pv_ray.model.backbone import Backbone, ModelPaths
    from pv_ray.presets.tiny import clip_text_encoder_and_tokenizer, tiny_scheduler

    torch.manual_seed(0)
    unet = UNetMotionModel.from_unet2d(*sd15_unet_parts())
    text_encoder, _ = clip_text_encoder_and_tokenizer(768, 3072, 12, 12)
    parts = (unet, sd15_vae(), text_encoder)
    for module in parts:
        module.requires_grad_(False).eval().to(device=device, dtype=dtype)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    # The tiny preset's scheduler (v-prediction, trailing): random weights cannot predict noise.
    return Backbone(
        *parts, tokenizer, tiny_scheduler(), device, dtype, ModelPaths(tokenizer_dir, tokenizer_dir, tokenizer_dir)
    )


# ----------------------------------------------------------------------------------- FLOPs


def count_flops(
    height: int, width: int, frames: int, rollout_steps: int, grad_steps: int, guidance: float, loss_frames: int
) -> dict:
    """FLOPs of one tuning step, part by part, on the meta device."""
    import torch
    from bench_swap import sd15_unet_parts
    from diffusers import UNetMotionModel
    from peft import LoraConfig
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        unet = UNetMotionModel.from_unet2d(*sd15_unet_parts())
        vae, recogniser = sd15_vae(), iresnet100()
    unet.requires_grad_(False)
    vae.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=16, lora_alpha=16, target_modules=LORA_TARGETS))
    for name, p in unet.named_parameters():
        p.requires_grad_("lora" in name)
    batch = 2 if guidance > 1 else 1
    latents = torch.randn(batch, 4, frames, height // 8, width // 8, device="meta")
    embeds = torch.randn(batch * frames, 77, 768, device="meta")

    def flops(fn) -> int:
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops()

    def unet_forward():
        with torch.no_grad():
            unet(latents, 999, encoder_hidden_states=embeds)

    def unet_forward_backward():
        unet(latents, 100, encoder_hidden_states=embeds).sample.sum().backward()

    def decode():
        z = torch.randn(loss_frames, 4, height // 8, width // 8, device="meta", requires_grad=True)
        vae.decode(z).sample.sum().backward()

    def recognise():
        crops = torch.randn(loss_frames, 3, 112, 112, device="meta", requires_grad=True)
        recogniser(crops).sum().backward()

    forward, forward_backward = flops(unet_forward), flops(unet_forward_backward)
    parts = {
        "rollout_no_grad_steps": (rollout_steps - grad_steps) * forward,
        "grad_steps_forward_backward": grad_steps * forward_backward,
        "vae_decode_loss_frames": flops(decode),
        "recogniser_loss_frames": flops(recognise),
    }
    total = sum(parts.values())
    return {"parts": parts, "unet_forward": forward, "flops_per_step": total,
            "flops_per_step_gradient_checkpointing": total + grad_steps * forward}  # fmt: skip


# ---------------------------------------------------------------------------------- timing


def time_tuning(
    device,
    height: int,
    width: int,
    frames: int,
    steps: int,
    warmup: int,
    checkpointing: bool,
    guidance: float,
    identities: int = 1,
) -> dict:
    """Seconds per tuning step of pv-ray's loop on the full-size architecture (random weights)."""
    import torch

    from pv_ray.config import load_config
    from pv_ray.faces.analysis import FaceAnalyzer
    from pv_ray.faces.recognizer import load_recognizer
    from pv_ray.faces.tiny_pack import build_tiny_face_pack
    from pv_ray.method.losses import IdentityLoss
    from pv_ray.method.prompts import training_prompts
    from pv_ray.method.tuner import NoTrainingSignal, tune
    from pv_ray.model.adapter import IdentityAdapter
    from pv_ray.presets.tiny import clip_text_encoder_and_tokenizer

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with tempfile.TemporaryDirectory(prefix="pv-ray-bench-") as tmp:
        clip_text_encoder_and_tokenizer()[1].save_pretrained(Path(tmp) / "tokenizer")
        faces = build_tiny_face_pack(Path(tmp) / "faces")
        backbone = sd15_backbone(device, dtype, Path(tmp) / "tokenizer")
        half = device.type == "cuda"
        overrides = [
            "model.base=/unused", f"train.steps={warmup + steps}", f"train.height={height}", f"train.width={width}",
            f"train.gradient_checkpointing={str(checkpointing).lower()}", f"train.num_frames={frames}",
            f"train.guidance_scale={guidance}", "train.mixed_precision=" + ("bf16" if half else "no"),
            "model.dtype=" + ("bfloat16" if half else "float32"),
        ]  # fmt: skip
        cfg = load_config(ROOT / "configs" / "animatediff-sd15.yaml", overrides)
        analyzer = FaceAnalyzer(faces, det_size=512, det_thresh=0.2, min_face_size=8)
        recognizer = load_recognizer(analyzer.recognition_model_path).to(device)
        adapter = IdentityAdapter(backbone.unet, cfg.adapter, backbone.num_train_timesteps)
        loss = IdentityLoss(analyzer, recognizer, torch.nn.functional.normalize(torch.randn(512), dim=0).numpy())
        seconds: list[float] = []
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        # Random weights draw no face (NoTrainingSignal at the end); every step still ran in full.
        with contextlib.suppress(NoTrainingSignal):
            tune(backbone, adapter, loss, training_prompts("person"), cfg.train, height=height, width=width,
                 on_step=lambda m: seconds.append(m.seconds))  # fmt: skip
        timed = seconds[warmup:]
        result = {
            "step_s": statistics.median(timed),
            "steps_timed": len(timed),
            "step_s_all": [round(s, 4) for s in seconds],
        }
        if device.type == "cuda":
            result["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
        result["evaluation_clip_s"] = _time_clip(backbone, height, width, frames)
        return result


def _time_clip(backbone, height: int, width: int, frames: int, steps: int = 25) -> float:
    import torch

    from pv_ray.model.sampling import SampleSpec, generate

    start = time.perf_counter()
    generate(backbone, "a person walking", SampleSpec(frames, height, width, steps, 7.5), seed=0)
    if backbone.device.type == "cuda":
        torch.cuda.synchronize()
    return round(time.perf_counter() - start, 3)


def batching_ratio(steps: int) -> dict:
    """Identity-steps per second on the tiny preset with K=1 and K=4 identities per rollout."""
    from pv_ray.config import load_config
    from pv_ray.method.personalizer import IdentityInput, Personalizer
    from pv_ray.presets.demo import demo_photos

    rates = {}
    photos = list(demo_photos().items())[:4]
    for k in (1, 4):
        cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"train.steps={steps}", f"train.identities_per_batch={k}"])
        personalizer = Personalizer(cfg)
        references = [personalizer.analyzer.reference({f"{i}.png": _png(p)}) for i, (p, _) in photos]
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="pv-ray-bench-") as tmp:
            items = [IdentityInput(i, r, Path(tmp) / i) for (i, _), r in zip(photos, references)]
            for first in range(0, len(items), k):  # K at a time, as a batch worker takes them
                personalizer.personalize_many(items[first : first + k], evaluate=False)
        rates[f"k{k}_identity_steps_per_s"] = round(len(photos) * steps / (time.perf_counter() - start), 3)
    rates["k4_over_k1"] = round(rates["k4_identity_steps_per_s"] / rates["k1_identity_steps_per_s"], 3)
    return rates


def _png(image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for the JSON result")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (timing; FLOPs are counted on meta)")
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--guidance", type=float, default=7.5, help="rollout CFG scale; 1.0 is CFG-free")
    parser.add_argument("--peak-tflops", type=float, default=790.0, help="the accelerator's dense bf16 peak")
    parser.add_argument("--steps-timed", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--batching-steps", type=int, default=10, help="tuning steps per identity for the K=1 vs K=4 ratio"
    )
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--skip-batching", action="store_true")
    args = parser.parse_args(argv)
    import torch

    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    result = {"settings": vars(args) | {"out": str(args.out), "device": str(device)}, "torch": torch.__version__}
    log("counting FLOPs on the meta device")
    paper = count_flops(512, 512, 16, 4, 1, 7.5, 2)
    result["flops"] = paper
    result["flops_cfg_free"] = count_flops(512, 512, 16, 4, 1, 1.0, 2)["flops_per_step"]
    peak = args.peak_tflops * 1e12
    result["flops_per_step"] = paper["flops_per_step"]
    result["ideal_step_s_at_peak"] = round(paper["flops_per_step"] / peak, 4)
    result["ideal_minutes_per_identity_800_steps"] = round(800 * paper["flops_per_step"] / peak / 60, 2)
    if not args.skip_timing:
        measured = count_flops(args.height, args.width, args.frames, 4, 1, args.guidance, 2)
        for checkpointing in (False, True):
            name = "ckpt" if checkpointing else "no_ckpt"
            log(f"timing {args.steps_timed} steps ({name}) on {device} at {args.width}x{args.height}x{args.frames}")
            timing = time_tuning(
                device,
                args.height,
                args.width,
                args.frames,
                args.steps_timed,
                args.warmup,
                checkpointing,
                args.guidance,
            )
            flops = measured["flops_per_step_gradient_checkpointing" if checkpointing else "flops_per_step"]
            timing["tflops_per_s"] = round(flops / timing["step_s"] / 1e12, 2)
            timing["mfu"] = round(flops / timing["step_s"] / peak, 4) if device.type == "cuda" else None
            timing["minutes_per_identity_800_steps"] = round(800 * timing["step_s"] / 60, 2)
            result[name] = timing
        best = min((result["no_ckpt"], result["ckpt"]), key=lambda t: t["step_s"])
        for key in ("step_s", "mfu", "minutes_per_identity_800_steps", "peak_gpu_mib"):
            if key in best:
                result[key] = best[key]
    if not args.skip_batching:
        log("identities per rollout: K=1 vs K=4 on the tiny preset")
        result["identities_per_batch"] = batching_ratio(args.batching_steps)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_fullsize.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
