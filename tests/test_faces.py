"""Photo decoding and rejection, reference analysis on the tiny pack, ArcFace alignment."""

from __future__ import annotations

import io
from pathlib import Path

import insightface
import numpy as np
import pytest
import skimage.data
import torch
from insightface.utils import face_align
from PIL import Image

from pv_ray.faces.analysis import (
    FaceAnalyzer,
    IdentityRejected,
    PhotoRejected,
    decode_photo,
    resolve_face_pack,
)
from pv_ray.faces.arcface import align_faces

SKIMAGE_DATA = Path(skimage.data.__file__).parent
INSIGHTFACE_IMAGES = Path(insightface.__file__).parent / "data" / "images"
ASTRONAUT = (SKIMAGE_DATA / "astronaut.png").read_bytes()


def _encode(array: np.ndarray, fmt: str = "PNG", mode: str | None = None, **save) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format=fmt, **save)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def analyzer(tiny_face_pack: Path) -> FaceAnalyzer:
    return FaceAnalyzer(tiny_face_pack)


# --- decoding ------------------------------------------------------------------------------


def test_decodes_rgb_uint8() -> None:
    rgb = decode_photo(ASTRONAUT, max_pixels=10**6)
    assert rgb.shape == (512, 512, 3) and rgb.dtype == np.uint8
    assert np.array_equal(rgb, np.asarray(Image.open(SKIMAGE_DATA / "astronaut.png").convert("RGB")))


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "not an image"),
        (b"name,age\nada,36\n", "not an image"),
        (_encode(np.zeros((64, 64, 3), np.uint8), "JPEG")[:300], "unreadable (truncated or corrupt)"),
    ],
    ids=["empty", "text", "truncated_jpeg"],
)
def test_rejects_non_images(data: bytes, reason: str) -> None:
    with pytest.raises(PhotoRejected) as info:
        decode_photo(data, max_pixels=10**6)
    assert info.value.reason.startswith(reason)


def _saved(fmt: str, size: tuple[int, int] = (64, 64), **save) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 120, 90)).save(buffer, format=fmt, **save)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("fmt", "named"),
    [("TIFF", "TIFF"), ("GIF", "GIF"), ("BMP", "BMP"), ("EPS", "PostScript/EPS"), ("PPM", "PPM")],
)
def test_only_documented_formats_are_decoded_whatever_the_name(fmt: str, named: str) -> None:
    """Pillow can read these (EPS through Ghostscript); pv-ray never hands them to a decoder."""
    data = _saved(fmt)
    assert Image.open(io.BytesIO(data)).format is not None  # a real file of that format
    with pytest.raises(PhotoRejected) as info:
        decode_photo(data, max_pixels=10**6)
    assert info.value.reason == f"not a supported image format ({named}; supported: JPEG, PNG, WebP)"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "MPO"])
def test_documented_formats_decode(fmt: str) -> None:
    rgb = decode_photo(_saved(fmt, (40, 60)), max_pixels=10**6)
    assert rgb.shape == (60, 40, 3) and abs(int(rgb[30, 20, 0]) - 200) <= 3


@pytest.mark.parametrize(
    ("size", "reason"),
    [
        ((4000, 1), "image too small (4000 x 1; each side must be at least 32 px)"),
        ((1, 3000), "image too small (1 x 3000; each side must be at least 32 px)"),
        ((31, 31), "image too small (31 x 31; each side must be at least 32 px)"),
        ((2000, 40), "image too narrow (2000 x 40; the long side may be at most 8 times the short)"),
        ((40, 400), "image too narrow (40 x 400; the long side may be at most 8 times the short)"),
    ],
)
def test_strips_and_specks_are_rejected_before_detection(analyzer: FaceAnalyzer, size, reason: str) -> None:
    """A 4000 x 1 PNG made the detector's resize raise cv2.error, which failed the whole batch."""
    with pytest.raises(PhotoRejected) as info:
        decode_photo(_saved("PNG", size), max_pixels=10**7)
    assert info.value.reason == reason
    result = analyzer.analyze_photo("strip.png", _saved("PNG", size))
    assert (result.ok, result.reason) == (False, reason)
    assert decode_photo(_saved("PNG", (256, 32)), max_pixels=10**7).shape == (32, 256, 3)  # 8:1 is fine


