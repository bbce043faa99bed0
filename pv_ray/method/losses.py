"""The tuning losses: pixel-space identity loss and the optional semantic-consistency term.

``IdentityLoss``: ``L_id = 1 - cos(e_frame, e_ref)`` over decoded frames that show a face,
with landmarks from a detached copy and gradients through alignment and the recogniser.
``semantic_consistency_loss``: ``KL(softmax(R(adapted)) || softmax(R(base)))`` for a frame
scorer ``R`` (HPSv2 in the paper; see ``pv_ray.method.scorers``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pv_ray.faces.analysis import FaceAnalyzer
from pv_ray.faces.arcface import align_faces
from pv_ray.storage.video import frames_to_uint8

__all__ = ["IdentityLoss", "IdentityLossOutput", "semantic_consistency_loss"]


@dataclass
class IdentityLossOutput:
    loss: torch.Tensor  # scalar, differentiable; 0 (still in the graph) when no frame has a face
    face_sim: float  # mean cosine to the reference over frames with a face; nan if none
    no_face_rate: float  # fraction of frames where no face was detected
    faces: int  # number of frames with a face


class IdentityLoss(nn.Module):
    """``1 - cos`` between each face frame's embedding and the identity's reference embedding."""

    def __init__(
        self,
        analyzer: FaceAnalyzer,
        recognizer: nn.Module,
        reference_embedding: np.ndarray | torch.Tensor,
        *,
        crop_jitter: float = 0.05,
        color_jitter: float = 0.1,
        det_thresh: float | None = None,
    ) -> None:
        super().__init__()
        if not 0 <= crop_jitter < 1 or not 0 <= color_jitter < 1:
            raise ValueError(f"jitter must be in [0, 1), got crop {crop_jitter}, color {color_jitter}")
        self.analyzer = analyzer
        self.recognizer = recognizer
        reference = torch.as_tensor(
            np.asarray(reference_embedding, np.float32)
            if not isinstance(reference_embedding, torch.Tensor)
            else reference_embedding.detach().float()
        ).reshape(-1)
        self.register_buffer("reference", F.normalize(reference, dim=0))
        self.crop_jitter = crop_jitter
        self.color_jitter = color_jitter
        self.det_thresh = det_thresh  # detection threshold on generated frames (None: the analyzer's)

    def forward(self, frames: torch.Tensor, generator: torch.Generator | None = None) -> IdentityLossOutput:
        if frames.ndim != 4 or frames.shape[1] != 3:
            raise ValueError(f"expected frames (N, 3, H, W), got {tuple(frames.shape)}")
        landmarks = self.analyzer.detect_landmarks(frames_to_uint8(frames), self.det_thresh)
        with_face = [i for i, kps in enumerate(landmarks) if kps is not None]
        no_face_rate = 1.0 - len(with_face) / len(frames)
        if not with_face:
            # Zero, but connected to the frames so a caller's backward() still works.
            return IdentityLossOutput(frames.sum() * 0.0, math.nan, no_face_rate, 0)

        kps = torch.from_numpy(np.stack([landmarks[i] for i in with_face]))
        kps = self._jitter_landmarks(kps, generator)
        crops = align_faces(frames[with_face], kps.to(frames.device))
        crops = self._jitter_colour(crops, generator)
        embeddings = self.recognizer(crops)
        cosine = F.cosine_similarity(embeddings, self.reference.to(embeddings)[None], dim=1)
        return IdentityLossOutput(
            loss=(1.0 - cosine).mean(),
            face_sim=float(cosine.detach().mean()),
            no_face_rate=no_face_rate,
            faces=len(with_face),
        )

    def _jitter_landmarks(self, kps: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Random small scale and shift of the landmarks: the crop moves and zooms slightly."""
        if self.crop_jitter == 0:
            return kps
        n = len(kps)
        centre = kps.mean(dim=1, keepdim=True)
        face_size = (kps[:, 1] - kps[:, 0]).norm(dim=1)[:, None, None] * 2.5  # ~ eye distance x 2.5
        scale = 1.0 + self.crop_jitter * (2 * torch.rand(n, 1, 1, generator=generator) - 1)
        shift = self.crop_jitter * (2 * torch.rand(n, 1, 2, generator=generator) - 1) * face_size
        return centre + (kps - centre) * scale + shift

    def _jitter_colour(self, crops: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Random brightness offset and contrast gain per crop (in the [-1, 1] range)."""
        if self.color_jitter == 0:
            return crops
        n = len(crops)
        brightness = self.color_jitter * (2 * torch.rand(n, 1, 1, 1, generator=generator) - 1)
        contrast = 1.0 + self.color_jitter * (2 * torch.rand(n, 1, 1, 1, generator=generator) - 1)
        mean = crops.mean(dim=(1, 2, 3), keepdim=True)
        return (crops - mean) * contrast.to(crops) + mean + brightness.to(crops)


def semantic_consistency_loss(scores_adapted: torch.Tensor, scores_base: torch.Tensor) -> torch.Tensor:
    """``KL(softmax(adapted) || softmax(base))`` over M frames; the base scores are a fixed
    target (detached), so only the adapted branch is pushed."""
    if scores_adapted.ndim != 1 or scores_adapted.shape != scores_base.shape:
        raise ValueError(
            f"expected two (M,) score vectors, got {tuple(scores_adapted.shape)} and {tuple(scores_base.shape)}"
        )
    log_adapted = F.log_softmax(scores_adapted.float(), dim=0)
    log_base = F.log_softmax(scores_base.detach().float(), dim=0)
    return (log_adapted.exp() * (log_adapted - log_base)).sum()
