"""Sampling a backbone: one loop for inference and for training rollouts, for every family.

The loop is the diffusers pipelines' (classifier-free guidance, the family's scheduler), written
out so that a training rollout can keep gradients through the last `grad_steps` denoising steps
only (the rest run under `no_grad`) and decode only the frames the loss uses. Inference is the
same loop with `grad_steps=0` and every frame decoded, so what is tuned is exactly what is served.
The isolation window lives in the adapter's hook on the denoiser and therefore applies to both.
A family gives the loop its pieces through the `VideoBackbone` protocol.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch

from pv_ray.errors import InputError
from pv_ray.model.protocol import SampleSpec, VideoBackbone


def denoise(
    backbone: VideoBackbone,
    latents: torch.Tensor,
    prompt_embeds: torch.Tensor,
    negative_embeds: torch.Tensor,
    spec: SampleSpec,
    *,
    grad_steps: int = 0,
    on_step: Callable[[int, int], None] | None = None,
    control: Any = None,
    step_noise: torch.Generator | list[torch.Generator] | None = None,
) -> torch.Tensor:
    """Run the sampler from `latents` (pure noise, unscaled) to clean latents.

    Gradients flow only through the last `grad_steps` steps; earlier steps run under no_grad.
    `prompt_embeds`/`negative_embeds` are (B, tokens, D), one per clip; `control` conditions every
    frame (the family's, e.g. a ControlNet `Control` on AnimateDiff); `step_noise` draws the noise
    a sampler adds between steps (LCM's; one generator per clip, or one for all)."""
    scheduler = backbone.make_scheduler(spec)
    timesteps = scheduler.timesteps
    latents = latents * getattr(scheduler, "init_noise_sigma", 1.0)  # flow matching starts at unit noise
    cfg = spec.guidance_scale > 1.0
    embeds = torch.cat([negative_embeds, prompt_embeds]) if cfg else prompt_embeds
    conditioning = {"control": control} if control is not None else {}
    first_grad_step = len(timesteps) - grad_steps
    step_kwargs = {"generator": step_noise} if step_noise is not None else {}  # deterministic samplers take none
    for i, t in enumerate(timesteps):
        with nullcontext() if i >= first_grad_step else torch.no_grad():
            model_input = torch.cat([latents] * 2) if cfg else latents
            model_input = scheduler.scale_model_input(model_input, t)
            noise = backbone.predict(model_input, t, embeds, **conditioning)
            if cfg:
                uncond, text = noise.chunk(2)
                noise = uncond + spec.guidance_scale * (text - uncond)
            latents = scheduler.step(noise, t, latents, **step_kwargs).prev_sample
        if on_step is not None:
            on_step(i + 1, len(timesteps))
    return latents


def generate(
    backbone: VideoBackbone,
    prompt: str,
    spec: SampleSpec,
    *,
    seed: int,
    negative_prompt: str = "",
    on_step: Callable[[int, int], None] | None = None,
    control: Any = None,
) -> torch.Tensor:
    """A video for `prompt`: frames (F, 3, H, W) float32 in [-1, 1]. Same seed, same frames."""
    generator = torch.Generator("cpu").manual_seed(seed)
    with torch.no_grad():
        embeds = backbone.encode_prompts([prompt, negative_prompt])
        latents = backbone.initial_latents(spec, generator)
        latents = denoise(
            backbone, latents, embeds[:1], embeds[1:], spec, on_step=on_step, control=control,
            step_noise=generator if backbone.adds_step_noise else None,
        )  # fmt: skip
        return backbone.decode_frames(latents)[0].float()


class RequestError(InputError):
    """A generation request outside the configured limits."""


def check_request(limits, spec: SampleSpec, prompt: str, backbone: VideoBackbone | None = None) -> None:
    """Refuse requests beyond `limits` (a `LimitsConfig`) with a message naming the bound; with the
    loaded `backbone`, also clips its family cannot make (`VideoBackbone.clip_problem`)."""
    problems = []
    max_sequence_frames = backbone.max_frames if backbone is not None else None
    if not 1 <= spec.num_frames <= limits.max_frames:
        problems.append(f"frames must be in 1..{limits.max_frames}, got {spec.num_frames}")
    elif max_sequence_frames is not None and spec.num_frames > max_sequence_frames:
        problems.append(f"frames must be <= {max_sequence_frames} (the model's maximum), got {spec.num_frames}")
    elif backbone is not None and (clip_problem := backbone.clip_problem(spec)):
        problems.append(clip_problem)
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