def test_rejects_oversized_before_decoding() -> None:
    data = _encode(np.zeros((300, 400, 3), np.uint8))
    with pytest.raises(PhotoRejected, match=r"image too large \(400 x 300 > 100000 pixels\)"):
        decode_photo(data, max_pixels=100_000)


def test_exif_rotation_is_honoured() -> None:
    # A landscape bitmap stored with orientation 6 ("rotate 90 CW to view") is portrait upright.
    stored = np.zeros((40, 60, 3), np.uint8)
    stored[:, :10] = 255  # white band on the stored image's left edge
    exif = Image.Exif()
    exif[0x0112] = 6
    rgb = decode_photo(_encode(stored, "JPEG", exif=exif.tobytes(), quality=95), max_pixels=10**6)
    assert rgb.shape == (60, 40, 3)
    assert rgb[:8].mean() > 200 and rgb[-30:].mean() < 30  # the band is now on top


def test_rgba_composited_on_white() -> None:
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[:16, :, :] = (255, 0, 0, 255)  # opaque red top half, transparent bottom half
    rgb = decode_photo(_encode(rgba, mode="RGBA"), max_pixels=10**6)
    assert rgb.shape == (32, 32, 3)
    assert (rgb[0, 0] == (255, 0, 0)).all() and (rgb[-1, -1] == (255, 255, 255)).all()


def test_sixteen_bit_greyscale() -> None:
    grey16 = np.tile(np.array([[0, 65535], [32896, 257]], np.uint16), (16, 16))
    buffer = io.BytesIO()
    Image.fromarray(grey16).save(buffer, format="PNG")
    rgb = decode_photo(buffer.getvalue(), max_pixels=10**6)
    assert rgb.dtype == np.uint8 and rgb.shape == (32, 32, 3)
    assert rgb[:2, :2, 0].tolist() == [[0, 255], [128, 1]]


def test_palette_and_greyscale() -> None:
    grey = decode_photo(_encode(np.full((32, 32), 77, np.uint8)), max_pixels=1024)
    assert (grey == 77).all() and grey.shape == (32, 32, 3)
    solid = Image.fromarray(np.full((32, 32, 3), (10, 200, 30), np.uint8))
    palette = solid.convert("P", palette=Image.Palette.ADAPTIVE)
    buffer = io.BytesIO()
    palette.save(buffer, format="PNG")
    assert tuple(decode_photo(buffer.getvalue(), max_pixels=1024)[2, 2]) == (10, 200, 30)


# --- pack folder ---------------------------------------------------------------------------


