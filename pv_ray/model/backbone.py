"""The frozen text-to-video backbone: AnimateDiff (SD1.5 2D UNet + MotionAdapter) and its parts.

Real weights and tiny weights go through the same loader: a diffusers SD1.5-layout folder
(unet/, vae/, text_encoder/, tokenizer/, scheduler/) plus a MotionAdapter folder.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pv_ray.config import ModelConfig
from pv_ray.errors import InputError

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_PIPELINE_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
FAMILY = "animatediff"
_WEIGHTS_PARTS = ("unet", "vae", "text_encoder")  # of model.base; the motion adapter's folder besides
_SAMPLE_BYTES = 1 << 20


class ModelFolderError(InputError):
    """A configured model folder is missing or incomplete."""


@dataclass(frozen=True)
class ModelPaths:
    base: Path
    motion_adapter: Path
    faces: Path


def resolve_model_paths(cfg: ModelConfig) -> ModelPaths:
    """Turn the model config into checked local folders (building the tiny preset if asked)."""
    if cfg.base is not None:
        base = Path(cfg.base).expanduser()
    elif cfg.preset == "tiny-prior":
        from pv_ray.presets.tiny import ensure_tiny_prior_models

        base = ensure_tiny_prior_models()
    else:
        from pv_ray.presets.tiny import ensure_tiny_models

        base = ensure_tiny_models(seed=cfg.seed)
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


def backbone_record(cfg: ModelConfig, paths: ModelPaths | None = None) -> dict[str, str]:
    """What an adapter records of the backbone it was tuned on, and what is compared before it runs
    on another: the family, a fingerprint of the weights, and a name a person recognises."""
    paths = paths or resolve_model_paths(cfg)
    name = cfg.preset if cfg.base is None else f"{paths.base.name} + {paths.motion_adapter.name}"
    return {"family": FAMILY, "fingerprint": weights_fingerprint(paths), "name": str(name)}


def weights_fingerprint(paths: ModelPaths) -> str:
    """sha256 over every weights file's place, size and first and last MiB: different weights give a
    different fingerprint (a size or header differs, or the sampled bytes), and SD1.5's 4 GB are not
    read in full at every load."""
    folders = [(part, paths.base / part) for part in _WEIGHTS_PARTS] + [("motion_adapter", paths.motion_adapter)]
    files = [(f"{part}/{f.name}", f) for part, folder in folders for f in sorted(folder.glob("*.safetensors"))]
    digest = hashlib.sha256()
    for name, path in files:
        size = path.stat().st_size
        with path.open("rb") as file:
            head = file.read(_SAMPLE_BYTES)
            file.seek(max(0, size - _SAMPLE_BYTES))
            tail = file.read(_SAMPLE_BYTES)
        digest.update(f"{name}\0{size}\0".encode())
        digest.update(hashlib.sha256(head).digest() + hashlib.sha256(tail).digest())
    return digest.hexdigest()


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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class Backbone:
    """The loaded, frozen backbone. Only adapters added on top of `unet` are ever trained."""

    unet: torch.nn.Module  # diffusers UNetMotionModel
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object
    device: torch.device
    dtype: torch.dtype
    paths: ModelPaths
    record: dict[str, str] = field(default_factory=dict)  # `backbone_record`: what adapters tuned on it record

    @classmethod
    def load(cls, cfg: ModelConfig) -> Backbone:
        from diffusers import AutoencoderKL, MotionAdapter, UNet2DConditionModel, UNetMotionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        paths = resolve_model_paths(cfg)
        device, dtype = resolve_device(cfg.device), _DTYPES[cfg.dtype]
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
        return cls(unet, vae, text_encoder, tokenizer, scheduler, device, dtype, paths, backbone_record(cfg, paths))

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

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

    def decode_frames(self, latents: torch.Tensor, frame_indices: list[int] | None = None) -> torch.Tensor:
        """VAE-decode latents (B, C, F, h, w) → frames (B, F', 3, H, W) in [-1, 1].

        Only `frame_indices` are decoded (the loss uses a few frames, not the whole clip);
        gradients flow when the caller has them enabled."""
        if frame_indices is not None:
            latents = latents[:, :, frame_indices]
        b, c, f, h, w = latents.shape
        flat = latents.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w) / self.vae.config.scaling_factor
        images = self.vae.decode(flat).sample
        return images.reshape(b, f, *images.shape[1:])
