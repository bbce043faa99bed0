"""Configuration: pydantic models for every section, loaded from YAML with `--set` overrides.

Unknown or mistyped keys are refused, with the file and the dotted key named, so a typo never
silently falls back to a default. YAML is read with the YAML 1.2 booleans only (`true`/`false`):
`no`, `on`, `off` and `yes` stay strings, so `--set train.mixed_precision=no` means "no".
Local paths are made absolute when the config loads, on the machine that reads it, so a Ray
worker or Serve replica running in another working directory sees the same files.
"""

from __future__ import annotations

import copy
import difflib
import importlib.resources
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from pv_ray.errors import InputError
from pv_ray.schedule import IsolationWindow, sampler_timesteps
from pv_ray.storage.uris import absolute_uri

DEMO_CONFIG = "tiny-prior.yaml"  # the packaged default: the demo store is tuned with it


class ConfigError(InputError):
    """A config file or override that cannot be used; the message names the file and key."""


LocalPath = Annotated[str, AfterValidator(absolute_uri)]  # a local path made absolute; URIs unchanged


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


WAN_PRESETS = ("tiny-wan", "tiny-wan2.2")  # Wan 2.1 (one transformer) and 2.2 (two experts)
FLOW_SAMPLERS = ("unipc",)  # the flow-matching samplers (Wan's); the rest are AnimateDiff's
FAMILY_SAMPLERS = {"animatediff": ("ddim", "euler", "lcm"), "wan": FLOW_SAMPLERS}
WAN_PIXEL_MULTIPLE = 16  # Wan's VAE downsamples 8x and its transformer patches 2x2 latent pixels


