"""Frame scorers R for the semantic consistency loss: `R(frames, prompt) -> (M,)` scores,
differentiable with respect to the frames (train.scr_scorer).

- `image-stats` (the offline default): an image-statistics proxy (`ImageStatsScorer`).
- `clip`: CLIP's image-text agreement, from a local transformers CLIP folder (`train.scr_model`).
- `hpsv2`: the paper's choice, HPSv2 (a CLIP ViT-H-14 fine-tuned on human preferences), read from
  its open_clip checkpoint (safetensors, or a torch file read with `weights_only=True`, never
  unpickled) into a transformers `CLIPModel`; its tokenizer is a local CLIP tokenizer folder
  (`train.scr_tokenizer`).

CLIP-family scores are `logit_scale * cos(image, text)`: CLIP's logits, whose softmax over the M
frames is what the loss compares between the adapted and the base model.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F

from pv_ray.errors import InputError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ScorerError(InputError):
    """A scorer model folder or checkpoint that cannot be used."""


class FrameScorer(Protocol):
    """Scores M frames (M, 3, H, W) in [-1, 1] for a prompt: (M,) higher is better,
    differentiable w.r.t. the frames. HPSv2 is the paper's choice."""

    def __call__(self, frames: torch.Tensor, prompt: str) -> torch.Tensor: ...


class ImageStatsScorer:
    """Offline default ``FrameScorer``: a differentiable image-quality proxy, not HPSv2.

    score = sharpness (mean gradient magnitude) + colourfulness (Hasler-Suesstrunk)
            - exposure penalty (distance of mean brightness from mid-grey).
    It ignores the prompt: it only keeps the adapted branch from drifting in overall image
    statistics relative to the base model. Plug a real preference model (HPSv2, PickScore,
    ImageReward) in through ``FrameScorer`` to follow the paper.
    """

    def __call__(self, frames: torch.Tensor, prompt: str) -> torch.Tensor:
        if frames.ndim != 4 or frames.shape[1] != 3:
            raise ValueError(f"expected frames (M, 3, H, W), got {tuple(frames.shape)}")
        x = (frames.float() + 1) / 2  # [0, 1]
        luma = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
        sharpness = (luma[:, 1:, :] - luma[:, :-1, :]).abs().mean(dim=(1, 2)) + (
            luma[:, :, 1:] - luma[:, :, :-1]
        ).abs().mean(dim=(1, 2))
        rg = x[:, 0] - x[:, 1]
        yb = 0.5 * (x[:, 0] + x[:, 1]) - x[:, 2]
        colourfulness = (rg.var(dim=(1, 2)) + yb.var(dim=(1, 2)) + 1e-6).sqrt() + 0.3 * (
            rg.mean(dim=(1, 2)) ** 2 + yb.mean(dim=(1, 2)) ** 2 + 1e-6
        ).sqrt()
        exposure = (luma.mean(dim=(1, 2)) - 0.5).abs()
        return sharpness + colourfulness - exposure


