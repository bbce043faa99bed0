"""Tune one identity's spatial adapter: the PersonalVideo loop (DESIGN.md section 1).

Each step: sample a training prompt and fresh noise, roll the backbone out from pure noise with
gradients through the last `grad_steps` denoising steps only, VAE-decode `loss_frames` random
frames, and minimise the pixel-space identity loss (plus, optionally, the semantic consistency
loss against the same rollout with the adapter off). Only LoRA parameters change.

A run that cannot give a usable adapter stops as `TuningFailed`, never as a stored adapter:
a non-finite loss, gradient or LoRA weight (`TuningDiverged`, at the step it happened), or no
face in the generated frames at any step (`NoTrainingSignal`: the identity loss never had a
gradient).

`tune_batch` tunes K identities in one batched rollout (`train.identities_per_batch`): sample k
of the denoiser batch carries identity k's LoRA weights (an adapter slot), its own prompt, noise and
random draws (each identity's generator, seeded as alone), its own optimiser state and gradient
clipping; the losses add up, and since no layer mixes samples, each identity's gradient comes
from its own samples only. With the same seeds an identity gets the adapter it would get alone.
One that fails stops alone; the others go on. `tune` is the one-identity case.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from pv_ray.config import TrainConfig
from pv_ray.errors import TuningFailed
from pv_ray.method.losses import IdentityLoss, semantic_consistency_loss
from pv_ray.model.adapter import IdentityAdapter
from pv_ray.model.checkpointing import checkpointed_blocks
from pv_ray.model.protocol import VideoBackbone
from pv_ray.model.sampling import SampleSpec, denoise
from pv_ray.prompts import PromptSampler

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
    def of(cls, backbone: VideoBackbone, cfg: TrainConfig) -> Precision:
        autocast = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision)
        return cls(autocast, (autocast or backbone.dtype) == torch.float16)

    def autocast(self, device: torch.device):
        return nullcontext() if self.autocast_dtype is None else torch.autocast(device.type, dtype=self.autocast_dtype)


@dataclass
class IdentityTuning:
    """One identity of a batched tuning: its adapter slot, identity loss and training prompts."""

    slot: int
    identity_loss: IdentityLoss
    prompts: list[str]
    history: list[StepMetrics] = field(default_factory=list)
    failure: TuningFailed | None = None

    def __post_init__(self):
        self.sampler = None
        self.generator = None


class _Rollouts:
    """One training step's batched rollout and per-identity losses; prompts are encoded once."""

    def __init__(self, backbone, adapter, tunings: list[IdentityTuning], cfg: TrainConfig, spec, precision, scorer):
        self.backbone, self.adapter, self.cfg = backbone, adapter, cfg
        self.spec, self.precision, self.scorer = spec, precision, scorer
        prompts = list(dict.fromkeys(p for tuning in tunings for p in tuning.prompts))
        self.embeds = dict(zip(prompts, backbone.encode_prompts(prompts).split(1)))
        self.negative = backbone.encode_prompts([""])
        self.step_noise = backbone.adds_step_noise

    def losses(self, tunings: list[IdentityTuning], prompts: list[str]):
        """Per identity: (total loss, identity loss output, semantic consistency loss) of one rollout,
        with each identity's noise and frame choice drawn from its own generator."""
        backbone, cfg, spec = self.backbone, self.cfg, self.spec
        noise = torch.cat([backbone.initial_latents(spec, tuning.generator) for tuning in tunings])
        frame_idx = [
            sorted(torch.randperm(cfg.num_frames, generator=j.generator)[: cfg.loss_frames].tolist()) for j in tunings
        ]
        embeds = torch.cat([self.embeds[p] for p in prompts])
        negative = self.negative.expand(len(tunings), -1, -1)
        # A sampler that adds noise between steps draws it from one seed per identity and step, so the
        # base rollout and the adapted one see the same noise.
        seeds = [int(torch.randint(2**62, (1,), generator=j.generator)) for j in tunings] if self.step_noise else []

        def step_noise() -> list[torch.Generator] | None:
            return [torch.Generator().manual_seed(s) for s in seeds] or None

        base_scores = None
        if cfg.lambda_scr > 0:
            # The base rollout runs first so that the adapter is left switched on for the
            # adapted rollout's backward (gradient checkpointing recomputes forwards then).
            with torch.no_grad(), self.adapter.disabled(), self.precision.autocast(backbone.device):
                base = denoise(backbone, noise, embeds, negative, spec, step_noise=step_noise())
                base = self._frames(base, frame_idx)
                base_scores = [self.scorer(frames, p) for frames, p in zip(base, prompts)]
        with self.precision.autocast(backbone.device):
            latents = denoise(
                backbone, noise, embeds, negative, spec, grad_steps=cfg.grad_steps, step_noise=step_noise()
            )
            frames = self._frames(latents, frame_idx)
        results = []
        for k, tuning in enumerate(tunings):
            out = tuning.identity_loss(frames[k], generator=tuning.generator)
            loss_scr = torch.zeros((), device=backbone.device)
            if base_scores is not None:
                loss_scr = semantic_consistency_loss(self.scorer(frames[k], prompts[k]), base_scores[k])
            results.append((out.loss + cfg.lambda_scr * loss_scr, out, loss_scr))
        return results

    def sample_slots(self, tunings: list[IdentityTuning]) -> list[int] | None:
        """The slot of each sample of the rollout's denoiser batch (None when slot 0 alone runs); with
        CFG the batch is every identity's unconditional sample, then every identity's conditional one."""
        if [tuning.slot for tuning in tunings] == [0]:
            return None
        slots = [tuning.slot for tuning in tunings]
        return slots * 2 if self.spec.guidance_scale > 1.0 else slots

    def _frames(self, latents: torch.Tensor, frame_idx: list[list[int]]) -> torch.Tensor:
        """Each identity's chosen frames, VAE-decoded in one batch: (K, loss_frames, 3, H, W) float32."""
        return self.backbone.decode_frames(latents, frame_idx).float()