def wan_frames_problem(frames: int) -> str | None:
    """Why Wan cannot make a clip of `frames` frames (its causal VAE makes 4k+1), or None. The
    config check and the backbone's request check both ask this."""
    if frames >= 1 and (frames - 1) % 4 == 0:
        return None
    below = max(1, (frames - 1) // 4 * 4 + 1)
    return f"Wan makes 4k+1 frames (5, 9, 33, 81), got {frames}: use {below} or {below + 4}"


class ModelConfig(Section):
    """Where the backbone and the face pack come from."""

    # The backbone family: animatediff (SD1.5 UNet + motion modules) or wan (Wan 2.1 / 2.2 DiT,
    # flow matching). Default: wan for the tiny-wan presets, animatediff otherwise.
    family: Literal["animatediff", "wan"] = "animatediff"
    # tiny: seeded random models; tiny-prior: the same with a trained VAE, UNet and motion
    # adapter; tiny-wan / tiny-wan2.2: a seeded random Wan 2.1 / 2.2 (all built into the cache when missing)
    preset: Literal["tiny", "tiny-prior", "tiny-wan", "tiny-wan2.2"] | None = None
    # A local diffusers folder: SD1.5 layout (unet/, vae/, text_encoder/, tokenizer/, scheduler/) for
    # animatediff; Wan layout (transformer/ [transformer_2/], vae/, text_encoder/, tokenizer/, scheduler/) for wan
    base: LocalPath | None = None
    motion_adapter: LocalPath | None = None  # AnimateDiff MotionAdapter folder; default <base>/motion_adapter
    faces: LocalPath | None = None  # insightface pack folder; default <base>/faces
    seed: int = 0  # seed of the tiny preset's random weights
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    # The sampler of rollouts and videos, from the folder's scheduler config. ddim for AnimateDiff;
    # the distilled few-step motion adapters, run CFG-free (guidance_scale 1.0): euler with
    # "trailing" spacing for AnimateDiff-Lightning, lcm for AnimateLCM; both with beta_schedule
    # linear. Wan: unipc (flow matching, the folder's sampler; default for family wan).
    scheduler: Literal["ddim", "euler", "lcm", "unipc"] = "ddim"
    beta_schedule: Literal["linear", "scaled_linear"] | None = None  # default: the folder's
    # Spacing of video timesteps (rollouts use train.rollout_spacing); default: the folder's
    timestep_spacing: Literal["trailing", "linspace", "leading"] | None = None
    # Flow-matching samplers: the videos' timestep shift (Wan: 3.0 at 480p, 5.0 at 720p); default: the folder's
    flow_shift: float | None = Field(None, gt=0)
    channels_last: bool = False  # UNet and VAE convolutions in NHWC (faster on tensor cores)
    # torch.compile the UNet's forward (inductor; the first step of each shape compiles). Adapter
    # hot-swaps copy weights in place and keep the scaling fixed, so they never recompile.
    compile: bool = False

    @model_validator(mode="before")
    @classmethod
    def _family_of_preset(cls, data: Any) -> Any:
        # A Wan preset (or family) without a family (or sampler) named gets Wan's.
        if isinstance(data, dict):
            if data.get("preset") in WAN_PRESETS and "family" not in data:
                data = {**data, "family": "wan"}
            if data.get("family") == "wan" and "scheduler" not in data:
                data = {**data, "scheduler": "unipc"}
        return data

    @model_validator(mode="after")
    def _base_or_preset(self) -> ModelConfig:
        if self.preset is None and self.base is None:
            raise ValueError("set model.base (a local diffusers folder) or model.preset: tiny")
        if self.preset == "tiny-prior" and self.base is None and self.seed != 0:
            raise ValueError("model.preset tiny-prior was trained from the seed-0 tiny preset: model.seed must be 0")
        if self.base is None and (self.preset in WAN_PRESETS) != (self.family == "wan"):
            raise ValueError(f"model.preset {self.preset} is not a {self.family} model (model.family)")
        if self.scheduler not in FAMILY_SAMPLERS[self.family]:
            choices = " or ".join(FAMILY_SAMPLERS[self.family])
            raise ValueError(f"model.scheduler {self.scheduler} is not a {self.family} sampler: use {choices}")
        return self


class VideoConfig(Section):
    """Default generation settings."""

    height: int = Field(512, ge=32, multiple_of=8)
    width: int = Field(512, ge=32, multiple_of=8)
    num_frames: int = Field(16, ge=1)
    num_inference_steps: int = Field(25, ge=1)
    guidance_scale: float = Field(7.5, ge=0)
    negative_prompt: str = ""
    fps: int = Field(8, ge=1, le=60)


class LimitsConfig(Section):
    """Bounds on what a user may ask for (CLI and HTTP)."""

    max_frames: int = Field(32, ge=1)
    max_steps: int = Field(100, ge=1)
    max_resolution: int = Field(768, ge=32)
    max_prompt_chars: int = Field(500, ge=1)


class AdapterConfig(Section):
    """The spatial identity adapter (LoRA on spatial attention only) and its isolation window."""

    rank: int = Field(16, ge=1, le=256)
    alpha: float = Field(16.0, gt=0)
    cross_attention: bool = False  # also adapt attn2 (cross-attention); self-attention attn1 always
    # Ablation only: also adapt the temporal attention of motion_modules, which the method
    # avoids because it degrades the backbone's motion.
    motion_modules: bool = False
    ffn: bool = False  # also adapt the feed-forward layers of the same blocks
    active_fraction: float = Field(0.25, gt=0, le=1)  # adapter on only for t < active_fraction * T
    # Which modules these flags select is the backbone family's to say (`VideoBackbone.adapter_targets`).


class TrainConfig(Section):
    """Per-identity tuning (the PersonalVideo loop)."""

    steps: int = Field(800, ge=1)
    # Identities tuned together in one batched rollout (each sample with its own identity's LoRA):
    # throughput at small sizes; at 512x512x16 one identity may already fill a GPU (docs/BENCHMARKS.md).
    identities_per_batch: int = Field(1, ge=1, le=16)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(1e-2, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    seed: int = 0
    num_frames: int = Field(16, ge=1)  # length of each training rollout
    height: int | None = Field(None, ge=32, multiple_of=8)  # default: video.height
    width: int | None = Field(None, ge=32, multiple_of=8)
    rollout_steps: int = Field(4, ge=1)  # K: denoising steps of the few-step sampler
    # "trailing" makes the last rollout step start inside the window (t = T/K - 1) and land on
    # the clean sample, so the gradient step is one where the adapter shapes the output. With
    # "linspace"/"leading" the last step sits at t ~ 0 and barely moves the sample.
    rollout_spacing: Literal["trailing", "linspace", "leading"] = "trailing"
    # Flow-matching samplers (Wan): the rollout's timestep shift. 1.0 spaces the K steps evenly in
    # sigma, so the last one starts inside the window (t = T/K); the video shift (3.0, 5.0) puts
    # them at high noise, where the adapter is off.
    rollout_shift: float = Field(1.0, gt=0)
    grad_steps: int = Field(1, ge=1)  # gradients only through the last grad_steps steps
    guidance_scale: float = Field(7.5, ge=0)
    loss_frames: int = Field(2, ge=1)  # frames VAE-decoded and scored per step
    # Recompute activations in the backward instead of keeping them: false, true (every UNet
    # block: 2/3 of the activations saved) or "outer" (the two blocks at full latent resolution:
    # 1/3 saved, for 38% of the recomputation).
    gradient_checkpointing: Literal[False, True, "outer"] = False
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    lambda_scr: float = Field(0.0, ge=0)  # semantic consistency weight (0 = off)
    # The frame scorer R of the semantic consistency loss: image-stats (offline proxy), clip (a local
    # transformers CLIP folder in scr_model) or hpsv2 (the paper's: its checkpoint in scr_model and
    # a CLIP tokenizer folder in scr_tokenizer).
    scr_scorer: Literal["image-stats", "clip", "hpsv2"] = "image-stats"
    scr_model: LocalPath | None = None
    scr_tokenizer: LocalPath | None = None
    crop_jitter: float = Field(0.05, ge=0, le=0.5)
    color_jitter: float = Field(0.1, ge=0, le=1)
    class_word: str | None = None  # man / woman / person; default from meta.json or the face's gender
    prompts_file: LocalPath | None = None  # user training prompts, one per line with {cls}
    # Face detection threshold on the generated frames of the identity loss (default:
    # faces.det_thresh, the one for reference photos). Faces forming in early tuning steps score
    # lower than photos; an identity whose frames never show a face fails (no training signal).
    face_det_thresh: float | None = Field(None, gt=0, le=1)

    @model_validator(mode="after")
    def _grad_within_rollout(self) -> TrainConfig:
        if self.grad_steps > self.rollout_steps:
            raise ValueError(f"grad_steps ({self.grad_steps}) > rollout_steps ({self.rollout_steps})")
        if self.loss_frames > self.num_frames:
            raise ValueError(f"loss_frames ({self.loss_frames}) > num_frames ({self.num_frames})")
        if self.lambda_scr > 0 and self.scr_scorer != "image-stats" and self.scr_model is None:
            raise ValueError(f"scr_scorer {self.scr_scorer} needs train.scr_model (a local model; see README)")
        if self.lambda_scr > 0 and self.scr_scorer == "hpsv2" and self.scr_tokenizer is None:
            raise ValueError("scr_scorer hpsv2 needs train.scr_tokenizer (a local CLIP tokenizer folder)")
        return self


class FacesConfig(Section):
    """Reference analysis with insightface."""

    det_size: int = Field(640, ge=64, multiple_of=32)
    det_thresh: float = Field(0.5, gt=0, lt=1)
    min_face_size: int = Field(16, ge=1)
    max_pixels: int = Field(40_000_000, ge=1)
    max_photo_bytes: int = Field(30 * 2**20, ge=1)
    # Per identity folder: photos past these caps (in name order) are skipped with a reason.
    max_photos_per_identity: int = Field(64, ge=1)
    max_identity_bytes: int = Field(256 * 2**20, ge=1)


class EvalConfig(Section):
    """Evaluation on prompts disjoint from the training prompts."""

    prompts_file: LocalPath | None = None
    num_prompts: int = Field(4, ge=1)
    num_frames: int | None = Field(None, ge=1)  # default: video.num_frames
    num_inference_steps: int | None = Field(None, ge=1)  # default: video.num_inference_steps
    seed: int = 1234
    # Local folder of a transformers CLIP model (CLIPModel + CLIPProcessor) for text alignment
    # in `pv-ray evaluate`; None: text alignment is reported as not configured.
    clip_model: LocalPath | None = None


class ServingConfig(Section):
    """The HTTP service: video jobs, and the SD components a request may choose by name."""

    job_ttl_s: float = Field(86400.0, gt=0)  # a finished job and its video are kept this long
    max_queued_jobs: int = Field(64, ge=1)  # past this many queued jobs, POST /v1/jobs answers 429
    # Bounds of one ingress replica: past them the answer is 503 or 429 with Retry-After, at once.
    max_waiting_requests: int = Field(16, ge=1)  # generation calls waiting for a free generator replica
    request_timeout_s: float = Field(300.0, gt=0)  # a POST /v1/generate whose video takes longer: 503
    max_event_streams_per_key: int = Field(16, ge=1)  # open job event streams per API key (all, without keys)
    # Allow-lists: a request names one of these, never a path. Style LoRAs stay resident.
    styles: dict[str, LocalPath] = {}  # style name -> LoRA .safetensors (diffusers or kohya keys)
    controlnets: dict[str, LocalPath] = {}  # ControlNet name -> diffusers ControlNet folder
    control_clips: LocalPath | None = None  # folder of conditioning clips: <name>.mp4|.gif or <name>/ of images


class PVConfig(Section):
    model: ModelConfig
    video: VideoConfig = VideoConfig()
    limits: LimitsConfig = LimitsConfig()
    adapter: AdapterConfig = AdapterConfig()
    train: TrainConfig = TrainConfig()
    faces: FacesConfig = FacesConfig()
    eval: EvalConfig = EvalConfig()
    serving: ServingConfig = ServingConfig()

    @model_validator(mode="after")
    def _one_half_precision(self) -> PVConfig:
        # Autocast to bfloat16 over float16 weights (or the reverse) mixes two half types in one op.
        half = {"float16": "fp16", "bfloat16": "bf16"}.get(self.model.dtype)
        if half and self.train.mixed_precision not in ("no", half):
            raise ValueError(
                f"train.mixed_precision={self.train.mixed_precision} does not match model.dtype={self.model.dtype}: "
                f"use train.mixed_precision={half} (or no)"
            )
        return self

    @model_validator(mode="after")
    def _wan_clip_shapes(self) -> PVConfig:
        if self.model.family != "wan":
            return self
        frames = {"video.num_frames": self.video.num_frames, "train.num_frames": self.train.num_frames}
        sizes = {"video.height": self.video.height, "video.width": self.video.width}
        sizes.update({"train.height": self.train.height, "train.width": self.train.width})
        if self.eval.num_frames is not None:
            frames["eval.num_frames"] = self.eval.num_frames
        problems = [f"{key}={n}: {wan_frames_problem(n)}" for key, n in frames.items() if wan_frames_problem(n)]
        problems += [
            f"{key}={n}: Wan needs a multiple of {WAN_PIXEL_MULTIPLE}"
            for key, n in sizes.items()
            if n is not None and n % WAN_PIXEL_MULTIPLE
        ]
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @model_validator(mode="after")
    def _window_has_grad_steps(self) -> PVConfig:
        # Gradients flow only through the last grad_steps denoising steps; the adapter must be
        # active there, otherwise its parameters never receive a gradient. Counted on the SD
        # schedule (1000 training timesteps); the tuner counts again on the model's scheduler.
        train, window = self.train, IsolationWindow(self.adapter.active_fraction)
        sampler = self.model.scheduler
        timesteps = sampler_timesteps(sampler, train.rollout_steps, train.rollout_spacing, train.rollout_shift)
        problem = window.misses_gradient_steps(timesteps, train.grad_steps)
        if problem:
            spacing = {"lcm": "lcm", "unipc": f"flow shift {train.rollout_shift:g}"}.get(
                sampler, f"{train.rollout_spacing} spacing"
            )
            raise ValueError(
                f"train.rollout_steps={train.rollout_steps} ({spacing}): {problem}; raise train.rollout_steps "
                "or adapter.active_fraction"
            )
        return self


def _format_errors(source: str, err: ValidationError, overrides: list[str] = ()) -> str:
    """One line per error, each naming where the key came from: the file, or the `--set` that set it."""
    set_by = {".".join(parse_override(text)[0]): text for text in overrides}
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(root)"
        # The --set that made this key, or made the section the error is about.
        related = (k for k in set_by if key == k or key.startswith(k + ".") or k.startswith(key + "."))
        origin = next((f"--set {set_by[k]!r}" for k in related), source)
        if e["type"] == "extra_forbidden":
            known = _known_keys(e["loc"][:-1])
            close = difflib.get_close_matches(str(e["loc"][-1]), known, n=1)
            hint = f" (did you mean '{'.'.join([*map(str, e['loc'][:-1]), close[0]])}'?)" if close else ""
            lines.append(f"{origin}: unknown key '{key}'{hint}")
        elif e["type"] == "missing":
            lines.append(f"{origin}: missing key '{key}'")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"{origin}: {key}: {msg}")
    return "; ".join(lines)


def _known_keys(section: tuple) -> list[str]:
    """The keys a config section accepts (for "did you mean"); [] where it is not a section."""
    model: Any = PVConfig
    for part in section:
        field = model.model_fields.get(str(part)) if isinstance(model, type) else None
        model = field.annotation if field is not None else None
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return []
    return list(model.model_fields)


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's booleans: only true/false, not yes/no/on/off."""


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
for _first in "tTfF":
    _Yaml12Loader.yaml_implicit_resolvers.setdefault(_first, []).append(
        ("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"))
    )


