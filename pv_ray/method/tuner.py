"""Tune one identity's spatial adapter: the PersonalVideo loop (DESIGN.md section 1).

Each step: sample a training prompt and fresh noise, roll the backbone out from pure noise with
gradients through the last `grad_steps` denoising steps only, VAE-decode `loss_frames` random
frames, and minimise the pixel-space identity loss (plus, optionally, the semantic consistency
loss against the same rollout with the adapter off). Only LoRA parameters change.

`personalize` wraps the loop with what one identity needs around it (prompts, evaluation before
and after on held-out prompts, the adapter folder with adapter.json); the CLI and the Ray batch
workers both call it, so one identity tunes the same way on a laptop and on a cluster.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pv_ray.model.adapter import WEIGHTS_NAME, IdentityAdapter
from pv_ray.model.backbone import Backbone
from pv_ray.config import PVConfig, TrainConfig
from pv_ray.evaluation.clips import ClipCache, evaluate_prompts, evaluation_spec
from pv_ray.method.losses import IdentityLoss, semantic_consistency_loss
from pv_ray.evaluation.metrics import json_safe
from pv_ray.method.prompts import PromptSampler, build_prompt_sets, validate_class_word
from pv_ray.model.sampling import SampleSpec, denoise, initial_latents, make_scheduler

ADAPTER_JSON = "adapter.json"


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


@dataclass
class IdentityMeta:
    """Optional per-identity metadata (`meta.json` beside the photos)."""

    class_word: str | None = None
    prompts: list[str] = field(default_factory=list)

    @classmethod
    def parse(cls, data: bytes | str, source: str = "meta.json") -> IdentityMeta:
        try:
            raw = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{source}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{source}: must be a JSON object")
        unknown = set(raw) - {"class", "prompts"}
        if unknown:
            raise ValueError(f"{source}: unknown key(s) {', '.join(sorted(unknown))} (allowed: class, prompts)")
        word = raw.get("class")
        prompts = raw.get("prompts", [])
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"{source}: 'prompts' must be a list of strings")
        if word is not None:
            try:
                validate_class_word(word)
            except ValueError as e:
                raise ValueError(f"{source}: 'class': {e}") from None
        return cls(class_word=word, prompts=prompts)


def _autocast(backbone: Backbone, cfg: TrainConfig):
    if cfg.mixed_precision == "no" or backbone.device.type != "cuda":
        return nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if cfg.mixed_precision == "bf16" else torch.float16)


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
    """Train the adapter's LoRA weights from a fresh seeded init; returns every step's metrics."""
    if cfg.lambda_scr > 0 and scorer is None:
        raise ValueError("train.lambda_scr > 0 needs a frame scorer")
    adapter.reset(cfg.seed)
    adapter.enabled = True
    params = adapter.parameters()
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.mixed_precision == "fp16" and backbone.device.type == "cuda")
    if cfg.gradient_checkpointing:
        backbone.unet.enable_gradient_checkpointing()
    spec = SampleSpec(cfg.num_frames, height, width, cfg.rollout_steps, cfg.guidance_scale, cfg.rollout_spacing)
    in_window = sum(adapter.window.is_active(float(t)) for t in make_scheduler(backbone, spec).timesteps[-cfg.grad_steps :])
    if in_window < cfg.grad_steps:
        raise ValueError(
            f"only {in_window} of the last {cfg.grad_steps} rollout step(s) fall inside the isolation window "
            f"(adapter.active_fraction={adapter.cfg.active_fraction}): the adapter would get no gradient; "
            "raise train.rollout_steps or lower train.grad_steps"
        )
    sampler = PromptSampler(prompts, seed=cfg.seed)
    embeds = dict(zip(prompts, backbone.encode_prompts(prompts).split(1)))  # encode each prompt once
    negative = backbone.encode_prompts([""])
    gen = torch.Generator().manual_seed(cfg.seed)
    history: list[StepMetrics] = []
    try:
        for step in range(cfg.steps):
            t0 = time.perf_counter()
            prompt = sampler.prompt_for_step(step)
            noise = initial_latents(backbone, spec, gen)
            frame_idx = sorted(torch.randperm(cfg.num_frames, generator=gen)[: cfg.loss_frames].tolist())
            loss_scr = torch.zeros((), device=backbone.device)
            base_scores = None
            if cfg.lambda_scr > 0:
                # The base rollout runs first so that the adapter is left switched on for the
                # adapted rollout's backward (gradient checkpointing recomputes forwards then).
                with torch.no_grad(), adapter.disabled(), _autocast(backbone, cfg):
                    base = backbone.decode_frames(denoise(backbone, noise, embeds[prompt], negative, spec), frame_idx)[0]
                    base_scores = scorer(base.float(), prompt)
            with _autocast(backbone, cfg):
                latents = denoise(backbone, noise, embeds[prompt], negative, spec, grad_steps=cfg.grad_steps)
                frames = backbone.decode_frames(latents, frame_idx)[0].float()
            out = identity_loss(frames, generator=gen)
            if base_scores is not None:
                loss_scr = semantic_consistency_loss(scorer(frames, prompt), base_scores)
            loss = out.loss + cfg.lambda_scr * loss_scr
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
            scaler.step(optimizer)
            scaler.update()
            metrics = StepMetrics(
                step=step + 1,
                loss=float(loss.detach()),
                loss_id=float(out.loss.detach()),
                loss_scr=float(loss_scr.detach()),
                face_sim=float(out.face_sim),
                no_face_rate=float(out.no_face_rate),
                grad_norm=grad_norm,
                seconds=time.perf_counter() - t0,
                prompt=prompt,
            )
            history.append(metrics)
            if on_step is not None:
                on_step(metrics)
    finally:
        for p in params:
            p.requires_grad_(False)
        if cfg.gradient_checkpointing:
            backbone.unet.disable_gradient_checkpointing()
    return history


@dataclass
class PersonalizeResult:
    identity_id: str
    adapter_dir: Path
    metrics_before: dict[str, float]
    metrics_after: dict[str, float]
    history: list[StepMetrics]
    seconds: float
    info: dict[str, Any]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _versions() -> dict[str, str]:
    import diffusers
    import insightface
    import peft
    import transformers

    import pv_ray

    return {
        "pv_ray": pv_ray.__version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "peft": peft.__version__,
        "transformers": transformers.__version__,
        "insightface": insightface.__version__,
        "python": platform.python_version(),
    }


class Personalizer:
    """What one process loads once (backbone, face analysis, recognizer, adapter) to then tune
    many identities, resetting the adapter between them."""

    def __init__(self, cfg: PVConfig):
        from pv_ray.faces.analysis import FaceAnalyzer
        from pv_ray.method.losses import ImageStatsScorer
        from pv_ray.faces.recognizer import load_recognizer

        self.cfg = cfg
        self.backbone = Backbone.load(cfg.model)
        self.analyzer = FaceAnalyzer.from_config(self.backbone.paths.faces, cfg.faces)
        self.recognizer = load_recognizer(self.analyzer.recognition_model_path).to(self.backbone.device)
        self.adapter = IdentityAdapter(self.backbone.unet, cfg.adapter, self.backbone.num_train_timesteps)
        self.scorer = ImageStatsScorer() if cfg.train.lambda_scr > 0 else None
        # The untuned backbone's evaluation clips, shared by all identities (one entry per class
        # word and evaluation prompt: small).
        self.base_clips: ClipCache = {}

    def personalize(
        self,
        identity_id: str,
        reference,
        out_dir: str | Path,
        *,
        meta: IdentityMeta | None = None,
        on_step: Callable[[StepMetrics], None] | None = None,
        evaluate: bool = True,
    ) -> PersonalizeResult:
        """Tune `identity_id` from its `reference` (faces.Reference) and write the adapter folder:
        `pytorch_lora_weights.safetensors` + `adapter.json` (identity, config, per-photo results,
        metrics before/after on evaluation prompts, library versions, content hashes)."""
        cfg, backbone, adapter = self.cfg, self.backbone, self.adapter
        t0 = time.perf_counter()
        meta = meta or IdentityMeta()
        class_word = cfg.train.class_word or meta.class_word or reference.class_word
        prompts = build_prompt_sets(
            class_word,
            train_file=cfg.train.prompts_file,
            eval_file=cfg.eval.prompts_file,
            extra=meta.prompts,
            seed=cfg.train.seed,
            eval_count=cfg.eval.num_prompts,
        )
        eval_spec = evaluation_spec(cfg)

        def run_eval(cache: ClipCache | None = None) -> dict[str, float]:
            return evaluate_prompts(
                backbone, self.analyzer, reference.embedding, prompts.eval, eval_spec,
                seed=cfg.eval.seed, negative_prompt=cfg.video.negative_prompt, cache=cache,
            )

        before: dict[str, float] = {}
        if evaluate:
            with adapter.disabled():
                before = run_eval(self.base_clips)
        identity_loss = IdentityLoss(
            self.analyzer, self.recognizer, reference.embedding,
            crop_jitter=cfg.train.crop_jitter, color_jitter=cfg.train.color_jitter,
        )
        history = tune(
            backbone, adapter, identity_loss, prompts.train, cfg.train,
            height=cfg.train.height or cfg.video.height, width=cfg.train.width or cfg.video.width,
            scorer=self.scorer, on_step=on_step,
        )
        after = run_eval() if evaluate else {}

        out = Path(out_dir)
        weights = adapter.save(out)
        info = {
            "identity_id": identity_id,
            "format": "diffusers-lora",
            "weights": WEIGHTS_NAME,
            "class_word": class_word,
            "config": cfg.model_dump(mode="json"),
            "photos": [
                {"name": p.name, "ok": p.ok, "reason": p.reason, "det_score": None if p.det_score is None else float(p.det_score)}
                for p in reference.photos
            ],
            "metrics_before": json_safe(before),
            "metrics_after": json_safe(after),
            "final_step": asdict(history[-1]) if history else None,
            "train_prompts": len(prompts.train),
            "eval_prompts": prompts.eval,
            # The store keeps no photos: evaluating the adapter later needs the identity's target.
            "reference_embedding": [round(float(x), 6) for x in np.asarray(reference.embedding, np.float32).ravel()],
            "seconds": round(time.perf_counter() - t0, 3),
            "versions": _versions(),
            "sha256": {
                WEIGHTS_NAME: _sha256(weights),
                "reference_embedding": hashlib.sha256(np.asarray(reference.embedding, np.float32).tobytes()).hexdigest(),
            },
        }
        (out / ADAPTER_JSON).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        return PersonalizeResult(identity_id, out, before, after, history, time.perf_counter() - t0, info)
