"""Train the `tiny-prior` world: the tiny preset's VAE, UNet and motion adapter, trained on
synthetic videos of moving faces, so that its motion modules carry real motion.

Why: with random weights the tiny motion modules are nearly inert (README, "Notes on the tiny
preset"), so the paper's ablation (a LoRA on the motion modules disturbs motion more than the
spatial adapter) cannot be measured on them. This script turns the same architectures into a
small but real text-to-video model:

1. Synthetic clips, made on the fly: a 128-px window panning over one of scikit-image's
   photos (the camera), and one of scikit-image's LFW face crops, upscaled, tinted and pasted
   with a soft elliptical mask, moving on its own straight line (the subject). Every clip moves.
2. The VAE is trained as an autoencoder on single frames (L1 + MSE + a small KL term); its
   `scaling_factor` is set to 1 / std of the latents, as SD1.5's is.
3. The UNet (spatial layers and motion modules together) is trained on the VAE latents of whole
   clips with the scheduler's own objective (v-prediction), each frame with its own noise, on
   prompts from the shipped training templates (10% empty, for classifier-free guidance).

It writes `vae/`, `unet/` and `motion_adapter/` in diffusers' format (safetensors, float16) and
`train_log.json`; `pv_ray.presets.tiny.ensure_tiny_prior_models` lays them over the tiny preset. Each
stage runs for a time budget, so a run fits a lent GPU's slot. It runs on a CPU (a smoke run) and
on a GPU; the weights in `pv_ray/presets/tiny_prior/` came from one H200, in 408 s, with

    python jobs/train_tiny_prior.py --out DIR --vae-seconds 75 --unet-seconds 330 --unet-batch 48
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent / "benchmarks"))

from bench_common import stderr_log  # noqa: E402  (jobs/benchmarks/ is on sys.path)

from pv_ray.presets.tiny import clip_text_encoder_and_tokenizer, tiny_scheduler, tiny_unet_and_motion_adapter, tiny_vae  # noqa: E402

SIZE = 128
BACKGROUND_SIZE = 256
BACKGROUNDS = (  # scikit-image's bundled photos (no download)
    "coffee",
    "chelsea",
    "rocket",
    "brick",
    "grass",
    "gravel",
    "moon",
    "coins",
    "hubble_deep_field",
    "immunohistochemistry",
    "camera",
)


log = stderr_log("train_tiny_prior")


# ------------------------------------------------------------------------------- the data


def source_images(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(faces (100, 1, 25, 25), backgrounds (N, 3, 256, 256)), float in [0, 1]."""
    import skimage.data

    faces = torch.from_numpy(skimage.data.lfw_subset()[:100]).float()[:, None]  # the first 100 are faces
    backgrounds = []
    for name in BACKGROUNDS:
        image = torch.from_numpy(np.asarray(getattr(skimage.data, name)())).float() / 255.0
        image = image[..., None].expand(*image.shape, 3) if image.ndim == 2 else image[..., :3]
        image = image.permute(2, 0, 1)[None]
        scale = BACKGROUND_SIZE / min(image.shape[-2:])
        image = F.interpolate(image, scale_factor=scale, mode="bilinear", antialias=True, align_corners=False)
        top, left = (image.shape[-2] - BACKGROUND_SIZE) // 2, (image.shape[-1] - BACKGROUND_SIZE) // 2
        image = image[..., top : top + BACKGROUND_SIZE, left : left + BACKGROUND_SIZE]
        backgrounds.append(0.5 + 0.6 * (image - image.mean()))  # lower contrast: the face is the subject
    return faces.to(device), torch.cat(backgrounds).clamp(0, 1).to(device)


def _uniform(gen: torch.Generator, shape, low: float, high: float, device) -> torch.Tensor:
    return (low + (high - low) * torch.rand(shape, generator=gen, device=gen.device)).to(device)


