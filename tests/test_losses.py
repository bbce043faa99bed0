"""Identity loss on the tiny pack, semantic-consistency KL and the default frame scorer."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import insightface
import numpy as np
import pytest
import skimage.data
import torch

from pv_ray.faces.analysis import FaceAnalyzer
from pv_ray.faces.recognizer import load_recognizer
from pv_ray.method.losses import IdentityLoss, semantic_consistency_loss
from pv_ray.method.scorers import ImageStatsScorer

SKIMAGE_DATA = Path(skimage.data.__file__).parent
TOM_HANKS = Path(insightface.__file__).parent / "data" / "images" / "Tom_Hanks_54745.png"


@pytest.fixture(scope="module")
def analyzer(tiny_face_pack: Path) -> FaceAnalyzer:
    return FaceAnalyzer(tiny_face_pack)


@pytest.fixture(scope="module")
def identity_loss(analyzer: FaceAnalyzer) -> IdentityLoss:
    reference = analyzer.reference({"astronaut.png": (SKIMAGE_DATA / "astronaut.png").read_bytes()})
    return IdentityLoss(analyzer, load_recognizer(analyzer.recognition_model_path), reference.embedding)


def _to_frames(rgb: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 127.5 - 1


def test_optimising_pixels_moves_the_face_towards_the_reference(identity_loss: IdentityLoss) -> None:
    # Without jitter every step sees the same crop, so progress is monotone and quick.
    loss_fn = IdentityLoss(
        identity_loss.analyzer, identity_loss.recognizer, identity_loss.reference, crop_jitter=0.0, color_jitter=0.0
    )
    rgb = cv2.cvtColor(cv2.resize(cv2.imread(str(TOM_HANKS)), (160, 160)), cv2.COLOR_BGR2RGB)
    noise = torch.randn((1, 3, 160, 160), generator=torch.Generator().manual_seed(0)) * 0.05
    frames = (_to_frames(rgb) + noise).clamp(-1, 1).requires_grad_(True)
    optimiser = torch.optim.Adam([frames], lr=0.02)
    history = []
    for _ in range(5):
        out = loss_fn(frames)
        assert out.faces == 1 and out.no_face_rate == 0.0
        assert out.loss.item() == pytest.approx(1 - out.face_sim, abs=1e-5)
        history.append(out.face_sim)
        optimiser.zero_grad()
        out.loss.backward()
        optimiser.step()
        with torch.no_grad():
            frames.clamp_(-1, 1)
    assert all(later > earlier for earlier, later in zip(history, history[1:]))
    assert history[-1] > history[0] + 0.4


def test_frames_without_a_face_are_masked_and_counted(identity_loss: IdentityLoss) -> None:
    frames = torch.zeros(2, 3, 96, 96, requires_grad=True)  # uniform grey
    out = identity_loss(frames)
    assert (out.faces, out.no_face_rate) == (0, 1.0)
    assert math.isnan(out.face_sim) and out.loss.item() == 0.0
    out.loss.backward()
    assert frames.grad is not None and (frames.grad == 0).all()


def test_mixed_batch_only_face_frames_get_gradient(identity_loss: IdentityLoss) -> None:
    astronaut = cv2.cvtColor(cv2.imread(str(SKIMAGE_DATA / "astronaut.png")), cv2.COLOR_BGR2RGB)
    frames = torch.cat([_to_frames(astronaut), torch.zeros(1, 3, 512, 512)]).requires_grad_(True)
    out = identity_loss(frames, torch.Generator().manual_seed(0))
    assert (out.faces, out.no_face_rate) == (1, 0.5)
    # The reference photo itself, lightly jittered, is close to the reference embedding.
    assert out.face_sim > 0.7
    out.loss.backward()
    assert frames.grad[0].abs().sum() > 0 and (frames.grad[1] == 0).all()


def test_jitter_is_seeded(identity_loss: IdentityLoss) -> None:
    astronaut = cv2.cvtColor(cv2.imread(str(SKIMAGE_DATA / "astronaut.png")), cv2.COLOR_BGR2RGB)
    frames = _to_frames(astronaut)
    sims = [identity_loss(frames, torch.Generator().manual_seed(s)).face_sim for s in (1, 1, 2)]
    assert sims[0] == sims[1] and sims[0] != sims[2]


def test_semantic_consistency_kl() -> None:
    scores = torch.tensor([0.3, -1.0, 2.0])
    assert float(semantic_consistency_loss(scores, scores.clone())) == pytest.approx(0.0, abs=1e-7)
    # A shift of all scores leaves the softmax, hence the KL, unchanged.
    assert float(semantic_consistency_loss(scores + 5, scores)) == pytest.approx(0.0, abs=1e-6)
    adapted = torch.tensor([2.0, 0.0, -1.0], requires_grad=True)
    base = torch.tensor([0.0, 1.0, 0.5], requires_grad=True)
    kl = semantic_consistency_loss(adapted, base)
    p, q = torch.softmax(adapted.detach(), 0), torch.softmax(base.detach(), 0)
    assert float(kl) == pytest.approx(float((p * (p / q).log()).sum()), rel=1e-5) and float(kl) > 0
    kl.backward()
    assert adapted.grad.abs().sum() > 0 and base.grad is None
    with pytest.raises(ValueError, match=r"\(M,\)"):
        semantic_consistency_loss(adapted[:2], base)


def test_image_stats_scorer_prefers_sharp_colourful_frames() -> None:
    rgb = cv2.cvtColor(cv2.imread(str(SKIMAGE_DATA / "astronaut.png")), cv2.COLOR_BGR2RGB)
    sharp = _to_frames(rgb)
    blurred = _to_frames(cv2.GaussianBlur(rgb, (0, 0), 4))
    grey = _to_frames(cv2.cvtColor(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB))
    frames = torch.cat([sharp, blurred, grey]).requires_grad_(True)
    scores = ImageStatsScorer()(frames, "a photo of a person")
    assert scores.shape == (3,)
    assert scores[0] > scores[1] and scores[0] > scores[2]
    scores.sum().backward()
    assert frames.grad.abs().sum() > 0
