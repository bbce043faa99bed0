"""The ArcFace convention, and the differentiable alignment the identity loss uses.

ArcFace recognisers (insightface's w600k_r50, glintr100, the tiny pack's) read a 112x112 RGB
crop in [-1, 1] whose 5 landmarks sit on a fixed template, and give a 512-d embedding.
``align_faces`` is the torch twin of insightface's ``norm_crop``: it warps generated frames onto
that template with ``affine_grid``/``grid_sample``, so gradients flow back to the pixels.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

EMBEDDING_DIM = 512
CROP_SIZE = 112
# insightface.utils.face_align.arcface_dst: the 5 landmarks of a 112x112 ArcFace crop
# (left eye, right eye, nose tip, left and right mouth corners).
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float64,
)


def arcface_template(size: int = CROP_SIZE) -> np.ndarray:
    """The 5-point template for a ``size`` crop, scaled as insightface's ``estimate_norm``."""
    if size % 112 == 0:
        return ARCFACE_TEMPLATE * (size / 112.0)
    if size % 128 == 0:
        ratio = size / 128.0
        return ARCFACE_TEMPLATE * ratio + np.array([8.0 * ratio, 0.0])
    raise ValueError(f"ArcFace crop size must be a multiple of 112 or 128, got {size}")


def similarity_transforms(kps: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Least-squares similarity (Umeyama, no reflection) mapping ``kps`` (N, P, 2) to ``dst``
    (P, 2): (N, 2, 3) matrices, as skimage's ``SimilarityTransform.estimate``."""
    src = kps.to(torch.float64)
    dst = dst.to(torch.float64).expand_as(src)
    src_mean, dst_mean = src.mean(dim=1, keepdim=True), dst.mean(dim=1, keepdim=True)
    src_c, dst_c = src - src_mean, dst - dst_mean
    covariance = dst_c.transpose(1, 2) @ src_c / src.shape[1]
    u, s, vh = torch.linalg.svd(covariance)
    # Flip the last axis when the best orthogonal map would be a reflection.
    sign = torch.ones_like(s)
    sign[:, -1] = torch.where(torch.linalg.det(u) * torch.linalg.det(vh) < 0, -1.0, 1.0)
    rotation = u @ torch.diag_embed(sign) @ vh
    src_var = src_c.pow(2).sum(dim=(1, 2)) / src.shape[1]
    scale = (s * sign).sum(dim=1) / src_var
    translation = dst_mean.squeeze(1) - scale[:, None] * (rotation @ src_mean.transpose(1, 2)).squeeze(2)
    return torch.cat([scale[:, None, None] * rotation, translation[:, :, None]], dim=2)


def align_faces(frames: torch.Tensor, kps: torch.Tensor, size: int = CROP_SIZE) -> torch.Tensor:
    """Warp each frame (N, 3, H, W) in [-1, 1] to the ArcFace crop of its landmarks (N, 5, 2),
    differentiably (float32 out); matches ``cv2.warpAffine`` as in insightface's ``norm_crop``."""
    if frames.ndim != 4 or kps.shape != (frames.shape[0], 5, 2):
        raise ValueError(
            f"expected frames (N, 3, H, W) and kps (N, 5, 2), got {tuple(frames.shape)} and {tuple(kps.shape)}"
        )
    height, width = frames.shape[-2:]
    dst = torch.as_tensor(arcface_template(size), device=frames.device)
    forward = similarity_transforms(kps.detach().to(frames.device), dst)
    bottom = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64, device=frames.device)
    crop_to_image = torch.linalg.inv(torch.cat([forward, bottom.expand(len(forward), 1, 3)], dim=1))
    # affine_grid works in normalised coordinates with align_corners=False: pixel centre i of
    # an axis of length L sits at (2i + 1) / L - 1, and cv2 puts it at integer i.
    theta = (
        _pixels_to_normalised(width, height, frames.device)
        @ crop_to_image
        @ _normalised_to_pixels(size, size, frames.device)
    )[:, :2]
    # float32 sampling even under half-precision autocast: a bf16 grid is off by pixels.
    grid = F.affine_grid(theta.float(), [len(frames), frames.shape[1], size, size], align_corners=False)
    # Shift so that grid_sample's zero padding is black (-1), like cv2's borderValue=0.
    warped = F.grid_sample(frames.float() + 1.0, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return warped - 1.0


def _pixels_to_normalised(width: int, height: int, device: torch.device) -> torch.Tensor:
    return torch.tensor(
        [[2.0 / width, 0.0, 1.0 / width - 1.0], [0.0, 2.0 / height, 1.0 / height - 1.0], [0.0, 0.0, 1.0]],
        dtype=torch.float64,
        device=device,
    )


def _normalised_to_pixels(width: int, height: int, device: torch.device) -> torch.Tensor:
    return torch.tensor(
        [[width / 2.0, 0.0, (width - 1) / 2.0], [0.0, height / 2.0, (height - 1) / 2.0], [0.0, 0.0, 1.0]],
        dtype=torch.float64,
        device=device,
    )
