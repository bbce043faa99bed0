"""Reference analysis (decode, detect, embed) and differentiable ArcFace alignment.

``FaceAnalyzer`` wraps insightface's ``FaceAnalysis`` on a model pack folder (the tiny pack,
or a downloaded buffalo_l / antelopev2) and turns an identity's photos into a ``Reference``:
the L2-normalised mean embedding of the usable photos, every photo's verdict, and a class
word for the prompts. ``align_faces`` is the torch twin of insightface's ``norm_crop`` that
the identity loss uses on generated frames, so gradients flow back to the pixels.
"""

from __future__ import annotations

import io
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "ARCFACE_TEMPLATE",
    "FaceAnalyzer",
    "IdentityRejected",
    "PhotoRejected",
    "PhotoResult",
    "Reference",
    "align_faces",
    "decode_photo",
    "resolve_face_pack",
]

# insightface.utils.face_align.arcface_dst: the 5 landmarks of a 112x112 ArcFace crop.
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
     [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float64,
)

_CLASS_WORDS = {"M": "man", "F": "woman"}


class PhotoRejected(ValueError):
    """A photo that cannot serve as a reference; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class IdentityRejected(ValueError):
    """No photo of an identity is usable; the message lists every photo's reason."""


# ---------------------------------------------------------------------------------------------
# decoding


def decode_photo(data: bytes, *, max_pixels: int) -> np.ndarray:
    """Decode image bytes to upright RGB uint8 ``(H, W, 3)``, or raise ``PhotoRejected``."""
    if not data:
        raise PhotoRejected("not an image (empty file)")
    # Pillow's decompression-bomb guard is a process-wide setting; we check our own limit on
    # the header size before decoding, and treat Pillow's warning as an error too.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise PhotoRejected("not an image") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise PhotoRejected(f"image too large (more than {max_pixels} pixels)") from None
        except (OSError, SyntaxError, ValueError) as error:
            raise PhotoRejected(f"unreadable (truncated or corrupt): {error}") from None
        width, height = image.size
        if width * height > max_pixels:
            raise PhotoRejected(f"image too large ({width} x {height} > {max_pixels} pixels)")
        if width == 0 or height == 0:
            raise PhotoRejected("unreadable (truncated or corrupt): empty image")
        try:
            image.load()
            image = ImageOps.exif_transpose(image)
        except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as error:
            raise PhotoRejected(f"unreadable (truncated or corrupt): {error}") from None
    return _to_rgb(image)


