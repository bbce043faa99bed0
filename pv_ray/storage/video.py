"""Writing and reading generated clips as MP4 (H.264) or GIF.

Clips are numpy uint8 arrays of shape (F, H, W, 3), RGB. :func:`frames_to_uint8` converts the
pipeline's float frames (VAE output range [-1, 1]) into that layout.

- MP4: H.264 (libx264) in yuv420p, the pixel format every browser and player decodes,
  through the ffmpeg binary bundled with imageio-ffmpeg. yuv420p needs even width and height,
  so an odd dimension is padded by repeating the last row/column (the file is then one pixel
  larger). Lossy; ``crf`` sets the quality (18 is visually lossless). ``+faststart`` puts the
  index first so a browser can start playing before the download ends.
- GIF: Pillow, one palette of at most 256 colours shared by all frames, no dithering (a
  per-frame palette or dithering noise flickers between frames). A clip with at most 256
  distinct colours round-trips exactly; others are quantised (median cut). GIF timing has a
  10 ms resolution, and GIF stores identical consecutive frames once with a longer duration,
  so :func:`read_video` returns such runs as one frame.
"""

from __future__ import annotations

import io
import math
import os
import tempfile
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageSequence

from pv_ray.errors import InputError

SUPPORTED_FORMATS = {"mp4": "video/mp4", "gif": "image/gif"}
DEFAULT_CRF = 18
_PALETTE_SAMPLE_PIXELS = 1 << 20


class UnsupportedFormatError(InputError):
    """The requested video format is not one of SUPPORTED_FORMATS."""