def synthetic_clips(
    faces: torch.Tensor, backgrounds: torch.Tensor, batch: int, frames: int, gen: torch.Generator
) -> torch.Tensor:
    """(B, F, 3, 128, 128) in [-1, 1]: a panning background and a face moving on a line."""
    device = backgrounds.device
    steps = torch.arange(frames, device=device, dtype=torch.float32)[None, :, None]  # (1, F, 1)
    pixels = torch.arange(SIZE, device=device, dtype=torch.float32) + 0.5

    # Camera: the window's top-left corner moves by `pan` px per frame and stays inside the photo.
    pan = _uniform(gen, (batch, 1, 2), -2.0, 2.0, device)
    room = BACKGROUND_SIZE - SIZE - pan.abs() * (frames - 1)
    start = _uniform(gen, (batch, 1, 2), 0.0, 1.0, device) * room + torch.where(pan < 0, -pan * (frames - 1), 0.0)
    corner = start + pan * steps  # (B, F, 2) as (x, y)
    gx = (corner[..., 0:1] + pixels) / BACKGROUND_SIZE * 2 - 1  # (B, F, W)
    gy = (corner[..., 1:2] + pixels) / BACKGROUND_SIZE * 2 - 1  # (B, F, H)
    grid = torch.stack(torch.broadcast_tensors(gx[:, :, None, :], gy[:, :, :, None]), dim=-1).flatten(0, 1)
    index = torch.randint(len(backgrounds), (batch,), generator=gen, device=gen.device).to(device)
    scene = F.grid_sample(backgrounds[index].repeat_interleave(frames, 0), grid, align_corners=False)

    # Subject: a face of `size` px whose centre moves by `speed` px per frame, always in frame.
    size = _uniform(gen, (batch, 1, 1), 44.0, 72.0, device)
    speed = _uniform(gen, (batch, 1, 2), -4.0, 4.0, device)
    lo = size / 2 + torch.where(speed < 0, -speed * (frames - 1), 0.0)
    hi = SIZE - size / 2 - torch.where(speed > 0, speed * (frames - 1), 0.0)
    centre = lo + _uniform(gen, (batch, 1, 2), 0.0, 1.0, device) * (hi - lo) + speed * steps  # (B, F, 2)
    fx = (pixels - centre[..., 0:1]) / (size / 2)  # (B, F, W), -1..1 across the face
    fy = (pixels - centre[..., 1:2]) / (size / 2)
    fx, fy = torch.broadcast_tensors(fx[:, :, None, :], fy[:, :, :, None])
    face_index = torch.randint(len(faces), (batch,), generator=gen, device=gen.device).to(device)
    face = F.grid_sample(
        faces[face_index].repeat_interleave(frames, 0), torch.stack([fx, fy], -1).flatten(0, 1), align_corners=False
    )
    tint = _uniform(gen, (batch, 1), 0.75, 1.15, device) * torch.tensor([1.0, 0.85, 0.72], device=device)  # skin-toned
    face = face * tint.repeat_interleave(frames, 0)[:, :, None, None]
    radius = torch.sqrt((fx / 0.82) ** 2 + (fy / 0.98) ** 2).flatten(0, 1)[:, None]
    alpha = ((1.0 - radius) * 10.0).clamp(0, 1)
    clip = scene * (1 - alpha) + face * alpha
    return (clip.clamp(0, 1) * 2 - 1).reshape(batch, frames, 3, SIZE, SIZE)


# ------------------------------------------------------------------------------- training


def _schedule(optimizer: torch.optim.Optimizer, lr: float, fraction: float, warmup: float = 0.03) -> None:
    """Linear warm-up then cosine decay, by the fraction of the time budget spent."""
    scale = (
        fraction / warmup
        if fraction < warmup
        else 0.5 * (1 + math.cos(math.pi * min(1.0, (fraction - warmup) / (1 - warmup))))
    )
    for group in optimizer.param_groups:
        group["lr"] = lr * max(scale, 0.02)


def _budget(seconds: float, max_steps: int):
    """Yield (step, fraction of the budget spent) until `seconds` or `max_steps` run out."""
    start = time.perf_counter()
    for step in range(max_steps):
        spent = (time.perf_counter() - start) / seconds
        if spent >= 1.0:
            return
        yield step, max(spent, step / max_steps)


