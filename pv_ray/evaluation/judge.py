"""An independent identity judge: a second face recogniser that tuning never sees.

The identity loss optimises insightface's recogniser, which a tuned adapter can learn to please
without the face looking like the person. Evaluation therefore also asks dlib's ResNet face
recogniser (128-d descriptors, with its frontal face detector and 5-point landmark model; dlib
and its models are public domain), installed with the optional extra `pip install pv-ray[judge]`
(`dlib-bin` and `face-recognition-models` from the package index, no download at run time).

Its verdict is a distance, as dlib's: the Euclidean distance between two descriptors; below 0.6
dlib calls two faces the same person. `face_dist_independent` is the mean distance between the
frames' faces and the identity's reference descriptor (the mean over its photos), lower is closer.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

NOT_INSTALLED = "not installed (pip install 'pv-ray[judge]')"
SAME_PERSON_BELOW = 0.6
DESCRIPTOR_DIM = 128
logger = logging.getLogger(__name__)


def _models_folder() -> Path | None:
    # The package's __init__ needs pkg_resources; only its data files are needed here.
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "models"


def judge_available() -> bool:
    folder = _models_folder()
    return importlib.util.find_spec("dlib") is not None and folder is not None and folder.is_dir()


class IndependentJudge:
    """dlib's face detector, landmarks and recogniser, loaded once."""

    def __init__(self) -> None:
        import dlib

        folder = _models_folder()
        if folder is None or not judge_available():
            raise RuntimeError(f"the independent judge is {NOT_INSTALLED}")
        self.detector = dlib.get_frontal_face_detector()
        self.landmarks = dlib.shape_predictor(str(folder / "shape_predictor_5_face_landmarks.dat"))
        self.recogniser = dlib.face_recognition_model_v1(str(folder / "dlib_face_recognition_resnet_model_v1.dat"))

    def describe(self, rgb: np.ndarray) -> np.ndarray | None:
        """The descriptor of the largest face in an RGB uint8 image (None: no face found)."""
        image = np.ascontiguousarray(rgb)
        faces = self.detector(image, 1)
        if not faces:
            return None
        face = max(faces, key=lambda r: r.width() * r.height())
        return np.asarray(self.recogniser.compute_face_descriptor(image, self.landmarks(image, face)), np.float32)

    def reference(self, photos: Iterable[np.ndarray]) -> np.ndarray | None:
        """The mean descriptor over the photos with a face (None when none has one)."""
        found = [d for d in (self.describe(p) for p in photos) if d is not None]
        return np.mean(found, axis=0).astype(np.float32) if found else None

    def reference_of(self, photos: Mapping[str, bytes], max_pixels: int) -> np.ndarray | None:
        """`reference` of photo files, read by the checked decoder; a photo the decoder or dlib
        cannot handle is left out (the judge only evaluates: it never rejects a photo)."""
        from pv_ray.faces.photos import PhotoRejected, decode_photo

        found = []
        for name, data in photos.items():
            try:
                descriptor = self.describe(decode_photo(data, max_pixels=max_pixels))
            except PhotoRejected:
                continue
            except Exception:  # one odd photo must not stop the identity's analysis
                logger.warning("the independent judge could not process photo %r", name, exc_info=True)
                continue
            if descriptor is not None:
                found.append(descriptor)
        return np.mean(found, axis=0).astype(np.float32) if found else None

    def describe_frames(self, frames: np.ndarray) -> tuple[np.ndarray | None, ...]:
        """One descriptor per frame of a uint8 clip (F, H, W, 3), None where no face."""
        return tuple(self.describe(frame) for frame in frames)


def mean_distance(descriptors: Iterable[np.ndarray | None], reference: np.ndarray) -> float:
    """Mean Euclidean distance of the frames' faces to `reference` (NaN: no face in any frame)."""
    found = [float(np.linalg.norm(d - reference)) for d in descriptors if d is not None]
    return float(np.mean(found)) if found else float("nan")


def judged_reference(analyzer, judge: IndependentJudge | None, photos: Mapping[str, bytes], max_pixels: int):
    """An identity's `Reference` from its photos, with the judge's descriptor when it is installed."""
    reference = analyzer.reference(photos)
    if judge is not None:  # the photos reference analysis accepted, no others
        usable = {photo.name: photos[photo.name] for photo in reference.usable}
        reference.independent = judge.reference_of(usable, max_pixels)
    return reference
