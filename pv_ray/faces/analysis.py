"""Reference analysis: decode photos, detect, embed (insightface).

``FaceAnalyzer`` wraps insightface's ``FaceAnalysis`` on a model pack folder (the tiny pack,
or a downloaded buffalo_l / antelopev2) and turns an identity's photos into a ``Reference``:
the L2-normalised mean embedding of the usable photos, every photo's verdict, and a class
word for the prompts. It also finds the landmarks of generated frames for the identity loss,
which aligns them with ``pv_ray.faces.arcface.align_faces``.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pv_ray.errors import InputError
from pv_ray.faces.photos import PhotoRejected, decode_photo
from pv_ray.prompts import class_word_for_gender

__all__ = [
    "FaceAnalyzer",
    "IdentityRejected",
    "PhotoRejected",
    "PhotoResult",
    "Reference",
    "decode_photo",
    "resolve_face_pack",
]


logger = logging.getLogger(__name__)


class IdentityRejected(InputError):
    """No photo of an identity is usable; the message lists every photo's reason."""


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

    def to_dict(self) -> dict[str, Any]:
        """The verdict as the reports record it (no embedding: it is biometric data)."""
        score = None if self.det_score is None else float(self.det_score)
        return {"name": self.name, "ok": self.ok, "reason": self.reason, "det_score": score}


@dataclass
class Reference:
    """An identity's target: mean embedding of its usable photos, plus every photo's verdict."""

    embedding: np.ndarray  # float32 (512,), L2-normalised
    photos: list[PhotoResult] = field(default_factory=list)
    class_word: str = "person"
    # The independent judge's descriptor of the same photos (pv_ray.evaluation.judge), when installed.
    independent: np.ndarray | None = None

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
        """Decode, detect and embed one photo; keeps its largest face. Never raises for the photo:
        what the decoder or the face models cannot handle is this photo's rejection reason."""
        try:
            rgb = decode_photo(data, max_pixels=self.max_pixels)
        except PhotoRejected as rejected:
            return PhotoResult(name=name, ok=False, reason=rejected.reason)
        try:
            return self._analyze_pixels(name, rgb)
        except Exception as error:  # e.g. cv2.error on a shape the detector cannot resize
            logger.warning("the face models could not process photo %r", name, exc_info=True)
            first_line = (str(error).strip().splitlines() or [""])[0]
            return PhotoResult(
                name=name,
                ok=False,
                reason=f"the face detector could not process it ({type(error).__name__}: {first_line})",
            )

    def _analyze_pixels(self, name: str, rgb: np.ndarray) -> PhotoResult:
        faces = self._app.get(np.ascontiguousarray(rgb[:, :, ::-1]))  # insightface wants BGR
        if not faces:
            return PhotoResult(name=name, ok=False, reason="no face detected")
        face = max(faces, key=lambda f: _area(f.bbox))
        result = PhotoResult(
            name=name,
            ok=True,
            bbox=face.bbox.astype(np.float32),
            kps=face.kps.astype(np.float32),
            det_score=float(face.det_score),
            gender=face.sex if self.has_gender else None,
        )
        width, height = _size(face.bbox)
        if min(width, height) < self.min_face_size:
            result.ok = False
            result.reason = f"face too small ({width:.0f}x{height:.0f} px < {self.min_face_size})"
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

    def detect_landmarks(self, frames: np.ndarray, det_thresh: float | None = None) -> list[np.ndarray | None]:
        """5 landmarks (pixels) of the largest face per RGB uint8 frame, None where no face;
        `det_thresh` overrides the detection threshold for these frames."""
        detector = self._app.det_model
        configured = detector.det_thresh
        detector.det_thresh = configured if det_thresh is None else det_thresh
        landmarks: list[np.ndarray | None] = []
        try:
            for frame in _check_frames(frames):
                boxes, kpss = detector.detect(np.ascontiguousarray(frame[:, :, ::-1]))
                best = self._largest(boxes)
                landmarks.append(None if best is None else kpss[best].astype(np.float32))
        finally:
            detector.det_thresh = configured
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
        areas = np.where(sides >= self.min_face_size, (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), -1.0)
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
    votes = Counter(r.gender for r in usable if r.gender in ("M", "F")).most_common()
    tied = len(votes) > 1 and votes[0][1] == votes[1][1]
    return class_word_for_gender(None if not votes or tied else votes[0][0])
