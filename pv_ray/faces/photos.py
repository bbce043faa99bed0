"""The checked photo decoder: every photo pv-ray reads goes through `decode_photo`.

Photos are untrusted input, so they are judged by their content, never by their name: only the
formats pv-ray documents (JPEG, PNG, WebP) are decoded. Pillow is told to try those decoders and
no other (`Image.open(..., formats=...)`), so a TIFF, a GIF or an EPS (which Pillow would hand to
Ghostscript) named `.jpg` is never parsed; its format is named from its first bytes for the
reason. The size, the pixel count and the shape are checked on the header, before the pixels are
decoded: a decompression bomb, and a 4000 x 1 strip that would make the face detector's resize
fail, are rejected with a reason. Anything else the decoder raises rejects the photo too.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "MAX_ASPECT_RATIO",
    "MIN_PHOTO_SIDE",
    "SUPPORTED_FORMATS",
    "PhotoRejected",
    "decode_photo",
    "sniffed_format",
]

# Pillow format names of the documented formats (an MPO is a camera's multi-picture JPEG: its first picture).
SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP")
_DECODED_FORMATS = frozenset({*SUPPORTED_FORMATS, "MPO"})
SUPPORTED_NAMES = "JPEG, PNG, WebP"
# A face needs pixels on both sides; a strip (4000 x 1) would leave the detector's resized input empty.
MIN_PHOTO_SIDE = 32
MAX_ASPECT_RATIO = 8.0

# First bytes of formats people do save as .jpg, named in the reason (nothing is parsed beyond them).
_SIGNATURES: tuple[tuple[int, bytes, str], ...] = (
    (0, b"II*\x00", "TIFF"),
    (0, b"MM\x00*", "TIFF"),
    (0, b"II+\x00", "BigTIFF"),
    (0, b"MM\x00+", "BigTIFF"),
    (0, b"GIF87a", "GIF"),
    (0, b"GIF89a", "GIF"),
    (0, b"BM", "BMP"),
    (0, b"%!PS", "PostScript/EPS"),
    (0, b"\xc5\xd0\xd3\xc6", "EPS"),
    (0, b"%PDF", "PDF"),
    (0, b"8BPS", "Photoshop PSD"),
    (0, b"\x00\x00\x01\x00", "ICO"),
    (0, b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
    (0, b"\xff\x4f\xff\x51", "JPEG 2000"),
    (0, b"\xff\x0a", "JPEG XL"),
    (0, b"\x00\x00\x00\x0cJXL ", "JPEG XL"),
    (0, b"qoif", "QOI"),
    (0, b"DDS ", "DDS"),
    (0, b"P1", "PBM"),
    (0, b"P4", "PBM"),
    (0, b"P2", "PGM"),
    (0, b"P5", "PGM"),
    (0, b"P3", "PPM"),
    (0, b"P6", "PPM"),
    (4, b"ftypheic", "HEIC"),
    (4, b"ftypheix", "HEIC"),
    (4, b"ftypmif1", "HEIF"),
    (4, b"ftypavif", "AVIF"),
)


class PhotoRejected(ValueError):
    """A photo that cannot serve as a reference; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def sniffed_format(data: bytes) -> str | None:
    """The name of a known unsupported image format from the first bytes of `data` (None: unknown)."""
    for offset, signature, name in _SIGNATURES:
        if data[offset : offset + len(signature)] == signature:
            return name
    return None


def decode_photo(data: bytes, *, max_pixels: int) -> np.ndarray:
    """Decode JPEG, PNG or WebP bytes to upright RGB uint8 ``(H, W, 3)``, or raise ``PhotoRejected``."""
    if not data:
        raise PhotoRejected("not an image (empty file)")
    # Pillow's decompression-bomb guard is a process-wide setting; we check our own limit on
    # the header size before decoding, and treat Pillow's warning as an error too.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        image = _open(data, max_pixels)
        try:
            image.load()
            image = ImageOps.exif_transpose(image)
            return _to_rgb(image)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise PhotoRejected(f"image too large (more than {max_pixels} pixels)") from None
        except Exception as error:  # whatever a decoder raises on hostile bytes rejects the photo
            raise PhotoRejected(f"unreadable (truncated or corrupt): {_describe(error)}") from None


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """The opened (not yet decoded) image, its format and header checked."""
    try:
        image = Image.open(io.BytesIO(data), formats=list(SUPPORTED_FORMATS))
    except UnidentifiedImageError:
        found = sniffed_format(data)
        if found is not None:
            raise PhotoRejected(f"not a supported image format ({found}; supported: {SUPPORTED_NAMES})") from None
        raise PhotoRejected(f"not an image ({SUPPORTED_NAMES} expected)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise PhotoRejected(f"image too large (more than {max_pixels} pixels)") from None
    except Exception as error:  # a header parser's error on hostile bytes rejects the photo
        raise PhotoRejected(f"unreadable (truncated or corrupt): {_describe(error)}") from None
    if image.format not in _DECODED_FORMATS:  # formats= already ensures it; a plugin subclass must not slip by
        raise PhotoRejected(f"not a supported image format ({image.format}; supported: {SUPPORTED_NAMES})")
    width, height = image.size
    if width * height > max_pixels:
        raise PhotoRejected(f"image too large ({width} x {height} > {max_pixels} pixels)")
    if width == 0 or height == 0:
        raise PhotoRejected("unreadable (truncated or corrupt): empty image")
    if min(width, height) < MIN_PHOTO_SIDE:
        raise PhotoRejected(f"image too small ({width} x {height}; each side must be at least {MIN_PHOTO_SIDE} px)")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise PhotoRejected(
            f"image too narrow ({width} x {height}; the long side may be at most {MAX_ASPECT_RATIO:g} times the short)"
        )
    return image


def _describe(error: BaseException) -> str:
    message = str(error).strip().splitlines()
    return f"{type(error).__name__}: {message[0]}" if message else type(error).__name__


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
