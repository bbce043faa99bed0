"""Tests for pv_ray.evaluation.metrics on synthetic clips with known motion."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from pv_ray.evaluation.metrics import dynamic_degree, face_similarity, json_safe, summarize, temporal_consistency


def _texture(size: int = 64, seed: int = 0) -> np.ndarray:
    """A smooth random RGB texture: enough structure for optical flow to lock onto."""
    noise = np.random.default_rng(seed).random((size, size, 3)).astype(np.float32)
    blurred = cv2.GaussianBlur(noise, (0, 0), 2.0)
    blurred = (blurred - blurred.min()) / (blurred.max() - blurred.min())
    return (blurred * 255).astype(np.uint8)


def _shifting_clip(shift: int, frames: int = 5) -> np.ndarray:
    texture = _texture()
    return np.stack([np.roll(texture, shift * i, axis=1) for i in range(frames)])


def test_dynamic_degree_is_zero_for_a_static_clip():
    static = np.stack([_texture()] * 4)
    assert dynamic_degree(static) < 1e-3
    assert dynamic_degree(static, top_fraction=1.0) < 1e-3


def test_dynamic_degree_measures_the_shift_relative_to_the_diagonal():
    diagonal = math.hypot(64, 64)
    # Plain mean flow: a uniform shift of s pixels per frame is s / diagonal.
    for shift in (1, 2, 4):
        assert dynamic_degree(_shifting_clip(shift), top_fraction=1.0) == pytest.approx(shift / diagonal, rel=0.1)
    scores = [dynamic_degree(_shifting_clip(shift)) for shift in (0, 1, 2, 4)]
    assert scores == sorted(scores) and scores[1] > 10 * scores[0]


def test_dynamic_degree_top_fraction_finds_a_small_moving_region():
    background = _texture(seed=1)
    patch = _texture(size=16, seed=2)
    frames = []
    for i in range(4):
        frame = background.copy()
        frame[24:40, 10 + 3 * i : 26 + 3 * i] = patch
        frames.append(frame)
    clip = np.stack(frames)
    assert dynamic_degree(clip) > 3 * dynamic_degree(clip, top_fraction=1.0) > 0


def test_temporal_consistency_is_one_when_static_and_lower_when_random():
    static = np.stack([_texture()] * 3)
    assert temporal_consistency(static) == pytest.approx(1.0)
    random_clip = np.random.default_rng(0).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    assert abs(temporal_consistency(random_clip)) < 0.2
    slow, fast = temporal_consistency(_shifting_clip(1)), temporal_consistency(_shifting_clip(6))
    assert 1.0 > slow > fast


def test_temporal_consistency_ignores_global_brightness_and_handles_flat_frames():
    texture = _texture().astype(np.int16)
    brighter = np.stack([texture, np.clip(texture + 40, 0, 255)]).astype(np.uint8)
    assert temporal_consistency(brighter) > 0.99
    flat = np.full((2, 16, 16, 3), 7, np.uint8)
    assert temporal_consistency(flat) == 1.0
    assert temporal_consistency(np.stack([flat[0], _texture(16)])) == 0.0


@pytest.mark.parametrize(
    ("clip", "error", "message"),
    [
        (np.zeros((1, 8, 8, 3), np.uint8), ValueError, "at least 2 frames"),
        (np.zeros((2, 8, 8), np.uint8), ValueError, r"shape \(F, H, W, 3\)"),
        (np.zeros((2, 8, 8, 3), np.float32), TypeError, "uint8"),
    ],
)
def test_clip_metrics_reject_bad_input(clip, error, message):
    for metric in (dynamic_degree, temporal_consistency):
        with pytest.raises(error, match=message):
            metric(clip)


def test_face_similarity_averages_over_frames_with_a_face():
    reference = np.array([1.0, 0.0, 0.0])
    embeddings = [np.array([2.0, 0.0, 0.0]), None, np.array([0.0, 3.0, 0.0]), None]
    mean, no_face_rate = face_similarity(embeddings, reference)
    assert mean == pytest.approx(0.5)  # cosines 1.0 and 0.0; scale does not matter
    assert no_face_rate == 0.5
    mean, no_face_rate = face_similarity([None, None], reference)
    assert math.isnan(mean) and no_face_rate == 1.0


def test_face_similarity_rejects_bad_embeddings():
    with pytest.raises(ValueError, match="at least one frame"):
        face_similarity([], np.ones(3))
    with pytest.raises(ValueError, match="frame 1 embedding has 2 dimensions"):
        face_similarity([np.ones(3), np.ones(2)], np.ones(3))
    with pytest.raises(ValueError, match="reference is the zero vector"):
        face_similarity([np.ones(3)], np.zeros(3))
    with pytest.raises(ValueError, match="NaN"):
        face_similarity([np.array([1.0, np.nan, 0.0])], np.ones(3))


def test_summarize_ignores_nans():
    assert summarize([1.0, float("nan"), 3.0]) == {"mean": 2.0, "std": 1.0, "n": 2}
    empty = summarize([float("nan")])
    assert math.isnan(empty["mean"]) and math.isnan(empty["std"]) and empty["n"] == 0
    assert summarize([])["n"] == 0


def test_json_safe_turns_non_finite_floats_into_null_at_any_depth():
    import json

    value = {"face_sim": math.nan, "n": 3, "runs": [{"x": math.inf, "y": 0.5}, -math.inf], "name": "a"}
    safe = json_safe(value)
    assert safe == {"face_sim": None, "n": 3, "runs": [{"x": None, "y": 0.5}, None], "name": "a"}
    assert json.loads(json.dumps(safe, allow_nan=False)) == safe
    assert math.isnan(value["face_sim"]), "the input is left as it was"
