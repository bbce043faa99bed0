"""Tests for pv_ray.storage.video: real MP4 (ffmpeg/libx264) and GIF (Pillow) encoding round trips."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from pv_ray.storage.video import (
    SUPPORTED_FORMATS,
    UnsupportedFormatError,
    encode_video,
    frames_to_uint8,
    read_video,
    write_video,
)


def _smooth_clip(frames: int = 6, height: int = 48, width: int = 64) -> np.ndarray:
    """A moving gradient: the kind of content H.264 compresses well."""
    y, x = np.mgrid[0:height, 0:width]
    clip = [
        np.stack([(x * 4 + 8 * i) % 256, (y * 5) % 256, ((x + y) * 2 + 16 * i) % 256], axis=-1) for i in range(frames)
    ]
    return np.stack(clip).astype(np.uint8)


def _few_colour_clip(colours: int = 200, frames: int = 5) -> np.ndarray:
    rng = np.random.default_rng(0)
    palette = rng.integers(0, 256, (colours, 3), dtype=np.uint8)
    return palette[rng.integers(0, colours, (frames, 24, 40))]


def test_frames_to_uint8_maps_the_vae_range():
    frames = torch.tensor([-1.0, -0.5, 0.0, 1.0, 2.0]).view(1, 1, 1, 5).expand(2, 3, 4, 5)
    pixels = frames_to_uint8(frames)
    assert pixels.shape == (2, 4, 5, 3) and pixels.dtype == np.uint8
    assert pixels[0, 0, :, 0].tolist() == [0, 64, 128, 255, 255]
    with pytest.raises(ValueError, match=r"\(F, 3, H, W\)"):
        frames_to_uint8(torch.zeros(2, 4, 4, 3))
    with pytest.raises(TypeError, match="floating-point"):
        frames_to_uint8(torch.zeros(2, 3, 4, 4, dtype=torch.uint8))


def test_mp4_round_trip_keeps_frames_and_size_and_is_close(tmp_path):
    clip = _smooth_clip()
    path = tmp_path / "clip.mp4"
    write_video(clip, path, fps=8)
    data = path.read_bytes()
    assert data[4:8] == b"ftyp"  # an ISO media (MP4) container
    decoded = read_video(path)
    assert decoded.shape == clip.shape and decoded.dtype == np.uint8
    assert np.abs(decoded.astype(int) - clip).mean() < 3.0


def test_mp4_pads_odd_dimensions_to_even():
    clip = _smooth_clip(frames=3, height=47, width=63)
    decoded = read_video(encode_video(clip, "mp4"), "mp4")
    assert decoded.shape == (3, 48, 64, 3)
    assert np.abs(decoded[:, :47, :63].astype(int) - clip).mean() < 3.0


def test_mp4_crf_trades_size_for_quality():
    clip = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    fine, coarse = encode_video(clip, "mp4", crf=10), encode_video(clip, "mp4", crf=40)
    assert len(coarse) < len(fine)
    error = [np.abs(read_video(data, "mp4").astype(int) - clip).mean() for data in (fine, coarse)]
    assert error[0] < error[1]
    with pytest.raises(ValueError, match="crf must be an integer in 0..51"):
        encode_video(clip, "mp4", crf=60)


def test_gif_round_trip_is_exact_with_at_most_256_colours(tmp_path):
    clip = _few_colour_clip(colours=256)
    path = tmp_path / "clip.gif"
    write_video(clip, path, fps=10)
    decoded = read_video(path)
    assert decoded.shape == clip.shape
    np.testing.assert_array_equal(decoded, clip)
    with open(path, "rb") as handle:
        assert handle.read(6) == b"GIF89a"


def test_gif_quantises_rich_clips_with_one_palette():
    clip = _smooth_clip()
    decoded = read_video(encode_video(clip, "gif"), "gif")
    assert decoded.shape == clip.shape
    assert np.abs(decoded.astype(int) - clip).mean() < 12.0
    assert len(np.unique(decoded.reshape(-1, 3), axis=0)) <= 256


def test_bytes_api_and_file_objects():
    clip = _few_colour_clip()
    for name in SUPPORTED_FORMATS:
        buffer = io.BytesIO()
        write_video(clip, buffer, format=name)
        assert buffer.getvalue() == encode_video(clip, name)
        assert read_video(buffer.getvalue(), name).shape == clip.shape
    assert SUPPORTED_FORMATS == {"mp4": "video/mp4", "gif": "image/gif"}


def test_unsupported_formats_are_refused_with_the_supported_list(tmp_path):
    clip = _few_colour_clip()
    with pytest.raises(UnsupportedFormatError, match=r"unsupported video format 'avi'.*supported: mp4, gif"):
        write_video(clip, tmp_path / "clip.avi")
    with pytest.raises(UnsupportedFormatError, match="'webm'"):
        encode_video(clip, "webm")
    with pytest.raises(UnsupportedFormatError, match=r"'\(none\)'"):
        write_video(clip, tmp_path / "clip")
    with pytest.raises(UnsupportedFormatError, match="no video format given"):
        read_video(b"GIF89a", None)
    assert not (tmp_path / "clip.avi").exists()
    # An explicit format wins over the extension.
    write_video(clip, tmp_path / "clip.bin", format="GIF")
    assert read_video(tmp_path / "clip.bin", "gif").shape == clip.shape


def test_bad_clips_are_refused():
    with pytest.raises(TypeError, match="frames_to_uint8"):
        encode_video(np.zeros((2, 8, 8, 3), np.float32), "gif")
    with pytest.raises(ValueError, match=r"\(F, H, W, 3\)"):
        encode_video(np.zeros((0, 8, 8, 3), np.uint8), "mp4")
    with pytest.raises(ValueError, match="fps must be a positive number"):
        encode_video(_few_colour_clip(), "gif", fps=0)


def test_gif_stores_identical_consecutive_frames_once():
    # Documented GIF behaviour: a repeated frame becomes one longer frame, not two.
    clip = _few_colour_clip(frames=3)
    repeated = np.stack([clip[0], clip[1], clip[1], clip[2]])
    decoded = read_video(encode_video(repeated, "gif"), "gif")
    np.testing.assert_array_equal(decoded, clip)