def _to_rgb(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode.startswith("I") or mode == "F":
        # 16/32-bit greyscale: a 16-bit range maps to 8 bits; values already in 0..255 stay.
        grey = np.asarray(image, dtype=np.float64)
        if grey.max(initial=0) > 255:
            grey = grey / 257.0
        grey = np.clip(np.rint(grey), 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        # Transparent areas become white, as most viewers show them, not black.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))


# ---------------------------------------------------------------------------------------------
# analysis


@dataclass
class PhotoResult:
    """One reference photo's verdict: its embedding when ``ok``, else the ``reason``."""

    name: str
    ok: bool
    reason: str | None = None
    embedding: np.ndarray | None = None  # float32 (512,), L2-normalised
    bbox: np.ndarray | None = None  # (4,) x1, y1, x2, y2 in pixels
    kps: np.ndarray | None = None  # (5, 2) pixels
    det_score: float | None = None
    gender: str | None = None  # "M" / "F" when the pack has a genderage model


@dataclass
class Reference:
    """An identity's target: mean embedding of its usable photos, plus every photo's verdict."""

    embedding: np.ndarray  # float32 (512,), L2-normalised
    photos: list[PhotoResult] = field(default_factory=list)
    class_word: str = "person"

    @property
    def usable(self) -> list[PhotoResult]:
        return [photo for photo in self.photos if photo.ok]

    @property
    def rejected(self) -> list[PhotoResult]:
        return [photo for photo in self.photos if not photo.ok]


def resolve_face_pack(pack_dir: str | Path) -> Path:
    """The folder holding the pack's ``.onnx`` files: ``pack_dir`` itself, or its only
    subfolder (the antelopev2 zip unpacks into ``antelopev2/antelopev2/``)."""
    root = Path(pack_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"face model pack not found: {root} is not a folder")
    if any(root.glob("*.onnx")):
        return root
    subfolders = [child for child in root.iterdir() if child.is_dir()]
    if len(subfolders) == 1 and any(subfolders[0].glob("*.onnx")):
        return subfolders[0]
    raise FileNotFoundError(
        f"face model pack has no .onnx files: {root} (expected the detector and recognition "
        "models there, or in its only subfolder)"
    )


def _session_options():
    """onnxruntime settings for the face models: as many threads as torch may use (a batch worker
    given one core stays on it), and no spin-waiting, which would burn the core torch needs
    between two face detections."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


class FaceAnalyzer:
    """insightface ``FaceAnalysis`` on a local pack folder; never downloads anything."""

    def __init__(
        self,
        pack_dir: str | Path,
        *,
        det_size: int = 640,
        det_thresh: float = 0.5,
        min_face_size: int = 16,
        max_pixels: int = 40_000_000,
        providers: Sequence[str] = ("CPUExecutionProvider",),
    ) -> None:
        from insightface.app import FaceAnalysis

        self.pack_dir = resolve_face_pack(pack_dir)
        self.min_face_size = min_face_size
        self.max_pixels = max_pixels
        # A folder path (not a pack name) keeps insightface from looking for a download.
        self._app = FaceAnalysis(name=str(self.pack_dir), providers=list(providers), sess_options=_session_options())
        if "recognition" not in self._app.models:
            raise ValueError(f"face model pack {self.pack_dir} has no recognition model")
        ctx_id = -1 if list(providers) == ["CPUExecutionProvider"] else 0
        self._app.prepare(ctx_id=ctx_id, det_thresh=det_thresh, det_size=(det_size, det_size))
        self.has_gender = "genderage" in self._app.models

    @classmethod
    def from_config(cls, pack_dir: str | Path, faces) -> FaceAnalyzer:
        """An analyzer with the settings of a `config.FacesConfig` section."""
        return cls(
            pack_dir,
            det_size=faces.det_size,
            det_thresh=faces.det_thresh,
            min_face_size=faces.min_face_size,
            max_pixels=faces.max_pixels,
        )

    @property
    def recognition_model_path(self) -> Path:
        """The recognition ONNX file, for ``pv_ray.faces.recognizer.load_recognizer``."""
        return Path(self._app.models["recognition"].model_file)

    def analyze_photo(self, name: str, data: bytes) -> PhotoResult:
        """Decode, detect and embed one photo; keeps its largest face."""
        try:
            rgb = decode_photo(data, max_pixels=self.max_pixels)
        except PhotoRejected as rejected:
            return PhotoResult(name=name, ok=False, reason=rejected.reason)
        faces = self._app.get(np.ascontiguousarray(rgb[:, :, ::-1]))  # insightface wants BGR
        if not faces:
            return PhotoResult(name=name, ok=False, reason="no face detected")
        face = max(faces, key=lambda f: _area(f.bbox))
        result = PhotoResult(
            name=name, ok=True, bbox=face.bbox.astype(np.float32), kps=face.kps.astype(np.float32),
            det_score=float(face.det_score), gender=face.sex if self.has_gender else None,
        )
        width, height = _size(face.bbox)
        if min(width, height) < self.min_face_size:
            result.ok = False
            result.reason = (f"face too small ({width:.0f}x{height:.0f} px < "
                             f"{self.min_face_size})")
            return result
        result.embedding = face.normed_embedding.astype(np.float32)
        return result

    def reference(self, photos: Mapping[str, bytes]) -> Reference:
        """Analyse an identity's photos; raises ``IdentityRejected`` if none is usable."""
        results = [self.analyze_photo(name, data) for name, data in photos.items()]
        usable = [r for r in results if r.ok]
        if not usable:
            reasons = "; ".join(f"{r.name}: {r.reason}" for r in results) or "no photos"
            raise IdentityRejected(f"no usable reference photo ({reasons})")
        mean = np.mean([r.embedding for r in usable], axis=0)
        embedding = (mean / np.linalg.norm(mean)).astype(np.float32)
        return Reference(embedding=embedding, photos=results, class_word=_class_word(usable))

    def detect_landmarks(self, frames: np.ndarray) -> list[np.ndarray | None]:
        """5 landmarks (pixels) of the largest face per RGB uint8 frame, None where no face."""
        landmarks: list[np.ndarray | None] = []
        for frame in _check_frames(frames):
            boxes, kpss = self._app.det_model.detect(np.ascontiguousarray(frame[:, :, ::-1]))
            best = self._largest(boxes)
            landmarks.append(None if best is None else kpss[best].astype(np.float32))
        return landmarks

    def embed_frames(self, frames: np.ndarray) -> list[np.ndarray | None]:
        """L2-normalised embedding of the largest face per RGB uint8 frame, None where no face."""
        embeddings: list[np.ndarray | None] = []
        for frame in _check_frames(frames):
            faces = self._app.get(np.ascontiguousarray(frame[:, :, ::-1]))
            best = self._largest(np.array([f.bbox for f in faces]).reshape(-1, 4))
            embeddings.append(None if best is None else faces[best].normed_embedding.astype(np.float32))
        return embeddings

    def _largest(self, boxes: np.ndarray) -> int | None:
        """Index of the largest box at least ``min_face_size`` on its short side."""
        if len(boxes) == 0:
            return None
        sides = np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
        areas = np.where(sides >= self.min_face_size,
                         (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), -1.0)
        best = int(np.argmax(areas))
        return best if areas[best] >= 0 else None


def _check_frames(frames: np.ndarray) -> np.ndarray:
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected RGB uint8 frames (N, H, W, 3), got {frames.dtype} {frames.shape}")
    return frames


def _size(bbox: np.ndarray) -> tuple[float, float]:
    return float(bbox[2] - bbox[0]), float(bbox[3] - bbox[1])


def _area(bbox: np.ndarray) -> float:
    width, height = _size(bbox)
    return width * height


def _class_word(usable: list[PhotoResult]) -> str:
    votes = Counter(r.gender for r in usable if r.gender in _CLASS_WORDS).most_common()
    if not votes or (len(votes) > 1 and votes[0][1] == votes[1][1]):
        return "person"
    return _CLASS_WORDS[votes[0][0]]


# ---------------------------------------------------------------------------------------------
# differentiable alignment


def arcface_template(size: int = 112) -> np.ndarray:
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


def align_faces(frames: torch.Tensor, kps: torch.Tensor, size: int = 112) -> torch.Tensor:
    """Warp each frame (N, 3, H, W) in [-1, 1] to the ArcFace crop of its landmarks (N, 5, 2),
    differentiably (float32 out); matches ``cv2.warpAffine`` as in insightface's ``norm_crop``."""
    if frames.ndim != 4 or kps.shape != (frames.shape[0], 5, 2):
        raise ValueError(f"expected frames (N, 3, H, W) and kps (N, 5, 2), got "
                         f"{tuple(frames.shape)} and {tuple(kps.shape)}")
    height, width = frames.shape[-2:]
    dst = torch.as_tensor(arcface_template(size), device=frames.device)
    forward = similarity_transforms(kps.detach().to(frames.device), dst)
    bottom = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64, device=frames.device)
    crop_to_image = torch.linalg.inv(torch.cat([forward, bottom.expand(len(forward), 1, 3)], dim=1))
    # affine_grid works in normalised coordinates with align_corners=False: pixel centre i of
    # an axis of length L sits at (2i + 1) / L - 1, and cv2 puts it at integer i.
    theta = (_pixels_to_normalised(width, height, frames.device) @ crop_to_image
             @ _normalised_to_pixels(size, size, frames.device))[:, :2]
    # float32 sampling even under half-precision autocast: a bf16 grid is off by pixels.
    grid = F.affine_grid(theta.float(), [len(frames), frames.shape[1], size, size],
                         align_corners=False)
    # Shift so that grid_sample's zero padding is black (-1), like cv2's borderValue=0.
    warped = F.grid_sample(frames.float() + 1.0, grid, mode="bilinear", padding_mode="zeros",
                           align_corners=False)
    return warped - 1.0


def _pixels_to_normalised(width: int, height: int, device: torch.device) -> torch.Tensor:
    return torch.tensor([[2.0 / width, 0.0, 1.0 / width - 1.0],
                         [0.0, 2.0 / height, 1.0 / height - 1.0],
                         [0.0, 0.0, 1.0]], dtype=torch.float64, device=device)


def _normalised_to_pixels(width: int, height: int, device: torch.device) -> torch.Tensor:
    return torch.tensor([[width / 2.0, 0.0, (width - 1) / 2.0],
                         [0.0, height / 2.0, (height - 1) / 2.0],
                         [0.0, 0.0, 1.0]], dtype=torch.float64, device=device)
