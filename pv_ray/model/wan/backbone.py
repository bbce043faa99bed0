"""Wan 2.1 / 2.2 (a text-to-video DiT with flow matching) as a `VideoBackbone`.

Real weights and tiny weights go through the same loader: a diffusers Wan folder in the layout of
`Wan-AI/Wan2.1-T2V-1.3B-Diffusers` (model_index.json, transformer/, vae/, text_encoder/ UMT5,
tokenizer/, scheduler/); Wan 2.2 A14B adds transformer_2/ and `boundary_ratio` in model_index.json.

What differs from AnimateDiff, and why:
- **No temporal layers to leave alone**: the DiT's self-attention (`blocks.N.attn1`) mixes space
  and time at once, so the isolation window alone keeps the model's motion (evaluation's
  dynamic degree, base vs adapted, shows it).
- **Wan 2.2 has two experts**: `transformer` denoises the high-noise steps (t >= boundary_ratio *
  T), `transformer_2` the low-noise ones. The identity adapter lives on the low-noise expert only
  (that is where appearance forms, and where the window is), so `denoiser` is `transformer_2`;
  a window reaching into the high-noise range is refused when the adapter is made.
- **A causal video VAE** (4x in time): video frame 0 comes from latent frame 0, each later latent
  frame makes 4 video frames, and decoding latent frame k needs frames 0..k. The identity loss
  decodes the latent frames up to the last one its chosen video frames need, not the whole clip.
- Latents are drawn and stepped in float32 and cast to the transformer's dtype for each call, as
  diffusers' `WanPipeline` does, so a stored adapter gives the same frames in both.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pv_ray.config import WAN_PIXEL_MULTIPLE, AdapterConfig, ModelConfig, wan_frames_problem
from pv_ray.errors import InputError
from pv_ray.model.loading import DTYPES, ModelFolderError, resolve_device, weights_record
from pv_ray.model.prompt_embeddings import PromptEmbeddings
from pv_ray.model.protocol import SampleSpec

FAMILY = "wan"
MAX_PROMPT_TOKENS = 512  # WanPipeline's max_sequence_length: prompts are padded (with zeros) to it
_PIPELINE_PARTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")


class FrameCountError(InputError):
    """A clip length the causal VAE cannot make (Wan makes 4k+1 frames)."""


@dataclass(frozen=True)
class WanPaths:
    base: Path
    faces: Path
    experts: tuple[str, ...]  # ("transformer",) on Wan 2.1; ("transformer", "transformer_2") on 2.2
    boundary_ratio: float | None  # Wan 2.2: the high-noise expert runs for t >= boundary_ratio * T


def checked_wan_paths(cfg: ModelConfig, base: Path) -> WanPaths:
    """The checked folders of a diffusers Wan folder `base` and the config's face pack (default: `base`/faces)."""
    faces = Path(cfg.faces).expanduser() if cfg.faces else base / "faces"
    if not base.is_dir():
        raise ModelFolderError(f"model.base folder not found: {base}")
    missing = [p for p in _PIPELINE_PARTS if not (base / p).is_dir()]
    if missing:
        raise ModelFolderError(
            f"model.base {base} lacks {', '.join(s + '/' for s in missing)} (need a diffusers Wan folder)"
        )
    index_file = base / "model_index.json"
    try:
        index = json.loads(index_file.read_text()) if index_file.is_file() else {}
    except (OSError, ValueError) as e:
        raise ModelFolderError(f"model.base {base}: model_index.json is unreadable ({e})") from None
    boundary = index.get("boundary_ratio")
    second = (index.get("transformer_2") or [None])[0] is not None or (boundary is not None)
    if second and not (base / "transformer_2").is_dir():
        raise ModelFolderError(f"model.base {base} is a Wan 2.2 folder (boundary_ratio) without transformer_2/")
    experts = ("transformer", "transformer_2") if second else ("transformer",)
    return WanPaths(base=base, faces=faces, experts=experts, boundary_ratio=boundary if second else None)


def wan_record(paths: WanPaths, name: str) -> dict[str, str]:
    """The record adapters tuned on these folders keep (`weights_record`)."""
    folders = [(part, paths.base / part) for part in (*paths.experts, "vae", "text_encoder")]
    return weights_record(FAMILY, folders, name)


