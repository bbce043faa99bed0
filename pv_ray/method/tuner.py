"""Tune one identity's spatial adapter: the PersonalVideo loop (DESIGN.md section 1).

Each step: sample a training prompt and fresh noise, roll the backbone out from pure noise with
gradients through the last `grad_steps` denoising steps only, VAE-decode `loss_frames` random
frames, and minimise the pixel-space identity loss (plus, optionally, the semantic consistency
loss against the same rollout with the adapter off). Only LoRA parameters change.

A run that cannot give a usable adapter stops as `TuningFailed`, never as a stored adapter:
a non-finite loss, gradient or LoRA weight (`TuningDiverged`, at the step it happened), or no
face in the generated frames at any step (`NoTrainingSignal`: the identity loss never had a
gradient).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from pv_ray.config import TrainConfig
from pv_ray.errors import TuningFailed
from pv_ray.method.losses import IdentityLoss, semantic_consistency_loss
from pv_ray.method.prompts import PromptSampler
from pv_ray.model.adapter import IdentityAdapter
from pv_ray.model.backbone import Backbone
from pv_ray.model.sampling import SampleSpec, denoise, initial_latents, make_scheduler

# fp16 loss scaling skips a step whose gradients overflow and lowers the scale; this many
# skipped steps in a row means the run itself overflows.
MAX_SKIPPED_STEPS = 20


class TuningDiverged(TuningFailed):
    """A loss, gradient or LoRA weight became NaN or infinite."""


class NoTrainingSignal(TuningFailed):
    """No generated frame showed a face at any step, so the identity loss never had a gradient."""


@dataclass
class StepMetrics:
    step: int
    loss: float
    loss_id: float
    loss_scr: float
    face_sim: float
    no_face_rate: float
    grad_norm: float
    seconds: float
    prompt: str


@dataclass(frozen=True)
class Precision:
    """How the rollout computes: the autocast dtype (None: the backbone's dtype throughout) and
    whether the loss is scaled (float16 gradients underflow without it)."""

    autocast_dtype: torch.dtype | None
    scale_loss: bool

    @classmethod
    def of(cls, backbone: Backbone, cfg: TrainConfig) -> Precision:
        autocast = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision)
        return cls(autocast, (autocast or backbone.dtype) == torch.float16)

    def autocast(self, device: torch.device):
        return nullcontext() if self.autocast_dtype is None else torch.autocast(device.type, dtype=self.autocast_dtype)


class _Rollouts:
    """One training step's rollouts and losses; the prompts are encoded once."""

    def __init__(self, backbone, adapter, identity_loss, prompts, cfg: TrainConfig, spec, precision, scorer):
        self.backbone, self.adapter, self.identity_loss, self.cfg = backbone, adapter, identity_loss, cfg
        self.spec, self.precision, self.scorer = spec, precision, scorer
        self.embeds = dict(zip(prompts, backbone.encode_prompts(prompts).split(1)))
        self.negative = backbone.encode_prompts([""])

    def loss(self, prompt: str, gen: torch.Generator):
        """(total loss, identity loss output, semantic consistency loss) of one fresh rollout."""
        backbone, cfg, spec = self.backbone, self.cfg, self.spec
        noise = initial_latents(backbone, spec, gen)
        frame_idx = sorted(torch.randperm(cfg.num_frames, generator=gen)[: cfg.loss_frames].tolist())
        loss_scr = torch.zeros((), device=backbone.device)
        base_scores = None
        if cfg.lambda_scr > 0:
            # The base rollout runs first so that the adapter is left switched on for the
            # adapted rollout's backward (gradient checkpointing recomputes forwards then).
            with torch.no_grad(), self.adapter.disabled(), self.precision.autocast(backbone.device):
                latents = denoise(backbone, noise, self.embeds[prompt], self.negative, spec)
                base_scores = self.scorer(backbone.decode_frames(latents, frame_idx)[0].float(), prompt)
        with self.precision.autocast(backbone.device):
            latents = denoise(backbone, noise, self.embeds[prompt], self.negative, spec, grad_steps=cfg.grad_steps)
            frames = backbone.decode_frames(latents, frame_idx)[0].float()
        out = self.identity_loss(frames, generator=gen)
        if base_scores is not None:
            loss_scr = semantic_consistency_loss(self.scorer(frames, prompt), base_scores)
        return out.loss + cfg.lambda_scr * loss_scr, out, loss_scr


def check_window(adapter: IdentityAdapter, timesteps, grad_steps: int) -> None:
    """Refuse a rollout whose gradient steps fall outside the isolation window (no gradient)."""
    in_window = adapter.window.count(timesteps[-grad_steps:])
    if in_window < grad_steps:
        raise ValueError(
            f"only {in_window} of the last {grad_steps} rollout step(s) fall inside the isolation window "
            f"(adapter.active_fraction={adapter.window.active_fraction}): the adapter would get no gradient; "
            "raise train.rollout_steps or lower train.grad_steps"
        )


def tune(
    backbone: Backbone,
    adapter: IdentityAdapter,
    identity_loss: IdentityLoss,
    prompts: list[str],
    cfg: TrainConfig,
    *,
    height: int,
    width: int,
    scorer: Callable[[torch.Tensor, str], torch.Tensor] | None = None,
    on_step: Callable[[StepMetrics], None] | None = None,
) -> list[StepMetrics]:
    """Train the adapter's LoRA weights from a fresh seeded init; returns every step's metrics.

    Raises `TuningDiverged` or `NoTrainingSignal` (see the module docstring)."""
    if cfg.lambda_scr > 0 and scorer is None:
        raise ValueError("train.lambda_scr > 0 needs a frame scorer")
    spec = SampleSpec(cfg.num_frames, height, width, cfg.rollout_steps, cfg.guidance_scale, cfg.rollout_spacing)
    check_window(adapter, [float(t) for t in make_scheduler(backbone, spec).timesteps], cfg.grad_steps)
    adapter.reset(cfg.seed)
    adapter.enabled = True
    precision = Precision.of(backbone, cfg)
    rollouts = _Rollouts(backbone, adapter, identity_loss, prompts, cfg, spec, precision, scorer)
    sampler = PromptSampler(prompts, seed=cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    history: list[StepMetrics] = []
    with _Optimizer(adapter.parameters(), cfg, backbone, precision) as optimizer:
        for step in range(1, cfg.steps + 1):
            t0 = time.perf_counter()
            prompt = sampler.prompt_for_step(step - 1)
            loss, out, loss_scr = rollouts.loss(prompt, gen)
            grad_norm = optimizer.step(loss, step)
            metrics = StepMetrics(
                step, float(loss.detach()), float(out.loss.detach()), float(loss_scr.detach()), float(out.face_sim),
                float(out.no_face_rate), grad_norm, time.perf_counter() - t0, prompt,
            )  # fmt: skip
            history.append(metrics)
            if on_step is not None:
                on_step(metrics)
    if history and all(m.no_face_rate == 1.0 for m in history):
        raise NoTrainingSignal(
            f"no training signal: no face was detected in the generated frames at any of the {len(history)} "
            "steps, so the identity loss never had a gradient (lower train.face_det_thresh, or check the prompts)"
        )
    return history


class _Optimizer:
    """AdamW on the LoRA parameters with gradient clipping and (for float16) loss scaling; each
    step checks loss, gradients and weights. A context: the parameters train only inside it,
    with gradient checkpointing on when configured."""

    def __init__(self, params: list[torch.nn.Parameter], cfg: TrainConfig, backbone: Backbone, precision: Precision):
        self.params, self.cfg, self.backbone = params, cfg, backbone
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scaler = torch.amp.GradScaler(backbone.device.type, enabled=precision.scale_loss)
        self.skipped = 0  # consecutive steps whose scaled gradients overflowed

    def __enter__(self) -> _Optimizer:
        for p in self.params:
            p.requires_grad_(True)
        if self.cfg.gradient_checkpointing:
            self.backbone.unet.enable_gradient_checkpointing()
        return self

    def __exit__(self, *exc) -> None:
        for p in self.params:
            p.requires_grad_(False)
        if self.cfg.gradient_checkpointing:
            self.backbone.unet.disable_gradient_checkpointing()

    def step(self, loss: torch.Tensor, step: int) -> float:
        """One update from `loss`; returns the gradient norm before clipping."""
        if not math.isfinite(float(loss.detach())):
            raise TuningDiverged(f"diverged at step {step}: loss {float(loss.detach())}")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip))
        self.skipped = _check_gradient(step, grad_norm, self.scaler.is_enabled(), self.skipped)
        self.scaler.step(self.optimizer)  # with loss scaling, a step with overflowed gradients is skipped
        self.scaler.update()
        weights_norm = float(torch.nn.utils.get_total_norm(self.params))
        if not math.isfinite(weights_norm):
            raise TuningDiverged(f"diverged at step {step}: LoRA weights norm {weights_norm}")
        return grad_norm


def _check_gradient(step: int, grad_norm: float, scaled: bool, skipped: int) -> int:
    """The count of consecutive overflowed steps after this one; raises once it means divergence."""
    if math.isfinite(grad_norm):
        return 0
    if not scaled:
        raise TuningDiverged(f"diverged at step {step}: gradient norm {grad_norm}")
    if skipped + 1 >= MAX_SKIPPED_STEPS:
        raise TuningDiverged(f"diverged at step {step}: gradients overflowed at {MAX_SKIPPED_STEPS} steps in a row")
    return skipped + 1
