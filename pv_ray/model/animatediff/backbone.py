"""AnimateDiff (SD1.5 2D UNet + MotionAdapter) as a `VideoBackbone`.

Real weights and tiny weights go through the same loader: a diffusers SD1.5-layout folder
(unet/, vae/, text_encoder/, tokenizer/, scheduler/) plus a MotionAdapter folder. Which folders a
config names (a preset's are built on demand) is decided above the model layer, in `pv_ray.backbones`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pv_ray.config import AdapterConfig, ModelConfig
from pv_ray.model.loading import DTYPES, ModelFolderError, resolve_device, weights_record
from pv_ray.model.protocol import SampleSpec

FAMILY = "animatediff"
_PIPELINE_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
_WEIGHTS_PARTS = ("unet", "vae", "text_encoder")  # of model.base; the motion adapter's folder besides


@dataclass(frozen=True)
class ModelPaths:
    base: Path
    motion_adapter: Path
    faces: Path


def checked_model_paths(cfg: ModelConfig, base: Path) -> ModelPaths:
    """The backbone's checked local folders: `base` (a diffusers SD1.5 folder) and the motion
    adapter and face pack the config names (default: inside `base`)."""
    motion = Path(cfg.motion_adapter).expanduser() if cfg.motion_adapter else base / "motion_adapter"
    faces = Path(cfg.faces).expanduser() if cfg.faces else base / "faces"
    if not base.is_dir():
        raise ModelFolderError(f"model.base folder not found: {base}")
    missing = [p for p in _PIPELINE_PARTS if not (base / p).is_dir()]
    if missing:
        raise ModelFolderError(
            f"model.base {base} lacks {', '.join(s + '/' for s in missing)} (need a diffusers SD1.5 folder)"
        )
    if not (motion / "config.json").is_file():
        raise ModelFolderError(f"model.motion_adapter folder not found or has no config.json: {motion}")
    return ModelPaths(base=base, motion_adapter=motion, faces=faces)


def backbone_record(paths: ModelPaths, name: str) -> dict[str, str]:
    """The record adapters tuned on these folders keep (`weights_record`)."""
    folders = [(part, paths.base / part) for part in _WEIGHTS_PARTS] + [("motion_adapter", paths.motion_adapter)]
    return weights_record(FAMILY, folders, name)


def load_scheduler(base: Path, cfg: ModelConfig):
    """The configured sampler (model.scheduler) from the folder's scheduler config."""
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, LCMScheduler

    kind = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "lcm": LCMScheduler}[cfg.scheduler]
    overrides = {"beta_schedule": cfg.beta_schedule, "timestep_spacing": cfg.timestep_spacing}
    overrides = {key: value for key, value in overrides.items() if value is not None}
    return kind.from_pretrained(base, subfolder="scheduler", **overrides)


def apply_speed_options(unet: torch.nn.Module, vae: torch.nn.Module, cfg: ModelConfig) -> None:
    """model.channels_last and model.compile, on a loaded UNet and VAE."""
    if cfg.channels_last:
        unet.to(memory_format=torch.channels_last)
        vae.to(memory_format=torch.channels_last)
    if cfg.compile:
        # The forward alone: the module's hooks (the isolation window) stay eager around it.
        unet.forward = torch.compile(unet.forward)