def test_pack_folder_checked_before_insightface(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        FaceAnalyzer(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .onnx files"):
        FaceAnalyzer(tmp_path / "empty")


def test_nested_pack_folder_is_accepted(tmp_path: Path, tiny_face_pack: Path) -> None:
    nested = tmp_path / "antelopev2" / "antelopev2"
    nested.mkdir(parents=True)
    for onnx_file in tiny_face_pack.glob("*.onnx"):
        (nested / onnx_file.name).symlink_to(onnx_file)
    assert resolve_face_pack(tmp_path / "antelopev2") == nested


# --- analysis ------------------------------------------------------------------------------


def test_analyze_photo(analyzer: FaceAnalyzer) -> None:
    result = analyzer.analyze_photo("astronaut.png", ASTRONAUT)
    assert result.ok and result.reason is None
    assert result.embedding.shape == (512,) and result.embedding.dtype == np.float32
    assert np.linalg.norm(result.embedding) == pytest.approx(1.0, abs=1e-5)
    assert result.kps.shape == (5, 2) and result.bbox.shape == (4,)
    assert result.gender is None  # the tiny pack has no genderage model


def test_photo_rejections(analyzer: FaceAnalyzer) -> None:
    uniform = analyzer.analyze_photo("grey.png", _encode(np.full((200, 200, 3), 128, np.uint8)))
    assert (uniform.ok, uniform.reason) == (False, "no face detected")
    corrupt = analyzer.analyze_photo("cut.jpg", ASTRONAUT[:2000])
    assert corrupt.reason.startswith("unreadable (truncated or corrupt)")
    strict = FaceAnalyzer(analyzer.pack_dir, min_face_size=1000)
    small = strict.analyze_photo("astronaut.png", ASTRONAUT)
    assert not small.ok and small.reason.startswith("face too small (") and "< 1000)" in small.reason


def test_reference_from_one_good_photo(analyzer: FaceAnalyzer) -> None:
    reference = analyzer.reference(
        {
            "astronaut.png": ASTRONAUT,
            "notes.txt": b"hello",
            "grey.png": _encode(np.full((100, 100, 3), 128, np.uint8)),
        }
    )
    assert [p.name for p in reference.usable] == ["astronaut.png"]
    assert {p.name: p.reason for p in reference.rejected} == {
        "notes.txt": "not an image (JPEG, PNG, WebP expected)",
        "grey.png": "no face detected",
    }
    assert np.allclose(reference.embedding, reference.usable[0].embedding, atol=1e-6)
    assert reference.class_word == "person"


def test_reference_is_mean_of_usable_embeddings(analyzer: FaceAnalyzer) -> None:
    tom = (INSIGHTFACE_IMAGES / "Tom_Hanks_54745.png").read_bytes()
    reference = analyzer.reference({"a.png": ASTRONAUT, "b.png": tom})
    mean = reference.photos[0].embedding + reference.photos[1].embedding
    assert np.allclose(reference.embedding, mean / np.linalg.norm(mean), atol=1e-6)


def test_reference_rejects_identity_listing_every_reason(analyzer: FaceAnalyzer) -> None:
    with pytest.raises(IdentityRejected) as info:
        analyzer.reference({"a.txt": b"text", "b.png": _encode(np.zeros((50, 50, 3), np.uint8))})
    assert "a.txt: not an image" in str(info.value) and "b.png: no face detected" in str(info.value)


def test_frames_landmarks_and_embeddings(analyzer: FaceAnalyzer) -> None:
    astronaut = decode_photo(ASTRONAUT, max_pixels=10**6)
    frames = np.stack([astronaut, np.full_like(astronaut, 128)])
    landmarks = analyzer.detect_landmarks(frames)
    assert landmarks[0].shape == (5, 2) and landmarks[1] is None
    embeddings = analyzer.embed_frames(frames)
    assert embeddings[1] is None
    expected = analyzer.analyze_photo("a", ASTRONAUT).embedding
    assert float(embeddings[0] @ expected) == pytest.approx(1.0, abs=1e-5)


# --- alignment -----------------------------------------------------------------------------


def test_align_faces_matches_norm_crop_and_is_differentiable(analyzer: FaceAnalyzer) -> None:
    image = decode_photo((INSIGHTFACE_IMAGES / "t1.jpg").read_bytes(), max_pixels=10**7)
    kps = np.array([[200, 115], [240, 112], [222, 135], [205, 155], [238, 153]], np.float32)
    kps_all = np.stack([kps, analyzer.detect_landmarks(image[None])[0]])
    frames = torch.from_numpy(np.stack([image, image])).permute(0, 3, 1, 2).float() / 127.5 - 1
    frames.requires_grad_(True)
    crops = align_faces(frames, torch.from_numpy(kps_all))
    assert crops.shape == (2, 3, 112, 112)
    for crop, points in zip(crops, kps_all):
        expected = face_align.norm_crop(image, points, 112).astype(np.float32) / 255
        got = (crop.detach().permute(1, 2, 0).numpy() + 1) / 2
        assert np.abs(got - expected).mean() < 1 / 255
    crops.sum().backward()
    assert frames.grad is not None and frames.grad.abs().sum() > 0


def test_align_faces_pads_black_like_cv2() -> None:
    image = np.full((64, 64, 3), 200, np.uint8)
    kps = np.array([[50, 30], [62, 30], [56, 37], [51, 44], [61, 44]], np.float32)  # near the edge
    frames = torch.from_numpy(image[None]).permute(0, 3, 1, 2).float() / 127.5 - 1
    got = (align_faces(frames, torch.from_numpy(kps[None]))[0].permute(1, 2, 0).numpy() + 1) / 2
    expected = face_align.norm_crop(image, kps, 112).astype(np.float32) / 255
    assert expected.min() == 0.0  # the crop reaches outside the image
    assert np.abs(got - expected).mean() < 1 / 255