def load_flow_scheduler(base: Path, cfg: ModelConfig):
    """The folder's flow-matching sampler (model.scheduler unipc), with model.flow_shift when set."""
    from diffusers import UniPCMultistepScheduler

    overrides = {"flow_shift": cfg.flow_shift} if cfg.flow_shift is not None else {}
    scheduler = UniPCMultistepScheduler.from_pretrained(base, subfolder="scheduler", **overrides)
    if not scheduler.config.use_flow_sigmas:
        raise ModelFolderError(f"model.base {base}: scheduler/ is not a flow-matching UniPC scheduler")
    return scheduler


def wan_attention_targets(cfg: AdapterConfig) -> str:
    """The identity adapter's modules on a Wan transformer: every block's self-attention projections
    (`blocks.N.attn1`), text cross-attention (`attn2`) and the feed-forward layers by config."""
    layers = ["attn1", "attn2"] if cfg.cross_attention else ["attn1"]
    choices = [rf"{attn}\.(to_q|to_k|to_v|to_out\.0)" for attn in layers]
    if cfg.ffn:
        choices.append(r"ffn\.net\.(0\.proj|2)")
    return rf"blocks\.\d+\.({'|'.join(choices)})"


def latent_frames_for(video_frames: int) -> int:
    """Latent frames of a clip of `video_frames` (4k+1) frames."""
    problem = wan_frames_problem(video_frames)
    if problem:
        raise FrameCountError(problem)
    return (video_frames - 1) // 4 + 1


