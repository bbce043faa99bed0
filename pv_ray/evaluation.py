"""Evaluate a backbone (with or without an identity adapter) on held-out prompts.

For each evaluation prompt: generate a clip with a fixed seed, then measure identity (face_sim
against the reference embedding, no_face_rate), motion (dynamic_degree) and temporal
consistency. Run it once with the adapter disabled and once enabled to see what tuning did.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from pv_ray.backbone import Backbone
from pv_ray.metrics import dynamic_degree, face_similarity, summarize, temporal_consistency
from pv_ray.sampling import SampleSpec, generate
from pv_ray.video import frames_to_uint8

METRICS = ("face_sim", "no_face_rate", "dynamic_degree", "temporal_consistency")
TEXT_ALIGNMENT = "clip_text_alignment"  # only with a CLIP model configured (eval.clip_model)


def evaluate_prompts(
    backbone: Backbone,
    analyzer,
    reference_embedding: np.ndarray,
    prompts: Sequence[str],
    spec: SampleSpec,
    *,
    seed: int,
    negative_prompt: str = "",
    text_alignment: Callable[[np.ndarray, str], float] | None = None,
) -> dict[str, float]:
    """Mean metrics over `prompts` (clip i uses seed + i); NaN face_sim when no frame has a face.
    With a (clip, prompt) scorer, also the mean `clip_text_alignment`."""
    rows = []
    for i, prompt in enumerate(prompts):
        clip = frames_to_uint8(generate(backbone, prompt, spec, seed=seed + i, negative_prompt=negative_prompt))
        sim, no_face = face_similarity(analyzer.embed_frames(clip), reference_embedding)
        row = {
            "face_sim": sim,
            "no_face_rate": no_face,
            "dynamic_degree": dynamic_degree(clip) if len(clip) > 1 else math.nan,
            "temporal_consistency": temporal_consistency(clip) if len(clip) > 1 else math.nan,
        }
        if text_alignment is not None:
            row[TEXT_ALIGNMENT] = text_alignment(clip, prompt)
        rows.append(row)
    names = (*METRICS, TEXT_ALIGNMENT) if text_alignment is not None else METRICS
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
