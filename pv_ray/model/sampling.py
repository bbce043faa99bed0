"""Sampling the backbone: one loop for inference and for training rollouts.

The loop is AnimateDiff's (classifier-free guidance, DDIM), written out so that a training rollout
can keep gradients through the last `grad_steps` denoising steps only (the rest run under
`no_grad`) and VAE-decode only the frames the loss uses. Inference is the same loop with
`grad_steps=0` and every frame decoded, so what is tuned is exactly what is served. The isolation
window lives in the adapter's UNet hook and therefore applies to both.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from diffusers import LCMScheduler
from diffusers.utils.torch_utils import randn_tensor

from pv_ray.errors import InputError
from pv_ray.model.backbone import Backbone
from pv_ray.model.controlnet import Control


@dataclass(frozen=True)
class SampleSpec:
    num_frames: int
    height: int
    width: int
    num_inference_steps: int
    guidance_scale: float
    timestep_spacing: str | None = None  # None: the model folder's scheduler setting


def make_scheduler(backbone: Backbone, spec: SampleSpec):
    """A fresh scheduler with its timesteps set: its step state must not be shared by
    concurrent requests, and rollouts may override the timestep spacing."""
    overrides = {"timestep_spacing": spec.timestep_spacing} if spec.timestep_spacing else {}
    scheduler = type(backbone.scheduler).from_config(backbone.scheduler.config, **overrides)
    scheduler.set_timesteps(spec.num_inference_steps, device=backbone.device)
    return scheduler


def adds_step_noise(backbone: Backbone) -> bool:
    """Whether the sampler draws fresh noise between steps (LCM does; DDIM with eta 0 and Euler
    without churn are deterministic)."""
    return isinstance(backbone.scheduler, LCMScheduler)


def initial_latents(backbone: Backbone, spec: SampleSpec, generator: torch.Generator, batch: int = 1) -> torch.Tensor:
    """Pure noise (B, C, F, h, w), drawn as diffusers' AnimateDiff pipeline draws it."""
    s = backbone.vae_scale_factor
    shape = (batch, backbone.unet.config.in_channels, spec.num_frames, spec.height // s, spec.width // s)
    return randn_tensor(shape, generator=generator, device=backbone.device, dtype=backbone.dtype)


def denoise(
    backbone: Backbone,
    latents: torch.Tensor,
    prompt_embeds: torch.Tensor,
    negative_embeds: torch.Tensor,
    spec: SampleSpec,
    *,
    grad_steps: int = 0,
    on_step: Callable[[int, int], None] | None = None,
    control: Control | None = None,
    step_noise: torch.Generator | list[torch.Generator] | None = None,
) -> torch.Tensor:
    """Run the sampler from `latents` (pure noise, unscaled) to clean latents.

    Gradients flow only through the last `grad_steps` steps; earlier steps run under no_grad.
    `prompt_embeds`/`negative_embeds` are (B, 77, D), one per clip; `control` conditions every
    frame on a ControlNet; `step_noise` draws the noise a sampler adds between steps (LCM's; one
    generator per clip, or one for all)."""
    scheduler = make_scheduler(backbone, spec)
    timesteps = scheduler.timesteps
    latents = latents * scheduler.init_noise_sigma
    cfg = spec.guidance_scale > 1.0
    embeds = torch.cat([negative_embeds, prompt_embeds]) if cfg else prompt_embeds
    embeds = embeds.repeat_interleave(spec.num_frames, dim=0)  # the motion UNet wants one per frame
    first_grad_step = len(timesteps) - grad_steps
    for i, t in enumerate(timesteps):
        with nullcontext() if i >= first_grad_step else torch.no_grad():
            model_input = torch.cat([latents] * 2) if cfg else latents
            model_input = scheduler.scale_model_input(model_input, t)
            extra = control.residuals(model_input, t, embeds) if control is not None else {}
            noise = backbone.unet(model_input, t, encoder_hidden_states=embeds, **extra).sample
            if cfg:
                uncond, text = noise.chunk(2)
                noise = uncond + spec.guidance_scale * (text - uncond)
            latents = scheduler.step(noise, t, latents, generator=step_noise).prev_sample
        if on_step is not None:
            on_step(i + 1, len(timesteps))
    return latents


def generate(
    backbone: Backbone,
    prompt: str,
    spec: SampleSpec,
    *,
    seed: int,
    negative_prompt: str = "",
    on_step: Callable[[int, int], None] | None = None,
    control: Control | None = None,
) -> torch.Tensor:
    """A video for `prompt`: frames (F, 3, H, W) float32 in [-1, 1]. Same seed, same frames."""
    generator = torch.Generator("cpu").manual_seed(seed)
    with torch.no_grad():
        embeds = backbone.encode_prompts([prompt, negative_prompt])
        latents = initial_latents(backbone, spec, generator)
        latents = denoise(
            backbone, latents, embeds[:1], embeds[1:], spec, on_step=on_step, control=control, step_noise=generator
        )
        return backbone.decode_frames(latents)[0].float()


class RequestError(InputError):
    """A generation request outside the configured limits."""


def check_request(limits, spec: SampleSpec, prompt: str, max_sequence_frames: int | None = None) -> None:
    """Refuse requests beyond `limits` (a `LimitsConfig`) with a message naming the bound."""
    problems = []
    if not 1 <= spec.num_frames <= limits.max_frames:
        problems.append(f"frames must be in 1..{limits.max_frames}, got {spec.num_frames}")
    elif max_sequence_frames is not None and spec.num_frames > max_sequence_frames:
        problems.append(
            f"frames must be <= {max_sequence_frames} (the motion adapter's maximum), got {spec.num_frames}"
        )
    if not 1 <= spec.num_inference_steps <= limits.max_steps:
        problems.append(f"steps must be in 1..{limits.max_steps}, got {spec.num_inference_steps}")
    for name, size in (("height", spec.height), ("width", spec.width)):
        if not 32 <= size <= limits.max_resolution or size % 8:
            problems.append(f"{name} must be a multiple of 8 in 32..{limits.max_resolution}, got {size}")
    if not prompt.strip():
        problems.append("prompt is empty")
    elif len(prompt) > limits.max_prompt_chars:
        problems.append(f"prompt is {len(prompt)} characters, the limit is {limits.max_prompt_chars}")
    if problems:
        raise RequestError("; ".join(problems))