class ClipScorer:
    """`logit_scale * cos(image, text)` per frame, for a transformers `CLIPModel`."""

    def __init__(self, model, tokenizer, device: torch.device):
        self.model = model.eval().requires_grad_(False).to(device)
        self.tokenizer = tokenizer
        self.device = device
        self.size = model.config.vision_config.image_size
        self.mean = torch.tensor(CLIP_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(CLIP_STD, device=device).view(1, 3, 1, 1)
        self._texts: dict[str, torch.Tensor] = {}  # prompt -> unit text embedding

    @classmethod
    def from_folder(cls, folder: str | Path, device: torch.device) -> ClipScorer:
        from transformers import CLIPModel, CLIPTokenizer

        path = Path(folder).expanduser()
        if not (path / "config.json").is_file():
            raise ScorerError(f"train.scr_model {folder}: not a local transformers CLIP folder (no config.json)")
        model = CLIPModel.from_pretrained(path, local_files_only=True, use_safetensors=True)
        return cls(model, CLIPTokenizer.from_pretrained(path, local_files_only=True), device)

    def __call__(self, frames: torch.Tensor, prompt: str) -> torch.Tensor:
        x = F.interpolate((frames.float() + 1) / 2, size=(self.size, self.size), mode="bicubic", align_corners=False)
        pixels = (x.clamp(0, 1) - self.mean) / self.std
        vision = self.model.vision_model(pixel_values=pixels.to(self.model.dtype)).pooler_output
        images = F.normalize(self.model.visual_projection(vision).float(), dim=-1)
        return self.model.logit_scale.exp().float() * (images @ self._text(prompt))

    def _text(self, prompt: str) -> torch.Tensor:
        if prompt not in self._texts:
            ids = self.tokenizer([prompt], padding="max_length", truncation=True, return_tensors="pt").input_ids
            with torch.no_grad():
                pooled = self.model.text_model(input_ids=ids.to(self.device)).pooler_output
                self._texts[prompt] = F.normalize(self.model.text_projection(pooled).float(), dim=-1)[0]
        return self._texts[prompt]


def load_hpsv2(checkpoint: str | Path, tokenizer_folder: str | Path, device: torch.device) -> ClipScorer:
    """HPSv2 from its open_clip checkpoint (`HPS_v2_compressed.pt`, or a safetensors copy)."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    state = _read_checkpoint(Path(checkpoint).expanduser())
    path = Path(tokenizer_folder).expanduser()
    if not any((path / name).is_file() for name in ("vocab.json", "tokenizer.json")):
        raise ScorerError(f"train.scr_tokenizer {tokenizer_folder}: not a local CLIP tokenizer folder (no vocab.json)")
    tokenizer = CLIPTokenizer.from_pretrained(path, local_files_only=True)
    # The text tower pools at the end-of-text token: its id must be the tokenizer's.
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = CLIPConfig(
        text_config=_text_config(state) | ids,
        vision_config=_vision_config(state),
        projection_dim=state["text_projection"].shape[1],
    )
    model = CLIPModel(config)
    missing, unexpected = model.load_state_dict(open_clip_to_transformers(state), strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ScorerError(
            f"train.scr_model {checkpoint}: not an HPSv2 (open_clip ViT) checkpoint: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return ClipScorer(model, tokenizer, device)


def _read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ScorerError(f"train.scr_model {path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)  # tensors only: nothing is unpickled
        except Exception as e:  # a pickle with code in it, or not a torch file at all
            raise ScorerError(f"train.scr_model {path}: not a weights-only torch file ({e})") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or "visual.conv1.weight" not in state:
        raise ScorerError(f"train.scr_model {path}: not an open_clip checkpoint (no visual.conv1.weight)")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _heads(width: int) -> int:
    return 16 if width == 1280 else max(1, width // 64)  # ViT-H-14's vision tower: 80-wide heads


def _layers(state: dict[str, torch.Tensor], prefix: str) -> int:
    depth = len(prefix.rstrip(".").split("."))
    return len({k.split(".")[depth] for k in state if k.startswith(prefix)})


def _text_config(state: dict[str, torch.Tensor]) -> dict:
    vocab, width = state["token_embedding.weight"].shape
    return {
        "vocab_size": vocab, "hidden_size": width, "num_attention_heads": _heads(width),
        "intermediate_size": state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        "num_hidden_layers": _layers(state, "transformer.resblocks."),
        "max_position_embeddings": state["positional_embedding"].shape[0], "hidden_act": "gelu",
        "projection_dim": state["text_projection"].shape[1],
    }  # fmt: skip


def _vision_config(state: dict[str, torch.Tensor]) -> dict:
    width, _, patch, _ = state["visual.conv1.weight"].shape
    positions = state["visual.positional_embedding"].shape[0]
    return {
        "hidden_size": width, "num_attention_heads": _heads(width), "patch_size": patch,
        "image_size": patch * math.isqrt(positions - 1),
        "intermediate_size": state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        "num_hidden_layers": _layers(state, "visual.transformer.resblocks."), "hidden_act": "gelu",
        "projection_dim": state["visual.proj"].shape[1],
    }  # fmt: skip


def open_clip_to_transformers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An open_clip CLIP state dict in transformers' `CLIPModel` naming (q/k/v split apart)."""
    out = {
        "text_model.embeddings.token_embedding.weight": state["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": state["positional_embedding"],
        "text_model.final_layer_norm.weight": state["ln_final.weight"],
        "text_model.final_layer_norm.bias": state["ln_final.bias"],
        "text_projection.weight": state["text_projection"].T.contiguous(),
        "vision_model.embeddings.patch_embedding.weight": state["visual.conv1.weight"],
        "vision_model.embeddings.class_embedding": state["visual.class_embedding"],
        "vision_model.embeddings.position_embedding.weight": state["visual.positional_embedding"],
        "vision_model.pre_layrnorm.weight": state["visual.ln_pre.weight"],
        "vision_model.pre_layrnorm.bias": state["visual.ln_pre.bias"],
        "vision_model.post_layernorm.weight": state["visual.ln_post.weight"],
        "vision_model.post_layernorm.bias": state["visual.ln_post.bias"],
        "visual_projection.weight": state["visual.proj"].T.contiguous(),
        "logit_scale": state["logit_scale"].reshape(()),
    }
    for source, target in (
        ("transformer.resblocks.", "text_model.encoder.layers."),
        ("visual.transformer.resblocks.", "vision_model.encoder.layers."),
    ):
        for i in range(_layers(state, source)):
            block, layer = f"{source}{i}.", f"{target}{i}."
            for ours, theirs in (
                ("ln_1", "layer_norm1"),
                ("ln_2", "layer_norm2"),
                ("mlp.c_fc", "mlp.fc1"),
                ("mlp.c_proj", "mlp.fc2"),
                ("attn.out_proj", "self_attn.out_proj"),
            ):
                for kind in ("weight", "bias"):
                    out[f"{layer}{theirs}.{kind}"] = state[f"{block}{ours}.{kind}"]
            for kind in ("weight", "bias"):
                q, k, v = state[f"{block}attn.in_proj_{kind}"].chunk(3)
                (
                    out[f"{layer}self_attn.q_proj.{kind}"],
                    out[f"{layer}self_attn.k_proj.{kind}"],
                    out[f"{layer}self_attn.v_proj.{kind}"],
                ) = q, k, v
    return out


def make_scorer(train, device: torch.device) -> FrameScorer | None:
    """The scorer `train` (a `TrainConfig`) asks for; None when the loss is off."""
    if train.lambda_scr <= 0:
        return None
    if train.scr_scorer == "clip":
        return ClipScorer.from_folder(train.scr_model, device)
    if train.scr_scorer == "hpsv2":
        return load_hpsv2(train.scr_model, train.scr_tokenizer, device)
    return ImageStatsScorer()