def train_vae(vae, faces, backgrounds, args, gen, history: list) -> tuple[int, float]:
    vae.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    for step, fraction in _budget(args.vae_seconds, args.max_steps):
        _schedule(optimizer, args.vae_lr, fraction)
        images = synthetic_clips(faces, backgrounds, args.vae_batch // 2, 2, gen).flatten(0, 1)
        posterior = vae.encode(images).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = F.l1_loss(recon, images) + F.mse_loss(recon, images) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        if step % 50 == 0:
            history.append({"step": step, "loss": float(loss.detach()), "l1": float(F.l1_loss(recon.detach(), images))})
            log(f"vae step {step} loss {history[-1]['loss']:.4f} l1 {history[-1]['l1']:.4f}")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        images = synthetic_clips(faces, backgrounds, 64, 2, gen).flatten(0, 1)
        std = float(vae.encode(images).latent_dist.mode().std())
    vae.register_to_config(scaling_factor=1.0 / std)
    return step + 1, std


def train_unet(unet, vae, embeds, faces, backgrounds, scheduler, args, gen, history: list) -> int:
    unet.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.unet_lr, weight_decay=0.01)
    scale = vae.config.scaling_factor
    for step, fraction in _budget(args.unet_seconds, args.max_steps):
        _schedule(optimizer, args.unet_lr, fraction)
        with torch.no_grad():
            # Alternate clip lengths: tuning rolls out short clips, evaluation and serving longer ones.
            frames = args.frames if step % 2 == 0 else max(2, args.frames // 2)
            clips = synthetic_clips(faces, backgrounds, args.unet_batch, frames, gen)
            b, f = clips.shape[:2]
            latents = vae.encode(clips.flatten(0, 1)).latent_dist.sample() * scale
            latents = latents.reshape(b, f, *latents.shape[1:]).permute(0, 2, 1, 3, 4)  # (B, C, F, h, w)
            noise = torch.randn_like(latents)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), device=latents.device)
            noisy = scheduler.add_noise(latents, noise, t)
            target = scheduler.get_velocity(latents, noise, t)
            which = torch.randint(len(embeds), (b,), device=latents.device)  # row 0 is the empty prompt
            which = torch.where(torch.rand(b, device=latents.device) < 0.1, 0, which)
            context = embeds[which].repeat_interleave(f, 0)
        prediction = unet(noisy, t, encoder_hidden_states=context).sample
        loss = F.mse_loss(prediction, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        if step % 50 == 0:
            history.append({"step": step, "loss": float(loss.detach())})
            log(f"unet step {step} loss {history[-1]['loss']:.4f}")
    unet.eval().requires_grad_(False)
    return step + 1


def split_motion_unet(unet, unet2d, motion_adapter) -> None:
    """Copy the trained weights back into a UNet2DConditionModel (the spatial layers) and a
    MotionAdapter, the formats `Backbone.from_pretrained` reads: UNetMotionModel keeps both under the
    same names."""
    state = unet.state_dict()
    unet2d.load_state_dict({k: v for k, v in state.items() if "motion_modules" not in k}, strict=True)
    motion_adapter.load_state_dict({k: v for k, v in state.items() if "motion_modules" in k}, strict=True)


def positive(text: str) -> float:
    if not float(text) > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return float(text)


def positive_int(text: str) -> int:
    if int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return int(text)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", required=True, type=Path, help="folder for vae/, unet/, motion_adapter/, train_log.json"
    )
    parser.add_argument("--vae-seconds", type=positive, default=60.0, help="time budget of the VAE stage")
    parser.add_argument("--unet-seconds", type=positive, default=240.0, help="time budget of the UNet stage")
    parser.add_argument("--max-steps", type=positive_int, default=1_000_000, help="per stage, whichever ends first")
    parser.add_argument("--vae-batch", type=positive_int, default=64, help="frames per VAE step")
    parser.add_argument("--unet-batch", type=positive_int, default=32, help="clips per UNet step")
    parser.add_argument("--frames", type=int, default=8, help="frames per clip (every other step: half as many)")
    parser.add_argument("--vae-lr", type=float, default=1e-3)
    parser.add_argument("--unet-lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from diffusers import UNetMotionModel

    from pv_ray.prompts import format_prompt, shipped_training_templates

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True  # every step has the same shapes
    torch.manual_seed(args.seed)
    gen = torch.Generator(device).manual_seed(args.seed)
    started = time.perf_counter()

    # Start from the tiny preset's own seeded weights (seed 0), as `build_tiny_models` makes them.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet2d, motion_adapter = tiny_unet_and_motion_adapter()
        vae = tiny_vae()
        text_encoder, tokenizer = clip_text_encoder_and_tokenizer()
    scheduler = tiny_scheduler()
    faces, backgrounds = source_images(device)
    vae.to(device)
    unet = UNetMotionModel.from_unet2d(unet2d, motion_adapter).to(device)

    prompts = [""] + [format_prompt(t, "person") for t in shipped_training_templates()]
    with torch.no_grad():
        ids = tokenizer(
            prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        )
        embeds = text_encoder(ids.input_ids)[0].to(device)

    vae_history, unet_history = [], []
    vae_steps, latent_std = train_vae(vae, faces, backgrounds, args, gen, vae_history)
    log(f"vae done: latent std {latent_std:.4f}, scaling_factor {vae.config.scaling_factor:.4f}")
    unet_steps = train_unet(unet, vae, embeds, faces, backgrounds, scheduler, args, gen, unet_history)

    args.out.mkdir(parents=True, exist_ok=True)
    split_motion_unet(unet.cpu(), unet2d, motion_adapter)
    for name, model in (("unet", unet2d), ("motion_adapter", motion_adapter), ("vae", vae.cpu())):
        model.to(torch.float16).save_pretrained(args.out / name)  # float16 halves the shipped files
    report = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "seconds": round(time.perf_counter() - started, 1),
        "vae_steps": vae_steps,
        "unet_steps": unet_steps,
        "latent_std": latent_std,
        "vae_history": vae_history,
        "unet_history": unet_history,
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    (args.out / "train_log.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: v for k, v in report.items() if not k.endswith("history")}))
    return report


if __name__ == "__main__":
    main()
