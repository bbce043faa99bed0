"""Shared fixtures: the tiny preset, built once per test session into a private cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Keep Ray, MLflow and torch quiet and local in every test process.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    """A PV_RAY_CACHE for this session, inherited by CLI subprocesses and Ray workers."""
    cache = Path(os.environ.get("PV_RAY_TEST_CACHE") or tmp_path_factory.mktemp("pv-ray-cache"))
    os.environ["PV_RAY_CACHE"] = str(cache)
    return cache


@pytest.fixture(scope="session")
def tiny_models(model_cache: Path) -> Path:
    """The tiny pipeline folder (unet/, vae/, ..., motion_adapter/, faces/), seed 0."""
    from pv_ray.tiny import ensure_tiny_models

    return ensure_tiny_models(seed=0)


@pytest.fixture(scope="session")
def tiny_face_pack(tmp_path_factory) -> Path:
    """The tiny insightface pack (det_tiny.onnx + rec_tiny.onnx), seed 0."""
    from pv_ray.tiny_faces import build_tiny_face_pack

    return build_tiny_face_pack(tmp_path_factory.mktemp("faces"), seed=0)
