"""One identity, end to end: prompts, evaluation before and after, tuning, the adapter folder.

`Personalizer` holds what one process loads once (backbone, face analysis, recogniser, adapter)
and tunes many identities with it, resetting the adapter between them. The CLI (`pv-ray tune`)
and the Ray batch workers both call `personalize`, so one identity tunes the same way on a laptop
and on a cluster.
"""

from __future__ import annotations

import hashlib
import platform
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pv_ray.backbones import load_backbone
from pv_ray.config import PVConfig
from pv_ray.errors import TuningFailed
from pv_ray.evaluation.clips import ClipCache, evaluate_prompts, evaluation_spec
from pv_ray.evaluation.judge import IndependentJudge, judge_available, judged_reference
from pv_ray.evaluation.metrics import json_safe
from pv_ray.faces.analysis import Reference
from pv_ray.method.losses import IdentityLoss
from pv_ray.method.tuner import IdentityTuning, StepMetrics, tune_batch
from pv_ray.model.pipeline import VideoPipeline
from pv_ray.model.protocol import VideoBackbone
from pv_ray.prompts import CLASS_WORDS, IdentityMeta, PromptSets, build_prompt_sets
from pv_ray.storage.adapter_folder import AdapterFolder


@dataclass
class IdentityInput:
    """One identity to personalize: its id, reference, adapter folder to write, meta.json."""

    identity_id: str
    reference: Reference
    out_dir: Path
    meta: IdentityMeta | None = None


@dataclass
class _Plan:
    class_word: str
    class_word_source: str  # "config", "meta.json", "face" (insightface's sex estimate) or "default"
    prompts: PromptSets


@dataclass
class PersonalizeResult:
    identity_id: str
    adapter_dir: Path
    metrics_before: dict[str, float]
    metrics_after: dict[str, float]
    history: list[StepMetrics]
    seconds: float
    info: dict[str, Any]