def read_yaml(text: str) -> Any:
    """YAML with the YAML 1.2 booleans (see the module docstring)."""
    return yaml.load(text, Loader=_Yaml12Loader)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`section.key=value` → (["section", "key"], value parsed as YAML)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    try:
        value = read_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {text!r}: value is not valid YAML ({e.problem})") from None
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {text!r}: '{part}' is not a section")
            node = child
        node[path[-1]] = value
    return data


def load_config(path: str | os.PathLike[str], overrides: list[str] | None = None) -> PVConfig:
    """Read and validate a YAML config; `overrides` are `section.key=value` strings."""
    source = str(path)
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{source}: config file not found")
    try:
        data = read_yaml(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: top level must be a mapping of sections")
    data = apply_overrides(data, overrides or [])
    try:
        return PVConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(source, e, overrides or [])) from None


def config_from_dict(data: dict[str, Any], source: str = "<config>", overrides: list[str] | None = None) -> PVConfig:
    """Validate a config given as a dict (shipped to a Ray worker, recorded in adapter.json)."""
    data = apply_overrides(copy.deepcopy(data), overrides or [])
    try:
        return PVConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(source, e, overrides or [])) from None


def packaged_config(name: str = DEMO_CONFIG) -> Path:
    """A config shipped in the package (`pv_ray/configs` is the checkout's `configs/`)."""
    return Path(str(importlib.resources.files("pv_ray.configs") / name))


def given_or_recorded_config(
    path: str | os.PathLike[str] | None, overrides: list[str] | None, recorded: tuple[dict[str, Any], str] | None
) -> PVConfig:
    """The config a command runs adapters with: the file given; without one, the config the adapters
    were tuned with (`recorded`: the config and where adapter.json keeps it), so they run on their
    own backbone; with neither, the packaged demo config."""
    if path is not None:
        return load_config(path, overrides)
    if recorded is not None:
        config, where = recorded
        return config_from_dict(config, f"the config recorded in {where}", overrides)
    return load_config(packaged_config(), overrides)
