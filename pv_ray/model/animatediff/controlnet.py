"""ControlNet for the video backbone: an SD1.5 ControlNet applied to every frame.

A ControlNet (diffusers `ControlNetModel` folder, safetensors) computes residuals from a
conditioning image (pose, depth, edges) at each denoising step; AnimateDiff adds them per frame
to its UNet's skip connections, as diffusers' `AnimateDiffControlNetPipeline` does. It composes
with an identity adapter without retuning: the adapter changes the UNet's spatial attention, the
ControlNet its skip connections.

The conditioning clip is a video file (`.mp4`, `.gif`) or a folder of images (sorted by name),
one image per generated frame, at the video's size: a clip with another frame count or size is
refused with one line, never resized or cut silently.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pv_ray.errors import InputError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")


class ControlError(InputError):
    """A ControlNet folder or conditioning clip that cannot be used."""


@dataclass
class Control:
    """What a generation is conditioned on: the ControlNet, the frames (F, 3, H, W) in [0, 1]
    and the conditioning scale."""

    net: torch.nn.Module
    frames: torch.Tensor
    scale: float = 1.0

    def residuals(self, model_input: torch.Tensor, t, embeds: torch.Tensor) -> dict:
        """The UNet's extra keyword arguments at one step: per-frame down and mid residuals.

        `model_input` is (B, C, F, h, w) (B = 2 with classifier-free guidance), `embeds` one per
        frame and batch entry, as the UNet gets them."""
        b, c, f, h, w = model_input.shape
        flat = model_input.transpose(1, 2).reshape(b * f, c, h, w)
        frames = torch.cat([self.frames] * b).to(flat)
        down, mid = self.net(
            flat,
            t,
            encoder_hidden_states=embeds,
            controlnet_cond=frames,
            conditioning_scale=self.scale,
            return_dict=False,
        )
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}


def load_controlnet(folder: str | Path, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A diffusers ControlNet folder (config.json + safetensors), frozen, on `device`."""
    from diffusers import ControlNetModel

    path = Path(folder).expanduser()
    if not (path / "config.json").is_file():
        raise ControlError(f"--controlnet {folder}: not a ControlNet folder (no config.json)")
    net = ControlNetModel.from_pretrained(path, use_safetensors=True)
    net.requires_grad_(False)
    return net.eval().to(device=device, dtype=dtype)


def read_control_frames(source: str | Path, num_frames: int, height: int, width: int) -> torch.Tensor:
    """The conditioning clip as (F, 3, H, W) float in [0, 1]; ControlError unless it has exactly
    `num_frames` frames of `width` x `height`."""
    from pv_ray.storage.video import read_video

    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise ControlError(f"--control {source}: no images ({', '.join(IMAGE_EXTENSIONS)}) in the folder")
        clip = np.stack([_rgb(p, source) for p in files]) if _same_size(files) else None
        if clip is None:
            raise ControlError(f"--control {source}: the images are not all the same size")
    elif path.is_file():
        try:
            clip = read_video(path)
        except (ValueError, OSError) as e:
            raise ControlError(f"--control {source}: not a readable video ({e})") from None
    else:
        raise ControlError(f"--control {source}: no such file or folder")
    frames, clip_height, clip_width = clip.shape[:3]
    if frames != num_frames:
        raise ControlError(f"--control {source}: {frames} frames, the video has {num_frames} (--frames)")
    if (clip_height, clip_width) != (height, width):
        raise ControlError(f"--control {source}: frames are {clip_width}x{clip_height}, the video is {width}x{height}")
    return torch.from_numpy(clip).permute(0, 3, 1, 2).float() / 255.0


def _same_size(files: list[Path]) -> bool:
    sizes = set()
    for p in files:
        with Image.open(p) as image:
            sizes.add(image.size)
    return len(sizes) == 1


def _rgb(path: Path, source) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except OSError as e:
        raise ControlError(f"--control {source}: {path.name} is not a readable image ({e})") from None


def find_control_clip(folder: str | Path, name: str) -> Path:
    """The conditioning clip called `name` in a configured folder: `<name>.mp4`, `<name>.gif` or
    a folder `<name>/` of images. Names follow the identity-id rule, so none escapes the folder."""
    from pv_ray.storage.identity import validate_identity_id

    validate_identity_id(name)
    root = Path(folder)
    for candidate in (root / name, root / f"{name}.mp4", root / f"{name}.gif"):
        if candidate.exists():
            return candidate
    raise ControlError(f"unknown control clip {name!r} in {root}")


def list_control_clips(folder: str | Path | None) -> list[str]:
    """The names of the clips in a configured folder (see `find_control_clip`)."""
    if folder is None or not Path(folder).is_dir():
        return []
    names = {
        p.stem if p.is_file() else p.name for p in Path(folder).iterdir() if p.is_dir() or p.suffix in (".mp4", ".gif")
    }
    return sorted(names)