def library_versions() -> dict[str, str]:
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
    """What one process loads once to then tune many identities."""

    def __init__(self, cfg: PVConfig, backbone: VideoBackbone | None = None):
        """Load what tuning needs: the backbone the config names (or `backbone`, already loaded,
        of any family), the face models, the scorer."""
        from pv_ray.faces.analysis import FaceAnalyzer
        from pv_ray.faces.recognizer import load_recognizer
        from pv_ray.method.scorers import make_scorer

        self.cfg = cfg
        backbone = backbone if backbone is not None else load_backbone(cfg.model)
        # One adapter slot per identity of a batched rollout; slot 0 is the one evaluated and saved.
        self.pipeline = VideoPipeline.for_adapters(backbone, cfg.adapter, slots=cfg.train.identities_per_batch)
        self.backbone, self.adapter = self.pipeline.backbone, self.pipeline.adapter
        self.analyzer = FaceAnalyzer.from_config(self.backbone.faces_folder, cfg.faces)
        self.recognizer = load_recognizer(self.analyzer.recognition_model_path).to(self.backbone.device)
        self.scorer = make_scorer(cfg.train, self.backbone.device)
        self.judge = IndependentJudge() if judge_available() else None  # evaluation only: tuning never sees it
        # The untuned backbone's evaluation clips, shared by all identities (one entry per class
        # word and evaluation prompt: small).
        self.base_clips: ClipCache = {}

    def reference(self, photos: Mapping[str, bytes]) -> Reference:
        """The identity's reference from its photos (raises IdentityRejected with every reason)."""
        return judged_reference(self.analyzer, self.judge, photos, self.cfg.faces.max_pixels)

    def personalize(
        self,
        identity_id: str,
        reference: Reference,
        out_dir: str | Path,
        *,
        meta: IdentityMeta | None = None,
        on_step: Callable[[StepMetrics], None] | None = None,
        evaluate: bool = True,
    ) -> PersonalizeResult:
        """Tune `identity_id` from its `reference` and write the adapter folder: the LoRA weights
        and `adapter.json`. Raises `TuningFailed` (nothing written) when tuning gives no usable
        adapter."""
        (result,) = self.personalize_many(
            [IdentityInput(identity_id, reference, Path(out_dir), meta)], evaluate=evaluate,
            on_step=None if on_step is None else lambda _, metrics: on_step(metrics),
        )  # fmt: skip
        if isinstance(result, TuningFailed):
            raise result
        return result

    def personalize_many(
        self,
        identities: list[IdentityInput],
        *,
        on_step: Callable[[str, StepMetrics], None] | None = None,
        evaluate: bool = True,
    ) -> list[PersonalizeResult | TuningFailed]:
        """`personalize` for up to `train.identities_per_batch` identities tuned together in one
        batched rollout; each gets its result, or the `TuningFailed` that stopped it (nothing of
        it written)."""
        cfg, adapter = self.cfg, self.adapter
        if not 1 <= len(identities) <= len(adapter.slots):
            raise ValueError(
                f"{len(identities)} identities for {len(adapter.slots)} adapter slots (train.identities_per_batch)"
            )
        t0 = time.perf_counter()
        plans = [self._plan(item) for item in identities]
        before = [{} for _ in identities]
        if evaluate:
            with self.pipeline.base_model():
                before = [
                    self._evaluate(item.reference, plan.prompts, self.base_clips)
                    for item, plan in zip(identities, plans)
                ]
        tunings = [
            IdentityTuning(slot, self._identity_loss(item.reference), plan.prompts.train)
            for slot, (item, plan) in enumerate(zip(identities, plans))
        ]

        def step(tuning: IdentityTuning, metrics: StepMetrics) -> None:
            if on_step is not None:
                on_step(identities[tuning.slot].identity_id, metrics)

        tune_batch(
            self.backbone, adapter, tunings, cfg.train, height=cfg.train.height or cfg.video.height,
            width=cfg.train.width or cfg.video.width, scorer=self.scorer, on_step=step,
        )  # fmt: skip
        results: list[PersonalizeResult | TuningFailed] = []
        for slot, (item, plan, tuning, metrics_before) in enumerate(zip(identities, plans, tunings, before)):
            if tuning.failure is not None:
                results.append(tuning.failure)
                continue
            if slot:
                adapter.move_slot(slot, 0)  # slot 0 is the one evaluated and saved; its own is done
            results.append(self._finish(item, plan, tuning, metrics_before, t0, evaluate))
        return results

    def _finish(
        self,
        item: IdentityInput,
        plan: _Plan,
        tuning: IdentityTuning,
        before: dict[str, float],
        t0: float,
        evaluate: bool,
    ) -> PersonalizeResult:
        """Evaluate the tuned adapter (in slot 0) and write its folder: weights and adapter.json."""
        after = self._evaluate(item.reference, plan.prompts) if evaluate else {}
        info = self._adapter_info(item.identity_id, plan, item.reference, before, after, tuning.history)
        info["seconds"] = round(time.perf_counter() - t0, 3)
        AdapterFolder(item.out_dir).write(self.adapter.weights(), info)
        return PersonalizeResult(
            item.identity_id, Path(item.out_dir), before, after, tuning.history, time.perf_counter() - t0, info
        )

    def _plan(self, item: IdentityInput) -> _Plan:
        cfg, meta = self.cfg, item.meta or IdentityMeta()
        class_word, source = next(
            (word, source)
            for word, source in (
                (cfg.train.class_word, "config"), (meta.class_word, "meta.json"), (item.reference.class_word, "face"),
                ("person", "default"),
            )
            if word
        )  # fmt: skip
        return _Plan(class_word, source, prompt_sets(cfg, class_word, meta.prompts))

    def _identity_loss(self, reference: Reference) -> IdentityLoss:
        train = self.cfg.train
        return IdentityLoss(
            self.analyzer, self.recognizer, reference.embedding, crop_jitter=train.crop_jitter,
            color_jitter=train.color_jitter, det_thresh=train.face_det_thresh,
        )  # fmt: skip

    def _evaluate(self, reference: Reference, prompts: PromptSets, cache: ClipCache | None = None) -> dict[str, float]:
        cfg = self.cfg
        return evaluate_prompts(
            self.pipeline,
            self.analyzer,
            reference.embedding,
            prompts.eval,
            evaluation_spec(cfg),
            seed=cfg.eval.seed,
            negative_prompt=cfg.video.negative_prompt,
            cache=cache,
            judge=self.judge,
            judge_reference=reference.independent,
        )

    def _adapter_info(self, identity_id, plan: _Plan, reference, before, after, history) -> dict[str, Any]:
        """adapter.json: identity, config, per-photo results, metrics before/after on the evaluation
        prompts, the reference embedding, library versions and content hashes. It stays in the
        adapter store; MLflow gets it without what is the person's (`for_tracking`). The weights'
        format, name and sha256 are added as the folder is written (`AdapterFolder.write`)."""
        prompts = plan.prompts
        embedding = np.asarray(reference.embedding, np.float32).ravel()
        return {
            "identity_id": identity_id,
            "class_word": plan.class_word,
            "class_word_source": plan.class_word_source,
            "config": self.cfg.model_dump(mode="json"),
            # The weights it was tuned on: generate, serve and evaluate refuse it on any other.
            "backbone": self.backbone.record,
            "photos": [p.to_dict() for p in reference.photos],
            "metrics_before": json_safe(before),
            "metrics_after": json_safe(after),
            "final_step": asdict(history[-1]) if history else None,
            "train_prompts": len(prompts.train),
            "eval_prompts": prompts.eval,
            # The store keeps no photos: evaluating the adapter later needs the identity's target.
            "reference_embedding": [round(float(x), 6) for x in embedding],
            # The independent judge's descriptor of the same photos (null without the judge).
            "independent_reference": _rounded(reference.independent),
            "versions": library_versions(),
            "sha256": {"reference_embedding": hashlib.sha256(embedding.tobytes()).hexdigest()},
        }


def prompt_sets(cfg: PVConfig, class_word: str, extra: list[str] | tuple[str, ...] = ()) -> PromptSets:
    """The training and evaluation prompts of an identity of `class_word` (`extra`: its meta.json's)."""
    return build_prompt_sets(
        class_word, train_file=cfg.train.prompts_file, eval_file=cfg.eval.prompts_file, extra=extra,
        seed=cfg.train.seed, eval_count=cfg.eval.num_prompts,
    )  # fmt: skip


def job_prompts(cfg: PVConfig) -> list[str]:
    """Every prompt a batch job's identities are tuned and evaluated with, whatever their class word,
    and the negative prompts: what `pv_ray.backbones.encode_job_prompts` encodes once per job.
    An identity's own meta.json prompts are not known before ingest (and are its own): its worker
    encodes those itself."""
    words = [cfg.train.class_word] if cfg.train.class_word else list(CLASS_WORDS)
    prompts = ["", cfg.video.negative_prompt]
    for word in words:
        sets = prompt_sets(cfg, word)
        prompts += sets.train + sets.eval
    return list(dict.fromkeys(prompts))


def _rounded(vector) -> list[float] | None:
    return None if vector is None else [round(float(x), 6) for x in np.asarray(vector, np.float32).ravel()]