def check_window(adapter: IdentityAdapter, timesteps, grad_steps: int) -> None:
    """Refuse a rollout whose gradient steps fall outside the isolation window (no gradient)."""
    problem = adapter.window.misses_gradient_steps(timesteps, grad_steps)
    if problem:
        raise ValueError(f"the rollout's {problem}; raise train.rollout_steps or lower train.grad_steps")


def tune(
    backbone: VideoBackbone,
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
    """Train the adapter's LoRA weights (slot 0) from a fresh seeded init; every step's metrics.

    Raises `TuningDiverged` or `NoTrainingSignal` (see the module docstring)."""
    (tuning,) = tune_batch(
        backbone, adapter, [IdentityTuning(0, identity_loss, prompts)], cfg, height=height, width=width, scorer=scorer,
        on_step=None if on_step is None else lambda tuning, metrics: on_step(metrics),
    )  # fmt: skip
    if tuning.failure is not None:
        raise tuning.failure
    return tuning.history


def tune_batch(
    backbone: VideoBackbone,
    adapter: IdentityAdapter,
    tunings: list[IdentityTuning],
    cfg: TrainConfig,
    *,
    height: int,
    width: int,
    scorer: Callable[[torch.Tensor, str], torch.Tensor] | None = None,
    on_step: Callable[[IdentityTuning, StepMetrics], None] | None = None,
) -> list[IdentityTuning]:
    """Tune every identity's slot from a fresh seeded init in one batched rollout per step; each
    ends with its `history`, or its `failure` (see the module docstring)."""
    if cfg.lambda_scr > 0 and scorer is None:
        raise ValueError("train.lambda_scr > 0 needs a frame scorer")
    spec = SampleSpec(
        cfg.num_frames, height, width, cfg.rollout_steps, cfg.guidance_scale, cfg.rollout_spacing, cfg.rollout_shift
    )
    check_window(adapter, [float(t) for t in backbone.make_scheduler(spec).timesteps], cfg.grad_steps)
    for tuning in tunings:
        adapter.reset(cfg.seed, tuning.slot)
        tuning.sampler = PromptSampler(tuning.prompts, seed=cfg.seed)
        tuning.generator = torch.Generator().manual_seed(cfg.seed)
    adapter.enabled = True
    precision = Precision.of(backbone, cfg)
    rollouts = _Rollouts(backbone, adapter, tunings, cfg, spec, precision, scorer)
    with _Optimizer(adapter, [tuning.slot for tuning in tunings], cfg, backbone, precision) as optimizer:
        for step in range(1, cfg.steps + 1):
            running = [tuning for tuning in tunings if tuning.failure is None]
            if not running:
                break
            t0 = time.perf_counter()
            prompts = [tuning.sampler.prompt_for_step(step - 1) for tuning in running]
            with adapter.routing(rollouts.sample_slots(running)):
                losses = rollouts.losses(running, prompts)
                grad_norms = optimizer.step(running, [loss for loss, _, _ in losses], step)
            seconds = (time.perf_counter() - t0) / len(running)  # each identity's share of the step
            for tuning, prompt, (loss, out, loss_scr), grad_norm in zip(running, prompts, losses, grad_norms):
                if tuning.failure is not None:
                    continue
                metrics = StepMetrics(
                    step, float(loss.detach()), float(out.loss.detach()), float(loss_scr.detach()), float(out.face_sim),
                    float(out.no_face_rate), grad_norm, seconds, prompt,
                )  # fmt: skip
                tuning.history.append(metrics)
                if on_step is not None:
                    on_step(tuning, metrics)
    for tuning in tunings:
        if tuning.failure is None and tuning.history and all(m.no_face_rate == 1.0 for m in tuning.history):
            tuning.failure = NoTrainingSignal(
                f"no training signal: no face was detected in the generated frames at any of the {len(tuning.history)} "
                "steps, so the identity loss never had a gradient (lower train.face_det_thresh, or check the prompts)"
            )
    return tunings


class _Optimizer:
    """AdamW on the slots' LoRA parameters with gradient clipping per slot and (for float16) loss
    scaling; each step checks each slot's loss, gradients and weights, and stops a slot that
    diverged. A context: the parameters train only inside it, with gradient checkpointing on when
    configured."""

    def __init__(
        self,
        adapter: IdentityAdapter,
        slots: list[int],
        cfg: TrainConfig,
        backbone: VideoBackbone,
        precision: Precision,
    ):
        self.params = {slot: adapter.parameters(slot) for slot in slots}
        self.cfg, self.backbone = cfg, backbone
        # AdamW is elementwise: one optimiser over every slot's parameters updates each slot as
        # its own would, the step count shared (all slots step together).
        self.optimizer = torch.optim.AdamW(
            [p for ps in self.params.values() for p in ps], lr=cfg.lr, weight_decay=cfg.weight_decay
        )
        self.scaler = torch.amp.GradScaler(backbone.device.type, enabled=precision.scale_loss)
        self.skipped = 0  # consecutive steps whose scaled gradients overflowed

    def __enter__(self) -> _Optimizer:
        for params in self.params.values():
            for p in params:
                p.requires_grad_(True)
        self._checkpointing = checkpointed_blocks(self.backbone.checkpoint_blocks(self.cfg.gradient_checkpointing))
        self._checkpointing.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for params in self.params.values():
            for p in params:
                p.requires_grad_(False)
        self._checkpointing.__exit__(*exc)

    def step(self, tunings: list[IdentityTuning], losses: list[torch.Tensor], step: int) -> list[float]:
        """One update of every running identity's slot from its loss; their gradient norms before clipping."""
        for tuning, loss in zip(tunings, losses):
            if not math.isfinite(float(loss.detach())):
                tuning.failure = TuningDiverged(f"diverged at step {step}: loss {float(loss.detach())}")
        kept = [loss for tuning, loss in zip(tunings, losses) if tuning.failure is None]
        if not kept:
            return [math.nan] * len(tunings)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(torch.stack(kept).sum()).backward()
        self.scaler.unscale_(self.optimizer)
        norms = []
        for tuning in tunings:
            params = self.params[tuning.slot]
            running = tuning.failure is None
            norm = float(torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)) if running else math.nan
            norms.append(norm)
            if tuning.failure is None and not math.isfinite(norm) and not self.scaler.is_enabled():
                tuning.failure = TuningDiverged(f"diverged at step {step}: gradient norm {norm}")
            if tuning.failure is not None:
                for p in params:
                    p.grad = None  # a stopped slot is left out of the update
        if self.scaler.is_enabled():
            self._check_overflow(tunings, norms, step)
        self.scaler.step(self.optimizer)  # with loss scaling, a step with overflowed gradients is skipped
        self.scaler.update()
        for tuning in tunings:
            weights_norm = float(torch.nn.utils.get_total_norm(self.params[tuning.slot]))
            if tuning.failure is None and not math.isfinite(weights_norm):
                tuning.failure = TuningDiverged(f"diverged at step {step}: LoRA weights norm {weights_norm}")
        return norms

    def _check_overflow(self, tunings: list[IdentityTuning], norms: list[float], step: int) -> None:
        if all(math.isfinite(n) for tuning, n in zip(tunings, norms) if tuning.failure is None):
            self.skipped = 0
            return
        self.skipped += 1
        if self.skipped >= MAX_SKIPPED_STEPS:
            for tuning in tunings:
                if tuning.failure is None:
                    tuning.failure = TuningDiverged(
                        f"diverged at step {step}: gradients overflowed at {MAX_SKIPPED_STEPS} steps in a row"
                    )