def frames_to_uint8(frames: torch.Tensor) -> np.ndarray:
    """Float frames (F, 3, H, W) in [-1, 1] → numpy uint8 (F, H, W, 3); out-of-range values clip."""
    if not isinstance(frames, torch.Tensor) or not frames.is_floating_point():
        kind = getattr(frames, "dtype", type(frames).__name__)
        raise TypeError(f"frames must be a floating-point torch.Tensor (F, 3, H, W) in [-1, 1]; got {kind}")
    if frames.ndim != 4 or frames.shape[1] != 3:
        raise ValueError(f"frames must have shape (F, 3, H, W); got {tuple(frames.shape)}")
    pixels = ((frames.detach().float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def resolve_format(destination: str | os.PathLike | None, format: str | None = None) -> str:
    """The video format: ``format`` if given, else the extension of ``destination``."""
    if format is not None:
        name, origin = format.lower().lstrip("."), f"format {format!r}"
    elif destination is not None:
        name, origin = Path(destination).suffix.lower().lstrip("."), f"path {os.fspath(destination)!r}"
    else:
        raise UnsupportedFormatError(f"no video format given; supported: {', '.join(SUPPORTED_FORMATS)}")
    if name not in SUPPORTED_FORMATS:
        raise UnsupportedFormatError(
            f"unsupported video format {name or '(none)'!r} from {origin}; supported: {', '.join(SUPPORTED_FORMATS)}"
        )
    return name


def write_video(
    frames: np.ndarray,
    destination: str | os.PathLike | BinaryIO,
    *,
    fps: float = 8,
    format: str | None = None,
    crf: int = DEFAULT_CRF,
) -> None:
    """Write a clip to a path or binary file object; the format comes from ``format`` or the
    path's extension (a file object needs ``format``). ``crf`` (0-51) applies to MP4 only."""
    is_path = isinstance(destination, (str, os.PathLike))
    name = resolve_format(destination if is_path else None, format)
    data = encode_video(frames, name, fps=fps, crf=crf)
    if is_path:
        Path(destination).write_bytes(data)
    else:
        destination.write(data)


def encode_video(frames: np.ndarray, format: str, *, fps: float = 8, crf: int = DEFAULT_CRF) -> bytes:
    """Encode a clip in memory and return the file's bytes."""
    name = resolve_format(None, format)
    frames = _check_clip(frames)
    if not (isinstance(fps, (int, float)) and math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be a positive number; got {fps!r}")
    if name == "gif":
        return _encode_gif(frames, fps)
    if not (isinstance(crf, int) and 0 <= crf <= 51):
        raise ValueError(f"crf must be an integer in 0..51 (lower is better quality); got {crf!r}")
    return _encode_mp4(frames, fps, crf)


def read_video(source: str | os.PathLike | bytes, format: str | None = None) -> np.ndarray:
    """Decode a clip from a path or from bytes (bytes need ``format``) → uint8 (F, H, W, 3)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        name, data = resolve_format(None, format), bytes(source)
    else:
        name, data = resolve_format(source, format), Path(source).read_bytes()
    return _decode_gif(data) if name == "gif" else _decode_mp4(data)


def _check_clip(frames: np.ndarray) -> np.ndarray:
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8:
        kind = getattr(frames, "dtype", type(frames).__name__)
        raise TypeError(
            f"frames must be a numpy uint8 array (F, H, W, 3); got {kind} (convert model output with frames_to_uint8)"
        )
    if frames.ndim != 4 or frames.shape[-1] != 3 or 0 in frames.shape:
        raise ValueError(f"frames must have shape (F, H, W, 3) with F, H, W >= 1; got {frames.shape}")
    return np.ascontiguousarray(frames)


def _encode_mp4(frames: np.ndarray, fps: float, crf: int) -> bytes:
    _, height, width, _ = frames.shape
    frames = np.pad(frames, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)), mode="edge")
    import imageio_ffmpeg  # here, not at the top: tuning (frames_to_uint8) runs without ffmpeg

    # imageio-ffmpeg writes to a path only, so encode through a temporary file.
    with tempfile.TemporaryDirectory(prefix="pv-ray-video-") as folder:
        path = os.path.join(folder, "clip.mp4")
        writer = imageio_ffmpeg.write_frames(
            path,
            (frames.shape[2], frames.shape[1]),
            fps=fps,
            codec="libx264",
            pix_fmt_out="yuv420p",
            quality=None,  # rate control is set by -crf below
            macro_block_size=1,  # dimensions are already even; the default 16 would rescale
            ffmpeg_log_level="error",
            output_params=["-crf", str(crf), "-movflags", "+faststart"],
        )
        writer.send(None)
        for frame in frames:
            writer.send(frame)
        writer.close()
        return Path(path).read_bytes()


def _decode_mp4(data: bytes) -> np.ndarray:
    import imageio_ffmpeg

    with tempfile.TemporaryDirectory(prefix="pv-ray-video-") as folder:
        path = os.path.join(folder, "clip.mp4")
        Path(path).write_bytes(data)
        reader = imageio_ffmpeg.read_frames(path, pix_fmt="rgb24")
        try:
            width, height = next(reader)["size"]
            frames = [np.frombuffer(frame, np.uint8).reshape(height, width, 3) for frame in reader]
        finally:
            reader.close()
    if not frames:
        raise ValueError("the MP4 data holds no video frames")
    return np.stack(frames)


def _encode_gif(frames: np.ndarray, fps: float) -> bytes:
    images = _palette_images(frames)
    buffer = io.BytesIO()
    images[0].save(
        buffer,
        format="GIF",
        save_all=True,
        append_images=images[1:],
        # GIF counts time in centiseconds; 2 cs is the shortest delay browsers honour.
        duration=max(2, round(100 / fps)) * 10,
        loop=0,
    )
    return buffer.getvalue()


def _palette_images(frames: np.ndarray) -> list[Image.Image]:
    """P-mode frames sharing one palette; exact when the clip has at most 256 colours."""
    packed = (frames[..., 0].astype(np.uint32) << 16) | (frames[..., 1].astype(np.uint32) << 8) | frames[..., 2]
    colours, indices = np.unique(packed, return_inverse=True)
    _, height, width, _ = frames.shape
    if colours.size <= 256:
        # Index the frames ourselves: Pillow's palette lookup is approximate (a colour cache
        # keyed on truncated RGB), so close colours could swap.
        palette = np.stack([colours >> 16, (colours >> 8) & 255, colours & 255], axis=1).astype(np.uint8)
        images = []
        for frame_indices in indices.reshape(frames.shape[:3]).astype(np.uint8):
            image = Image.frombytes("P", (width, height), frame_indices.tobytes())
            image.putpalette(palette.ravel().tolist())
            images.append(image)
        return images
    # Quantise all frames together (stacked vertically) so the palette fits the whole clip;
    # a strided subsample of about a million pixels finds the same colours much faster.
    stride = max(1, math.ceil(math.sqrt(frames.size / 3 / _PALETTE_SAMPLE_PIXELS)))
    sample = np.ascontiguousarray(frames[:, ::stride, ::stride])
    mosaic = Image.fromarray(sample.reshape(-1, sample.shape[2], 3))
    palette_image = mosaic.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    return [Image.fromarray(frame).quantize(palette=palette_image, dither=Image.Dither.NONE) for frame in frames]


def _decode_gif(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        if image.format != "GIF":
            raise ValueError(f"the data is not a GIF (detected {image.format})")
        return np.stack([np.asarray(frame.convert("RGB")) for frame in ImageSequence.Iterator(image)])
