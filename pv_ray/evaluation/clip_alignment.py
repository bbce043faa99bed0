"""CLIP text alignment of generated clips: how well the frames match their prompt (CLIP-T).

The score of a clip is the mean, over its frames, of the cosine similarity between the CLIP image
embedding of the frame and the CLIP text embedding of the prompt. Weights come from a local
transformers folder (CLIPModel + CLIPProcessor, safetensors) only: nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pv_ray.errors import InputError


def check_clip_folder(folder: str | Path) -> Path:
    """The folder, if it looks like a saved CLIP model (config.json + model.safetensors)."""
    path = Path(folder).expanduser()
    missing = [name for name in ("config.json", "model.safetensors") if not (path / name).is_file()]
    if missing:
        raise InputError(f"eval.clip_model {folder}: not a local CLIP model folder (missing {', '.join(missing)})")
    return path


class ClipTextAlignment:
    """`scorer(clip, prompt) -> float` for uint8 clips of shape (F, H, W, 3)."""

    def __init__(self, folder: str | Path, device: torch.device | str = "cpu"):
        from transformers import CLIPModel, CLIPProcessor

        path = check_clip_folder(folder)
        self.device = torch.device(device)
        self.model = CLIPModel.from_pretrained(path, local_files_only=True, use_safetensors=True).to(self.device).eval()
        self.processor = CLIPProcessor.from_pretrained(path, local_files_only=True)

    @torch.no_grad()
    def __call__(self, clip: np.ndarray, prompt: str) -> float:
        inputs = self.processor(text=[prompt], images=list(clip), return_tensors="pt", padding=True, truncation=True)
        out = self.model(**{k: v.to(self.device) for k, v in inputs.items()})
        text = torch.nn.functional.normalize(out.text_embeds.float(), dim=-1)
        images = torch.nn.functional.normalize(out.image_embeds.float(), dim=-1)
        return float((images @ text.T).mean())