@dataclass
class AnimateDiffBackbone:
    """The loaded, frozen AnimateDiff backbone. Only adapters added on top of `unet` are ever trained."""

    unet: torch.nn.Module  # diffusers UNetMotionModel
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object
    device: torch.device
    dtype: torch.dtype
    paths: ModelPaths
    record: dict[str, str] = field(default_factory=dict)  # `backbone_record`: what adapters tuned on it record

    family = FAMILY
    lora_component = "unet"

    @classmethod
    def from_pretrained(cls, paths: ModelPaths, cfg: ModelConfig, name: str) -> AnimateDiffBackbone:
        """Load the folders `paths` with the config's dtype, device, sampler and speed options;
        `name` is the one adapters tuned on it record."""
        from diffusers import AutoencoderKL, MotionAdapter, UNet2DConditionModel, UNetMotionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        device, dtype = resolve_device(cfg.device), DTYPES[cfg.dtype]
        unet2d = UNet2DConditionModel.from_pretrained(paths.base, subfolder="unet", use_safetensors=True)
        motion_adapter = MotionAdapter.from_pretrained(paths.motion_adapter, use_safetensors=True)
        unet = UNetMotionModel.from_unet2d(unet2d, motion_adapter)
        del unet2d, motion_adapter
        vae = AutoencoderKL.from_pretrained(paths.base, subfolder="vae", use_safetensors=True)
        text_encoder = CLIPTextModel.from_pretrained(paths.base, subfolder="text_encoder", use_safetensors=True)
        tokenizer = CLIPTokenizer.from_pretrained(paths.base, subfolder="tokenizer")
        scheduler = load_scheduler(paths.base, cfg)
        for module in (unet, vae, text_encoder):
            module.requires_grad_(False)
            module.eval()
            module.to(device=device, dtype=dtype)
        apply_speed_options(unet, vae, cfg)
        return cls(unet, vae, text_encoder, tokenizer, scheduler, device, dtype, paths, backbone_record(paths, name))

    # -- the VideoBackbone protocol ------------------------------------------------------------
    @property
    def denoiser(self) -> torch.nn.Module:
        return self.unet

    def adapter_targets(self, cfg: AdapterConfig) -> str:
        return spatial_attention_targets(cfg)

    def clip_problem(self, spec: SampleSpec) -> str | None:
        return None  # any frame count up to `max_frames`, any multiple of 8 px (the request limits)

    @property
    def faces_folder(self) -> Path:
        return self.paths.faces

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    @property
    def max_frames(self) -> int | None:
        return self.unet.config.motion_max_seq_length

    @property
    def adds_step_noise(self) -> bool:
        """LCM draws fresh noise between steps; DDIM with eta 0 and Euler without churn do not."""
        from diffusers import LCMScheduler

        return isinstance(self.scheduler, LCMScheduler)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def make_scheduler(self, spec: SampleSpec):
        """A fresh scheduler with its timesteps set: its step state must not be shared by
        concurrent requests, and rollouts may override the timestep spacing."""
        overrides = {"timestep_spacing": spec.timestep_spacing} if spec.timestep_spacing else {}
        scheduler = type(self.scheduler).from_config(self.scheduler.config, **overrides)
        scheduler.set_timesteps(spec.num_inference_steps, device=self.device)
        return scheduler

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """CLIP text embeddings (B, 77, D), as the AnimateDiff pipeline computes them."""
        ids = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)
        return self.text_encoder(ids)[0].to(self.dtype)

    def initial_latents(self, spec: SampleSpec, generator: torch.Generator, batch: int = 1) -> torch.Tensor:
        """Pure noise (B, C, F, h, w), drawn as diffusers' AnimateDiff pipeline draws it."""
        from diffusers.utils.torch_utils import randn_tensor

        s = self.vae_scale_factor
        shape = (batch, self.unet.config.in_channels, spec.num_frames, spec.height // s, spec.width // s)
        return randn_tensor(shape, generator=generator, device=self.device, dtype=self.dtype)

    def predict(self, latents: torch.Tensor, timestep, embeds: torch.Tensor, **conditioning: Any) -> torch.Tensor:
        """The UNet's noise prediction; `conditioning` may hold `control` (a ControlNet `Control`)."""
        embeds = embeds.repeat_interleave(latents.shape[2], dim=0)  # the motion UNet wants one per frame
        control = conditioning.get("control")
        extra = control.residuals(latents, timestep, embeds) if control is not None else {}
        return self.unet(latents, timestep, encoder_hidden_states=embeds, **extra).sample

    def decode_frames(self, latents: torch.Tensor, frame_indices: list[list[int]] | None = None) -> torch.Tensor:
        """VAE-decode latents (B, C, F, h, w) → frames (B, F', 3, H, W) in [-1, 1].

        Only each clip's `frame_indices` are decoded (the loss uses a few frames, not the whole
        clip; a latent frame is a video frame here); gradients flow when the caller has them enabled."""
        if frame_indices is not None:
            latents = torch.stack([latents[k, :, idx] for k, idx in enumerate(frame_indices)])
        b, c, f, h, w = latents.shape
        flat = latents.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w) / self.vae.config.scaling_factor
        images = self.vae.decode(flat).sample
        return images.reshape(b, f, *images.shape[1:])

    def checkpoint_blocks(self, which: bool | str) -> list[torch.nn.Module]:
        return unet_checkpoint_blocks(self.unet, which)


def spatial_attention_targets(cfg: AdapterConfig) -> str:
    """The identity adapter's modules: the spatial attention projections
    (`attentions.N.transformer_blocks.K.attn1`, attn2 with cross_attention), never the motion
    modules unless the ablation asks: the temporal layers stay untouched, which is what keeps the
    backbone's motion."""
    attn = "(attn1|attn2)" if cfg.cross_attention else "attn1"
    blocks = "(attentions|motion_modules)" if cfg.motion_modules else "attentions"
    layers = rf"{attn}\.(to_q|to_k|to_v|to_out\.0)"
    if cfg.ffn:
        layers = rf"({layers}|ff\.net\.(0\.proj|2))"
    return rf".*{blocks}\.\d+\.transformer_blocks\.\d+\.{layers}"


def unet_checkpoint_blocks(unet: torch.nn.Module, which: bool | str) -> list[torch.nn.Module]:
    """Whole UNet blocks: none (False), all (True) or the two at full latent resolution ("outer")."""
    if which is False:
        return []
    if which == "outer":
        return [unet.down_blocks[0], unet.up_blocks[-1]]
    return [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
