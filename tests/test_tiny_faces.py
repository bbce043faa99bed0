"""The tiny face pack is a real insightface pack: loaded, routed and run by insightface itself."""

from __future__ import annotations

from pathlib import Path

import cv2
import insightface
import numpy as np
import pytest
import skimage.data
from insightface.app import FaceAnalysis
from insightface.model_zoo.arcface_onnx import ArcFaceONNX
from insightface.model_zoo.scrfd import SCRFD

from pv_ray.faces.tiny_pack import DETECTOR_FILE, RECOGNIZER_FILE, build_tiny_face_pack

SKIMAGE_DATA = Path(skimage.data.__file__).parent


@pytest.fixture(scope="module")
def app(tiny_face_pack: Path) -> FaceAnalysis:
    analysis = FaceAnalysis(name=str(tiny_face_pack), providers=["CPUExecutionProvider"])
    analysis.prepare(ctx_id=-1, det_size=(640, 640))
    return analysis


def test_insightface_routes_both_models(app: FaceAnalysis) -> None:
    assert set(app.models) == {"detection", "recognition"}
    assert isinstance(app.models["detection"], SCRFD)
    assert app.models["detection"].use_kps and app.models["detection"].fmc == 3
    recognizer = app.models["recognition"]
    assert isinstance(recognizer, ArcFaceONNX)
    # Not mistaken for an mxnet export: the input is normalised as (x - 127.5) / 127.5.
    assert (recognizer.input_mean, recognizer.input_std) == (127.5, 127.5)
    assert recognizer.input_size == (112, 112)


@pytest.mark.parametrize("kind", ["uniform", "low_contrast"])
def test_no_face_on_flat_images(app: FaceAnalysis, kind: str) -> None:
    rng = np.random.default_rng(0)
    if kind == "uniform":
        image = np.full((360, 480, 3), 128, np.uint8)
    else:  # faint noise on a gentle gradient: a few grey levels of contrast
        ramp = np.linspace(110, 130, 480)[None, :, None]
        image = np.clip(ramp + rng.normal(0, 2, (360, 480, 3)), 0, 255).astype(np.uint8)
    assert app.get(image) == []


def test_finds_a_face_in_a_portrait(app: FaceAnalysis) -> None:
    image = cv2.imread(str(SKIMAGE_DATA / "astronaut.png"))  # BGR, as insightface wants
    faces = app.get(image)
    assert len(faces) >= 1
    height, width = image.shape[:2]
    for face in faces:
        assert face.kps.shape == (5, 2)
        assert (face.kps >= 0).all() and (face.kps[:, 0] < width).all() and (face.kps[:, 1] < height).all()
        assert face.embedding.shape == (512,)
        assert np.linalg.norm(face.normed_embedding) == pytest.approx(1.0, abs=1e-5)
        # Keypoints sit inside the box, eyes above the mouth: alignment crops the detection.
        x1, y1, x2, y2 = face.bbox
        assert (face.kps[:, 0] > x1).all() and (face.kps[:, 0] < x2).all()
        assert face.kps[0, 1] < face.kps[3, 1]


def test_embedding_is_informative(app: FaceAnalysis) -> None:
    portrait = cv2.imread(str(Path(insightface.__file__).parent / "data/images/Tom_Hanks_54745.png"))
    shifted = cv2.warpAffine(portrait, np.float32([[1, 0, 2], [0, 1, 1]]), (112, 112))
    other = cv2.resize(cv2.imread(str(SKIMAGE_DATA / "astronaut.png"))[70:180, 165:275], (112, 112))
    recognizer = app.models["recognition"]
    emb = recognizer.get_feat([portrait, shifted, other])
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    assert emb[0] @ emb[1] > 0.85
    assert emb[0] @ emb[2] < 0.5


def test_same_seed_same_bytes(tmp_path: Path, tiny_face_pack: Path) -> None:
    again = build_tiny_face_pack(tmp_path / "again", seed=0)
    other = build_tiny_face_pack(tmp_path / "other", seed=1)
    for name in (DETECTOR_FILE, RECOGNIZER_FILE):
        assert (again / name).read_bytes() == (tiny_face_pack / name).read_bytes()
        assert (other / name).read_bytes() != (tiny_face_pack / name).read_bytes()
