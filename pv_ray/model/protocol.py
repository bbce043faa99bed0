"""What a text-to-video family must provide to the method, evaluation and serving: `VideoBackbone`.

pv-ray's own code (the sampler, the identity adapter, the tuner, evaluation, the video pipeline,
serving) talks to a backbone only through these members. The families are one folder each:
`pv_ray/model/animatediff/` (a UNet with motion modules) and `pv_ray/model/wan/` (a DiT with flow
matching); `tests/test_protocol.py` tunes, saves, loads and generates with a toy family written
against this protocol alone.

The sampler loop itself (classifier-free guidance, gradients through the last `grad_steps`
steps only, step noise) is shared: a family gives one denoiser call (`predict`), its timesteps
(`make_scheduler`, a diffusers scheduler) and its latent shape (`initial_latents`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from pv_ray.config import AdapterConfig


@dataclass(frozen=True)
class SampleSpec:
    """One clip to sample: its frames, size, denoising steps and guidance."""

    num_frames: int
    height: int
    width: int
    num_inference_steps: int
    guidance_scale: float
    timestep_spacing: str | None = None  # None: the model folder's scheduler setting
    shift: float | None = None  # flow-matching samplers' timestep shift; None: the configured (or folder's)


@runtime_checkable
class VideoBackbone(Protocol):
    """A loaded, frozen text-to-video model. Only the identity adapter (and style LoRAs) injected
    into `denoiser` are ever trained or switched."""

    family: str  # "animatediff", ...: recorded by adapters, compared before one runs
    device: torch.device
    dtype: torch.dtype
    record: dict[str, str]  # family, weights fingerprint, name: what adapters tuned on it record
    denoiser: torch.nn.Module  # the network called once per step; the identity adapter lives in it
    lora_component: str  # diffusers' name of that component: the prefix of its LoRA keys ("unet", "transformer")

    @property
    def faces_folder(self) -> Path:
        """The insightface-format face pack that goes with this backbone's folders."""

    @property
    def num_train_timesteps(self) -> int:
        """The training schedule's length: the isolation window counts in it."""

    @property
    def max_frames(self) -> int | None:
        """The longest clip the model takes (None: no limit of its own)."""

    @property
    def adds_step_noise(self) -> bool:
        """Whether its sampler draws fresh noise between steps (then each clip gets a generator)."""

    def clip_problem(self, spec: SampleSpec) -> str | None:
        """Why the family cannot make a clip of `spec` (a frame count or size it does not take), or None."""

    def adapter_targets(self, cfg: AdapterConfig) -> str:
        """The peft `target_modules` regex of the modules the identity adapter adapts, as `cfg`
        selects them (self-attention always; cross-attention by `cfg.cross_attention`)."""

    def make_scheduler(self, spec: SampleSpec) -> Any:
        """A fresh diffusers scheduler with `spec`'s timesteps set (never shared between requests)."""

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Text embeddings (B, tokens, D), one row per prompt, in the backbone's dtype."""

    def initial_latents(self, spec: SampleSpec, generator: torch.Generator, batch: int = 1) -> torch.Tensor:
        """Pure noise for `batch` clips of `spec`, drawn as the family's diffusers pipeline draws it."""

    def predict(
        self, latents: torch.Tensor, timestep: torch.Tensor, embeds: torch.Tensor, **conditioning: Any
    ) -> torch.Tensor:
        """One denoiser call: the model's prediction for `latents` (already scaled by the
        scheduler) at `timestep`, `embeds` one row per clip; `conditioning` is extra input such
        as ControlNet residuals."""

    def decode_frames(self, latents: torch.Tensor, frame_indices: list[list[int]] | None = None) -> torch.Tensor:
        """Frames (B, F', 3, H, W) in [-1, 1] of clean latents: every frame, or only each clip's
        `frame_indices` (video frames, as many for every clip), differentiably when gradients are
        on (the identity loss decodes a few frames)."""

    def checkpoint_blocks(self, which: bool | str) -> list[torch.nn.Module]:
        """The denoiser's blocks that `train.gradient_checkpointing` (False, True, "outer") recomputes."""
