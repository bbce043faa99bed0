"""The demo input set: real face photos that ship inside installed packages, no download.

scikit-image ships a portrait (`astronaut.png`, astronaut Eileen Collins) and insightface ships
an aligned portrait (`Tom_Hanks_54745.png`) and a group photo (`t1.jpg`). The group photo's
faces are located with scikit-image's real frontal-face LBP cascade and cropped, one identity
per person. Each identity gets two photos (the crop and a mirrored, re-framed variant) in the
input layout the batch job reads: `root/<identity_id>/*.png|jpg` (+ meta.json when the class
word is known).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import fsspec
import numpy as np
from PIL import Image, ImageOps

MIN_GROUP_FACE = 90  # px in t1.jpg: the cascade's smaller hits there are not faces


def _package_file(package: str, *parts: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"package {package} is not installed")
    return Path(spec.origin).parent.joinpath(*parts)


def _crop(image: Image.Image, box: tuple[int, int, int, int], margin: float, size: int = 256) -> Image.Image:
    x, y, w, h = box
    cx, cy, half = x + w / 2, y + h / 2, max(w, h) * (0.5 + margin)
    left, top = max(0, int(cx - half)), max(0, int(cy - half))
    right, bottom = min(image.width, int(cx + half)), min(image.height, int(cy + half))
    return image.crop((left, top, right, bottom)).resize((size, size), Image.Resampling.LANCZOS)


def _group_faces() -> list[Image.Image]:
    from skimage.feature import Cascade

    photo = Image.open(_package_file("insightface", "data", "images", "t1.jpg")).convert("RGB")
    cascade = Cascade(str(_package_file("skimage", "data", "lbpcascade_frontalface_opencv.xml")))
    hits = cascade.detect_multi_scale(
        img=np.asarray(photo), scale_factor=1.2, step_ratio=1, min_size=(40, 40), max_size=(300, 300)
    )
    boxes = sorted((d["c"], d["r"], d["width"], d["height"]) for d in hits if d["width"] >= MIN_GROUP_FACE)
    return [_crop(photo, box, margin=0.6) for box in boxes]


def demo_photos() -> dict[str, tuple[Image.Image, str | None]]:
    """identity id → (portrait, class word or None)."""
    astronaut = Image.open(_package_file("skimage", "data", "astronaut.png")).convert("RGB")
    hanks = Image.open(_package_file("insightface", "data", "images", "Tom_Hanks_54745.png")).convert("RGB")
    people = {
        "astronaut": (_crop(astronaut, (170, 40, 130, 150), margin=0.5), "woman"),
        "tom-hanks": (hanks.resize((256, 256)), "man"),
    }
    for i, face in enumerate(_group_faces(), start=1):
        people[f"group-person-{i}"] = (face, None)
    return people


def build_demo_identities(root_uri: str, storage_options: dict | None = None) -> list[str]:
    """Write the demo identities under `root_uri` (any fsspec URI); returns their ids."""
    fs, root = fsspec.core.url_to_fs(root_uri, **(storage_options or {}))
    people = demo_photos()
    if len(people) < 8:
        raise RuntimeError(f"the demo set needs 8 identities; found {len(people)} faces in the shipped photos")
    for identity_id, (portrait, class_word) in people.items():
        folder = f"{root.rstrip('/')}/{identity_id}"
        fs.makedirs(folder, exist_ok=True)
        variant = ImageOps.mirror(portrait).crop((16, 16, 240, 240)).resize(portrait.size)
        for name, image, fmt in (("photo-1.png", portrait, "PNG"), ("photo-2.jpg", variant, "JPEG")):
            buffer = io.BytesIO()
            image.save(buffer, format=fmt, quality=92)
            fs.pipe_file(f"{folder}/{name}", buffer.getvalue())
        if class_word:
            fs.pipe_file(f"{folder}/meta.json", json.dumps({"class": class_word}).encode())
    return sorted(people)


def demo_input_for(output_uri: str) -> str:
    """Where `pv-ray personalize` without `--input` writes the demo set: beside a local output
    (`out/personalize` -> `out/demo-identities`), or in pv-ray's cache folder (PV_RAY_CACHE,
    default ~/.cache/pv-ray) for a remote one: never the working directory, which may be a git
    checkout (these are photos of people)."""
    from pv_ray.presets.tiny import default_cache_dir
    from pv_ray.storage.uris import absolute_uri, is_remote

    if is_remote(output_uri):
        return str(default_cache_dir() / "demo-identities")
    return str(Path(absolute_uri(output_uri)).parent / "demo-identities")