@dataclass
class WanTextEncoder:
    """UMT5 and its tokenizer: prompts -> embedding rows trimmed to each prompt's tokens, as
    `WanPipeline` computes them (it then pads them with zeros to 512 tokens)."""

    tokenizer: object
    model: torch.nn.Module
    device: torch.device

    @classmethod
    def from_pretrained(cls, base: Path, device: torch.device, dtype: torch.dtype) -> WanTextEncoder:
        from transformers import AutoTokenizer, UMT5EncoderModel

        load = {"subfolder": "text_encoder", "use_safetensors": True, "torch_dtype": dtype}
        model = UMT5EncoderModel.from_pretrained(base, **load)
        model.requires_grad_(False)
        model.eval()
        model.to(device=device)
        return cls(AutoTokenizer.from_pretrained(base, subfolder="tokenizer"), model, device)

    @torch.no_grad()
    def rows(self, prompts: list[str]) -> list[torch.Tensor]:
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean

        tokens = self.tokenizer(
            [prompt_clean(p) for p in prompts],
            padding="max_length",
            max_length=MAX_PROMPT_TOKENS,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        mask = tokens.attention_mask.to(self.device)
        hidden = self.model(tokens.input_ids.to(self.device), mask).last_hidden_state
        return [row[:length] for row, length in zip(hidden, mask.gt(0).sum(dim=1).tolist())]


def encode_prompt_embeddings(paths: WanPaths, cfg: ModelConfig, prompts: list[str]) -> PromptEmbeddings:
    """`prompts` encoded by the folder's text encoder alone (no transformer, no VAE loaded)."""
    encoder = WanTextEncoder.from_pretrained(paths.base, resolve_device(cfg.device), DTYPES[cfg.dtype])
    rows = [row.cpu() for start in range(0, len(prompts), 16) for row in encoder.rows(prompts[start : start + 16])]
    return PromptEmbeddings(dict(zip(prompts, rows)), wan_record(paths, "")["fingerprint"])


@dataclass
class WanBackbone:
    """The loaded, frozen Wan backbone. Only adapters added on top of `denoiser` are ever trained."""

    experts: list[torch.nn.Module]  # WanTransformer3DModel: [high-noise (or only), low-noise]
    vae: torch.nn.Module
    scheduler: object
    device: torch.device
    dtype: torch.dtype
    paths: WanPaths
    record: dict[str, str] = field(default_factory=dict)
    # The text encoder, loaded only when a prompt is not in `prompt_embeddings` (the job's cache).
    text: WanTextEncoder | None = None
    prompt_embeddings: PromptEmbeddings | None = None

    family = FAMILY
    lora_component = "transformer"

    @classmethod
    def from_pretrained(
        cls, paths: WanPaths, cfg: ModelConfig, name: str, prompt_embeddings: PromptEmbeddings | None = None
    ) -> WanBackbone:
        """Load the folders `paths` with the config's dtype, device and sampler; `name` is the one
        adapters tuned on it record. With `prompt_embeddings` (the job's cache, made with these
        weights) the text encoder is left unloaded until a prompt outside it comes."""
        from diffusers import AutoencoderKLWan, WanTransformer3DModel

        device, dtype = resolve_device(cfg.device), DTYPES[cfg.dtype]
        # Loaded in the dtype rather than cast after: the modules Wan keeps in float32 (rotary
        # embedding, time embedder, norms) stay float32, as in WanPipeline.from_pretrained.
        load = {"use_safetensors": True, "torch_dtype": dtype}
        experts = [WanTransformer3DModel.from_pretrained(paths.base, subfolder=part, **load) for part in paths.experts]
        vae = AutoencoderKLWan.from_pretrained(paths.base, subfolder="vae", **load)
        for module in (*experts, vae):
            module.requires_grad_(False)
            module.eval()
            module.to(device=device)
        if cfg.compile:
            for expert in experts:
                expert.forward = torch.compile(expert.forward)
        scheduler = load_flow_scheduler(paths.base, cfg)
        backbone = cls(experts, vae, scheduler, device, dtype, paths, wan_record(paths, name))
        if prompt_embeddings is not None and prompt_embeddings.fingerprint != backbone.record["fingerprint"]:
            raise ModelFolderError("the prompt embeddings were made with other weights than model.base's")
        backbone.prompt_embeddings = prompt_embeddings
        if prompt_embeddings is None:
            backbone.text = WanTextEncoder.from_pretrained(paths.base, device, dtype)
        return backbone

    # -- the VideoBackbone protocol ------------------------------------------------------------
    @property
    def denoiser(self) -> torch.nn.Module:
        """The expert the identity adapter lives in: the only one (2.1) or the low-noise one (2.2)."""
        return self.experts[-1]

    @property
    def boundary_timestep(self) -> float | None:
        """Wan 2.2: the high-noise expert runs at t >= this; None on Wan 2.1."""
        ratio = self.paths.boundary_ratio
        return None if ratio is None else ratio * self.num_train_timesteps

    def adapter_targets(self, cfg: AdapterConfig) -> str:
        """`wan_attention_targets`; on Wan 2.2 the window must lie in the low-noise expert's range."""
        boundary = self.boundary_timestep
        if boundary is not None and cfg.active_fraction * self.num_train_timesteps > boundary:
            raise InputError(
                f"adapter.active_fraction={cfg.active_fraction} reaches into Wan 2.2's high-noise expert (t >= "
                f"{boundary:g}): the identity adapter lives on the low-noise expert only; use at most "
                f"{self.paths.boundary_ratio}"
            )
        return wan_attention_targets(cfg)

    def clip_problem(self, spec: SampleSpec) -> str | None:
        """4k+1 frames (the causal VAE), sizes in multiples of 16 px (8x VAE, 2x2 patches)."""
        problems = [wan_frames_problem(spec.num_frames)]
        for name, size in (("height", spec.height), ("width", spec.width)):
            multiple = WAN_PIXEL_MULTIPLE
            problems.append(f"{name} must be a multiple of {multiple} for Wan, got {size}" if size % multiple else None)
        return "; ".join(p for p in problems if p) or None

    @property
    def faces_folder(self) -> Path:
        return self.paths.faces

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    @property
    def max_frames(self) -> int | None:
        """The rotary embedding's length bounds the latent frames: 4 video frames each, plus the first."""
        return 4 * (int(self.denoiser.config.rope_max_seq_len) - 1) + 1

    @property
    def adds_step_noise(self) -> bool:
        return False  # UniPC on flow matching is deterministic

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** len(self.vae.config.temperal_downsample)  # (sic: diffusers' spelling)

    def make_scheduler(self, spec: SampleSpec):
        """A fresh scheduler with its timesteps set (never shared between requests); `spec.shift`
        overrides the flow shift (rollouts space their few steps evenly)."""
        overrides = {"flow_shift": spec.shift} if spec.shift is not None else {}
        scheduler = type(self.scheduler).from_config(self.scheduler.config, **overrides)
        scheduler.set_timesteps(spec.num_inference_steps, device=self.device)
        return scheduler

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """UMT5 embeddings (B, 512, D), trimmed to each prompt's tokens and zero-padded, as
        `WanPipeline` computes them: from the job's cache where it has the prompt."""
        cache = self.prompt_embeddings
        missing = [p for p in dict.fromkeys(prompts) if cache is None or p not in cache]
        computed = {}
        if missing:
            if self.text is None:  # a prompt outside the job's cache: the encoder after all
                self.text = WanTextEncoder.from_pretrained(self.paths.base, self.device, self.dtype)
            computed = dict(zip(missing, self.text.rows(missing)))
        rows = [computed[p] if p in computed else cache.rows[p] for p in prompts]
        embeds = torch.zeros(len(prompts), MAX_PROMPT_TOKENS, rows[0].shape[-1], device=self.device, dtype=self.dtype)
        for embed, row in zip(embeds, rows):
            embed[: len(row)] = row
        return embeds

    def initial_latents(self, spec: SampleSpec, generator: torch.Generator, batch: int = 1) -> torch.Tensor:
        """Pure noise (B, C, F', h, w) in float32, drawn as `WanPipeline.prepare_latents` draws it."""
        from diffusers.utils.torch_utils import randn_tensor

        s = self.vae_scale_factor
        channels = self.denoiser.config.in_channels
        shape = (batch, channels, latent_frames_for(spec.num_frames), spec.height // s, spec.width // s)
        return randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)

    def predict(self, latents: torch.Tensor, timestep, embeds: torch.Tensor, **conditioning: Any) -> torch.Tensor:
        """The flow (velocity) prediction of the expert for `timestep`; no extra conditioning on Wan."""
        if conditioning:
            raise InputError(f"Wan takes no {', '.join(conditioning)} here (control is AnimateDiff's)")
        boundary = self.boundary_timestep
        expert = self.experts[0] if boundary is not None and float(timestep) >= boundary else self.denoiser
        timesteps = torch.as_tensor(timestep, device=self.device).expand(latents.shape[0])
        return expert(
            hidden_states=latents.to(self.dtype), timestep=timesteps, encoder_hidden_states=embeds, return_dict=False
        )[0]

    def decode_frames(self, latents: torch.Tensor, frame_indices: list[list[int]] | None = None) -> torch.Tensor:
        """VAE-decode latents (B, C, F', h, w) → frames (B, F, 3, H, W) in [-1, 1]: every frame, or
        each clip's `frame_indices`, decoding only the latent frames up to the last one they need
        (the decoder is causal in time); differentiable when gradients are on."""
        if frame_indices is not None:
            needed = max((f + 3) // 4 for idx in frame_indices for f in idx)  # video frame f needs latents 0..this
            latents = latents[:, :, : needed + 1]
        config = self.vae.config
        latents = latents.to(self.vae.dtype)
        mean = torch.tensor(config.latents_mean).view(1, config.z_dim, 1, 1, 1).to(latents)
        inverse_std = 1.0 / torch.tensor(config.latents_std).view(1, config.z_dim, 1, 1, 1).to(latents)
        latents = latents / inverse_std + mean  # WanPipeline's arithmetic, for its exact frames
        video = self.vae.decode(latents, return_dict=False)[0].transpose(1, 2)  # (B, F, 3, H, W)
        if frame_indices is not None:
            video = torch.stack([video[k, idx] for k, idx in enumerate(frame_indices)])
        return video

    def checkpoint_blocks(self, which: bool | str) -> list[torch.nn.Module]:
        """Whole transformer blocks of the adapted expert: none, all (True), or every other one ("outer")."""
        blocks = list(self.denoiser.blocks)
        if which is False:
            return []
        return blocks if which is True else blocks[::2]
