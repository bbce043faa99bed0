"""Benchmark: one tuning step at the paper's size, counted, and timed where a GPU is at hand.

1. FLOPs, counted (never guessed) with `torch.utils.flop_counter.FlopCounterMode` on the meta
   device, at the paper's settings (SD1.5 UNet + the AnimateDiff motion adapter, 16 frames at
   512x512, 4 denoising steps with CFG 7.5, gradients through the last one, 2 frames decoded and
   scored), part by part: the no-grad rollout steps, the gradient step's forward and backward,
   the VAE decode of the loss frames, the recogniser (glintr100's IResNet-100) on their crops; with
   gradient checkpointing of every block and of the outer blocks (the recomputed forwards counted
   as they run), and CFG-free. From them the ideal step time at a peak (`--peak-tflops`, H200 bf16
   dense: about 790) and minutes per identity.
2. Timing (`--device cuda`, or `cpu` at a reduced `--height/--width/--frames`): the full-size
   architecture with random weights, built once on the device (no download, no model folder),
   tuned with pv-ray's own loop in bf16 (float32 on a CPU), for each `--variants` setting:
   gradient checkpointing off, of every block (`ckpt`) or of the outer blocks (`ckpt_outer`),
   channels_last, torch.compile, CFG-free rollouts; seconds per step (median after warm-up), peak
   GPU memory, achieved TFLOP/s, MFU (model FLOPs) and HFU (recomputation counted), minutes per
   identity at 800 steps, identities per GPU-hour, and one evaluation clip (25 CFG steps, or 4
   CFG-free ones for `cfg_free`). A setting that runs out of GPU memory is recorded as such.
3. Identities per rollout (`train.identities_per_batch`): identity-steps per second with K=1 and
   K=4, on the tiny preset on a CPU, on the full-size architecture at `--batching-size` on a GPU.

Writes one JSON file to `--out` after every measurement (a run cut short keeps what it measured)
and prints it at the end. On a GPU machine with no internet: `jobs/benchmarks/gpu_fullsize.sh`
installs the few wheels it needs (no Ray, MLflow or serving package) and runs the GPU settings.

    python jobs/benchmarks/bench_fullsize.py --out DIR [--device cuda] [--variants no_ckpt,ckpt,...]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import counted_flops, stderr_log  # noqa: E402  (this folder is on sys.path: scripts run from here)

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

    from pv_ray.model.animatediff.backbone import AnimateDiffBackbone, ModelPaths
    from pv_ray.presets.tiny import clip_text_encoder_and_tokenizer, tiny_scheduler

    torch.manual_seed(0)
    with torch.device(device):  # random init where the weights live (seconds on a GPU, not minutes)
        unet = UNetMotionModel.from_unet2d(*sd15_unet_parts())
        text_encoder, _ = clip_text_encoder_and_tokenizer(768, 3072, 12, 12)
        parts = (unet, sd15_vae(), text_encoder)
    for module in parts:
        module.requires_grad_(False).eval().to(device=device, dtype=dtype)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    # The tiny preset's scheduler (v-prediction, trailing): random weights cannot predict noise.
    return AnimateDiffBackbone(
        *parts, tokenizer, tiny_scheduler(), device, dtype, ModelPaths(tokenizer_dir, tokenizer_dir, tokenizer_dir)
    )


# ----------------------------------------------------------------------------------- FLOPs


@functools.cache
def count_flops(
    height: int,
    width: int,
    frames: int,
    rollout_steps: int,
    grad_steps: int,
    guidance: float,
    loss_frames: int,
    checkpointing: bool | str = False,
) -> dict:
    """FLOPs of one tuning step, part by part, on the meta device; with `checkpointing`
    (train.gradient_checkpointing) the recomputed forwards in the backward are counted too."""
    batch = 2 if guidance > 1 else 1
    forward = _part_flops("unet_forward", height, width, frames, batch)
    parts = {
        "rollout_no_grad_steps": (rollout_steps - grad_steps) * forward,
        "grad_steps_forward_backward": grad_steps
        * _part_flops("unet_forward_backward", height, width, frames, batch, checkpointing),
        "vae_decode_loss_frames": _part_flops("decode", height, width, loss_frames),
        "recogniser_loss_frames": _part_flops("recognise", 112, 112, loss_frames),
    }
    return {"parts": parts, "unet_forward": forward, "flops_per_step": sum(parts.values())}


@functools.cache
def _meta_models():
    """The LoRA-adapted motion UNet, the VAE and the recogniser on the meta device, built once:
    counting is seconds of dispatch per part, building them again each time adds nothing."""
    import torch
    from bench_swap import sd15_unet_parts
    from diffusers import UNetMotionModel
    from peft import LoraConfig

    with torch.device("meta"):
        unet = UNetMotionModel.from_unet2d(*sd15_unet_parts())
        vae, recogniser = sd15_vae(), iresnet100()
    unet.requires_grad_(False)
    vae.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=16, lora_alpha=16, target_modules=LORA_TARGETS))
    for name, p in unet.named_parameters():
        p.requires_grad_("lora" in name)
    return unet, vae, recogniser


@functools.cache
def _part_flops(part: str, height: int, width: int, frames: int, batch: int = 1, checkpointing=False) -> int:
    """The FLOPs of one part of a tuning step at one shape (counted once per shape: the timed
    settings and the paper's size share most of them). `frames` are the decoded or recognised
    frames for `decode` and `recognise`."""
    import torch

    from pv_ray.model.animatediff.backbone import unet_checkpoint_blocks
    from pv_ray.model.checkpointing import checkpointed_blocks

    unet, vae, recogniser = _meta_models()
    latents = torch.randn(batch, 4, frames, height // 8, width // 8, device="meta")
    embeds = torch.randn(batch * frames, 77, 768, device="meta")

    def unet_forward():
        with torch.no_grad():
            unet(latents, 999, encoder_hidden_states=embeds)

    def unet_forward_backward():
        with checkpointed_blocks(unet_checkpoint_blocks(unet, checkpointing)):
            unet(latents, 100, encoder_hidden_states=embeds).sample.sum().backward()

    def decode():
        z = torch.randn(frames, 4, height // 8, width // 8, device="meta", requires_grad=True)
        vae.decode(z).sample.sum().backward()

    def recognise():
        crops = torch.randn(frames, 3, height, width, device="meta", requires_grad=True)
        recogniser(crops).sum().backward()

    counted = {"unet_forward": unet_forward, "unet_forward_backward": unet_forward_backward, "decode": decode}
    return counted_flops({**counted, "recognise": recognise}[part])


# ---------------------------------------------------------------------------------- timing


@dataclass(frozen=True)
class Variant:
    """One timed setting: `no_ckpt`, or `+`-joined switches (`ckpt` | `ckpt_outer`,
    `channels_last`, `compile`, `cfg_free`), e.g. `ckpt_outer+channels_last`."""

    checkpointing: bool | str = False
    channels_last: bool = False
    compile: bool = False
    cfg_free: bool = False

    @classmethod
    def parse(cls, name: str) -> Variant:
        switches = set(name.split("+")) - {"no_ckpt"}
        unknown = switches - {"ckpt", "ckpt_outer", "channels_last", "compile", "cfg_free"}
        if unknown or {"ckpt", "ckpt_outer"} <= switches:
            raise ValueError(f"variant {name!r}: switches are ckpt or ckpt_outer, channels_last, compile, cfg_free")
        checkpointing = True if "ckpt" in switches else ("outer" if "ckpt_outer" in switches else False)
        return cls(checkpointing, "channels_last" in switches, "compile" in switches, "cfg_free" in switches)


class Rig:
    """The full-size backbone with random weights (built on `device` once for every timed setting),
    the tiny face pack's analyser and recogniser, and an identity adapter with `slots` slots."""

    def __init__(self, device, folder: Path, slots: int):
        import torch

        from pv_ray.config import load_config
        from pv_ray.faces.analysis import FaceAnalyzer
        from pv_ray.faces.recognizer import load_recognizer
        from pv_ray.faces.tiny_pack import build_tiny_face_pack
        from pv_ray.model.adapter import IdentityAdapter
        from pv_ray.presets.tiny import clip_text_encoder_and_tokenizer

        self.device = device
        self.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        clip_text_encoder_and_tokenizer()[1].save_pretrained(folder / "tokenizer")
        faces = build_tiny_face_pack(folder / "faces")
        self.backbone = sd15_backbone(device, self.dtype, folder / "tokenizer")
        self.analyzer = FaceAnalyzer(faces, det_size=512, det_thresh=0.2, min_face_size=8)
        self.recognizer = load_recognizer(self.analyzer.recognition_model_path).to(device)
        adapter_cfg = load_config(ROOT / "configs" / "animatediff-sd15.yaml", ["model.base=/unused"]).adapter
        self.adapter = IdentityAdapter.on(self.backbone, adapter_cfg, slots)

    def config(self, variant: Variant, height: int, width: int, frames: int, steps: int, guidance: float, k: int):
        """animatediff-sd15.yaml at the benchmark's size, with the variant's switches."""
        from pv_ray.config import load_config

        half = self.device.type == "cuda"
        overrides = [
            "model.base=/unused", f"train.steps={steps}", f"train.height={height}", f"train.width={width}",
            f"train.gradient_checkpointing={str(variant.checkpointing).lower()}", f"train.num_frames={frames}",
            f"train.guidance_scale={1.0 if variant.cfg_free else guidance}", f"train.identities_per_batch={k}",
            "train.mixed_precision=" + ("bf16" if half else "no"), "model.dtype=" + ("bfloat16" if half else "float32"),
            f"model.channels_last={str(variant.channels_last).lower()}",
            f"model.compile={str(variant.compile).lower()}",
        ]  # fmt: skip
        return load_config(ROOT / "configs" / "animatediff-sd15.yaml", overrides)

    @contextlib.contextmanager
    def speed_options(self, cfg):
        """model.channels_last and model.compile as the product applies them, undone afterwards."""
        import torch

        from pv_ray.model.animatediff.backbone import apply_speed_options

        apply_speed_options(self.backbone.unet, self.backbone.vae, cfg.model)
        try:
            yield
        finally:
            for module in (self.backbone.unet, self.backbone.vae):
                module.to(memory_format=torch.contiguous_format)
            self.backbone.unet.__dict__.pop("forward", None)  # the compiled forward
            torch.compiler.reset()


def time_tuning(
    rig: Rig,
    height: int,
    width: int,
    frames: int,
    steps: int,
    warmup: int,
    variant: Variant,
    guidance: float,
    k: int = 1,
    clip_steps: int | None = None,
) -> dict:
    """Seconds per tuning step of pv-ray's loop (`tune_batch`, K identities per rollout) on the
    full-size architecture with random weights, and one evaluation clip."""
    import numpy as np
    import torch

    from pv_ray.method.losses import IdentityLoss
    from pv_ray.method.tuner import IdentityTuning, tune_batch
    from pv_ray.prompts import training_prompts

    cfg = rig.config(variant, height, width, frames, warmup + steps, guidance, k)
    rng = np.random.default_rng(0)
    tunings = [
        IdentityTuning(
            slot,
            IdentityLoss(rig.analyzer, rig.recognizer, _unit(rng.standard_normal(512))),
            training_prompts("person"),
        )
        for slot in range(k)
    ]
    seconds: list[float] = []
    if rig.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with rig.speed_options(cfg):
        # Random weights draw no face (each identity ends with NoTrainingSignal); every step still ran
        # in full. `seconds` is each identity's share of the step.
        tune_batch(rig.backbone, rig.adapter, tunings, cfg.train, height=height, width=width,
                   on_step=lambda tuning, m: seconds.append(m.seconds) if tuning.slot == 0 else None)  # fmt: skip
        timed = seconds[warmup:]
        if not timed:
            raise RuntimeError(f"{len(seconds)} steps ran, none after the {warmup} warm-up steps: {tunings[0].failure}")
        result = {
            "identities_per_batch": k,
            "step_s": round(statistics.median(timed) * k, 4),
            "identity_step_s": round(statistics.median(timed), 4),
            "steps_timed": len(timed),
            "step_s_all": [round(s * k, 4) for s in seconds],
        }
        if rig.device.type == "cuda":
            result["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
        # The clip as it is served: 25 CFG steps, or the distilled sampler's 4 CFG-free ones.
        served_steps, clip_guidance = (4, 1.0) if variant.cfg_free else (25, 7.5)
        steps = clip_steps or served_steps
        result["evaluation_clip_s"] = _time_clip(rig.backbone, height, width, frames, steps, clip_guidance)
    return result


def _unit(vector):
    import numpy as np

    return (vector / np.linalg.norm(vector)).astype(np.float32)


def _time_clip(backbone, height: int, width: int, frames: int, steps: int, guidance: float) -> float:
    import torch

    from pv_ray.model.sampling import SampleSpec, generate

    start = time.perf_counter()
    generate(backbone, "a person walking", SampleSpec(frames, height, width, steps, guidance), seed=0)
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
        "--variants",
        default="no_ckpt,ckpt",
        help="comma-separated timed settings: no_ckpt, or +-joined switches of ckpt|ckpt_outer, channels_last, "
        "compile, cfg_free (e.g. ckpt_outer+channels_last,ckpt+compile)",
    )
    parser.add_argument(
        "--batching-steps", type=int, default=10, help="tuning steps per identity for the K=1 vs K=4 ratio"
    )
    parser.add_argument(
        "--batching-size", type=int, default=256, help="on a GPU: height and width of the K=1 vs K=4 comparison"
    )
    parser.add_argument("--batching-variant", default="ckpt", help="on a GPU: the setting of the K comparison")
    parser.add_argument(
        "--clip-steps", type=int, default=None, help="steps of the timed evaluation clip (default: as served, 25 or 4)"
    )
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--skip-batching", action="store_true")
    args = parser.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    try:
        parsed = {name: Variant.parse(name) for name in [*variants, args.batching_variant]}
    except ValueError as e:
        parser.error(str(e))
    import torch

    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    gpu = device.type == "cuda"
    result = {
        "settings": vars(args) | {"out": str(args.out), "device": str(device)},
        "device_name": torch.cuda.get_device_name(device) if gpu else "cpu",
        "torch": torch.__version__,
    }

    def save() -> None:  # after every measurement: a run cut short keeps what it measured
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_fullsize.json").write_text(json.dumps(result, indent=2) + "\n")

    log("counting FLOPs on the meta device")
    paper = count_flops(512, 512, 16, 4, 1, 7.5, 2, False)
    result["flops"] = paper
    result["flops_gradient_checkpointing"] = count_flops(512, 512, 16, 4, 1, 7.5, 2, True)["flops_per_step"]
    result["flops_gradient_checkpointing_outer"] = count_flops(512, 512, 16, 4, 1, 7.5, 2, "outer")["flops_per_step"]
    result["flops_cfg_free"] = count_flops(512, 512, 16, 4, 1, 1.0, 2, False)["flops_per_step"]
    peak = args.peak_tflops * 1e12
    result["flops_per_step"] = paper["flops_per_step"]
    result["ideal_step_s_at_peak"] = round(paper["flops_per_step"] / peak, 4)
    result["ideal_minutes_per_identity_800_steps"] = round(800 * paper["flops_per_step"] / peak / 60, 2)
    save()
    timing_runs = [] if args.skip_timing else [(name, args.height, args.width, 1) for name in variants]
    if gpu and not args.skip_batching:
        size = args.batching_size
        timing_runs += [(args.batching_variant, size, size, k) for k in (1, 4)]
    timing_runs.sort(key=lambda run: parsed[run[0]].compile)  # compiling takes longest: last
    if timing_runs:
        with tempfile.TemporaryDirectory(prefix="pv-ray-bench-") as tmp:
            rig = Rig(device, Path(tmp), slots=max(k for *_, k in timing_runs))
            timings = {}
            for name, height, width, k in timing_runs:
                timings[(name, height, k)] = _timed(rig, args, parsed[name], name, height, width, k, peak)
                if k == 1 and height == args.height:
                    result[name] = timings[(name, height, k)]
                save()
        # The headline: the fastest setting that keeps the paper's CFG rollouts.
        with_cfg = [result[n] for n in variants if not parsed[n].cfg_free and "step_s" in result.get(n, {})]
        best = min(with_cfg, key=lambda t: t["step_s"], default=None)
        for key in ("step_s", "mfu", "minutes_per_identity_800_steps", "identities_per_gpu_hour", "peak_gpu_mib"):
            if best is not None and key in best:
                result[key] = best[key]
        if gpu and not args.skip_batching:
            one, four = (timings[(args.batching_variant, args.batching_size, k)] for k in (1, 4))
            if "identity_step_s" in one and "identity_step_s" in four:
                result["identities_per_batch"] = {
                    "size": f"{args.batching_size}x{args.batching_size}x{args.frames}",
                    "variant": args.batching_variant,
                    "k1_identity_steps_per_s": round(1 / one["identity_step_s"], 3),
                    "k4_identity_steps_per_s": round(1 / four["identity_step_s"], 3),
                    "k4_over_k1": round(one["identity_step_s"] / four["identity_step_s"], 3),
                    "k1": one,
                    "k4": four,
                }
    if not gpu and not args.skip_batching:
        log("identities per rollout: K=1 vs K=4 on the tiny preset")
        result["identities_per_batch"] = batching_ratio(args.batching_steps)
    save()
    print(json.dumps(result, indent=2))


def _timed(rig: Rig, args, variant: Variant, name: str, height: int, width: int, k: int, peak: float) -> dict:
    """One timed setting with its FLOP rates: `mfu` from the model's FLOPs, `hfu` with the
    recomputation of gradient checkpointing counted too; an out-of-memory setting is recorded."""
    import torch

    log(f"timing {args.steps_timed} steps ({name}, K={k}) on {rig.device} at {width}x{height}x{args.frames}")
    try:
        timing = time_tuning(
            rig, height, width, args.frames, args.steps_timed, args.warmup, variant, args.guidance, k, args.clip_steps
        )
    except torch.OutOfMemoryError as e:
        log(f"{name} at {width}x{height}, K={k}: out of GPU memory")
        torch.cuda.empty_cache()
        return {"error": f"out of memory: {str(e).splitlines()[0]}"}
    guidance = 1.0 if variant.cfg_free else args.guidance
    model, hardware = (
        k * count_flops(height, width, args.frames, 4, 1, guidance, 2, which)["flops_per_step"]
        for which in (False, variant.checkpointing)
    )
    timing["flops_per_step"] = model
    timing["tflops_per_s"] = round(model / timing["step_s"] / 1e12, 2)
    if rig.device.type == "cuda":
        timing["mfu"] = round(model / timing["step_s"] / peak, 4)
        timing["hfu"] = round(hardware / timing["step_s"] / peak, 4)
    timing["minutes_per_identity_800_steps"] = round(800 * timing["identity_step_s"] / 60, 2)
    timing["identities_per_gpu_hour"] = round(60 / timing["minutes_per_identity_800_steps"], 2)
    return timing


if __name__ == "__main__":
    main()
