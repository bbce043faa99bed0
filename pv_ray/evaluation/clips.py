"""Evaluate a video pipeline (with or without an identity adapter) on held-out prompts.

For each evaluation prompt: generate a clip with a fixed seed, then measure identity (face_sim
against the reference embedding, no_face_rate), motion (dynamic_degree) and temporal
consistency. Run it once with the adapter disabled and once enabled to see what tuning did.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from pv_ray.evaluation.metrics import dynamic_degree, face_similarity, summarize, temporal_consistency
from pv_ray.model.pipeline import VideoPipeline
from pv_ray.model.protocol import SampleSpec
from pv_ray.storage.video import frames_to_uint8

METRICS = ("face_sim", "no_face_rate", "dynamic_degree", "temporal_consistency")
TEXT_ALIGNMENT = "clip_text_alignment"  # only with a CLIP model configured (eval.clip_model)
INDEPENDENT = "face_dist_independent"  # only with the independent judge installed (pv_ray.evaluation.judge)


@dataclass(frozen=True)
class ClipMeasures:
    """What one generated clip yields before any identity is involved: the face embedding per
    frame (None where no face), motion and consistency, and the text alignment when scored."""

    embeddings: tuple[np.ndarray | None, ...]
    dynamic_degree: float
    temporal_consistency: float
    text_alignment: float | None
    independent: tuple[np.ndarray | None, ...] | None = None  # the judge's descriptor per frame


# (prompt, seed, spec, negative prompt, text alignment scored) -> the clip's measures
ClipCache = dict[tuple[str, int, SampleSpec, str, bool], ClipMeasures]


def measure_clip(
    pipeline: VideoPipeline,
    analyzer,
    prompt: str,
    spec: SampleSpec,
    *,
    seed: int,
    negative_prompt: str = "",
    text_alignment: Callable[[np.ndarray, str], float] | None = None,
    judge=None,
) -> ClipMeasures:
    """Generate one clip with the pipeline as it stands (adapter on or off) and measure it."""
    clip = frames_to_uint8(pipeline(prompt, spec, seed=seed, negative_prompt=negative_prompt))
    return ClipMeasures(
        embeddings=tuple(analyzer.embed_frames(clip)),
        dynamic_degree=dynamic_degree(clip) if len(clip) > 1 else math.nan,
        temporal_consistency=temporal_consistency(clip) if len(clip) > 1 else math.nan,
        text_alignment=None if text_alignment is None else text_alignment(clip, prompt),
        independent=None if judge is None else judge.describe_frames(clip),
    )


def evaluate_prompts(
    pipeline: VideoPipeline,
    analyzer,
    reference_embedding: np.ndarray,
    prompts: Sequence[str],
    spec: SampleSpec,
    *,
    seed: int,
    negative_prompt: str = "",
    text_alignment: Callable[[np.ndarray, str], float] | None = None,
    judge=None,
    judge_reference: np.ndarray | None = None,
    cache: ClipCache | None = None,
) -> dict[str, float]:
    """Mean metrics over `prompts` (clip i uses seed + i); NaN face_sim when no frame has a face.
    With a (clip, prompt) scorer, also the mean `clip_text_alignment`; with the independent
    `judge` and the identity's descriptor for it, also `face_dist_independent`.

    `cache`: only for the base model (inside `pipeline.base_model()`, backbone unchanged). Its clips are the
    same for every identity, so they are generated and measured once; only the similarity to
    each identity's reference is computed per call.
    """
    from pv_ray.evaluation.judge import mean_distance

    judged = judge is not None and judge_reference is not None
    rows = []
    for i, prompt in enumerate(prompts):
        key = (prompt, seed + i, spec, negative_prompt, text_alignment is not None)
        clip = cache.get(key) if cache is not None else None
        if clip is None or (judged and clip.independent is None):
            clip = measure_clip(
                pipeline, analyzer, prompt, spec, seed=seed + i, negative_prompt=negative_prompt,
                text_alignment=text_alignment, judge=judge if judged else None,
            )  # fmt: skip
            if cache is not None:
                cache[key] = clip
        sim, no_face = face_similarity(clip.embeddings, reference_embedding)
        row = {
            "face_sim": sim,
            "no_face_rate": no_face,
            "dynamic_degree": clip.dynamic_degree,
            "temporal_consistency": clip.temporal_consistency,
        }
        if text_alignment is not None:
            row[TEXT_ALIGNMENT] = clip.text_alignment
        if judged:
            row[INDEPENDENT] = mean_distance(clip.independent, judge_reference)
        rows.append(row)
    names = (*METRICS, *([TEXT_ALIGNMENT] if text_alignment is not None else []), *([INDEPENDENT] if judged else []))
    return {name: summarize([r[name] for r in rows])["mean"] for name in names}


def evaluation_spec(cfg) -> SampleSpec:
    """The clips evaluation generates: `eval.*` where set, else the `video.*` defaults."""
    return SampleSpec(
        cfg.eval.num_frames or cfg.video.num_frames,
        cfg.video.height,
        cfg.video.width,
        cfg.eval.num_inference_steps or cfg.video.num_inference_steps,
        cfg.video.guidance_scale,
    )
