"""The backbone a config names: its family, its folders (the configured ones, or a tiny preset's,
built on demand), loaded, and the record adapters tuned on it keep.

It sits above both the model layer (whose families load folders they are given) and the presets
(which build folders), so neither imports the other. Each family adds its loader here.
"""

from __future__ import annotations

from pathlib import Path

from pv_ray.config import ModelConfig
from pv_ray.model.animatediff.backbone import AnimateDiffBackbone, ModelPaths, backbone_record, checked_model_paths
from pv_ray.model.prompt_embeddings import PromptEmbeddings
from pv_ray.model.protocol import VideoBackbone
from pv_ray.model.wan.backbone import WanBackbone, WanPaths, checked_wan_paths, encode_prompt_embeddings, wan_record

BackbonePaths = ModelPaths | WanPaths


def _preset_folder(cfg: ModelConfig) -> Path:
    if cfg.preset == "tiny-prior":
        from pv_ray.presets.tiny import ensure_tiny_prior_models

        return ensure_tiny_prior_models()
    if cfg.preset in ("tiny-wan", "tiny-wan2.2"):
        from pv_ray.presets.tiny_wan import ensure_tiny_wan_models

        return ensure_tiny_wan_models(seed=cfg.seed, version="2.2" if cfg.preset == "tiny-wan2.2" else "2.1")
    from pv_ray.presets.tiny import ensure_tiny_models

    return ensure_tiny_models(seed=cfg.seed)


def model_paths(cfg: ModelConfig) -> BackbonePaths:
    """The config's model folders, checked: `model.base` and its companions, or the preset's."""
    base = Path(cfg.base).expanduser() if cfg.base is not None else _preset_folder(cfg)
    return checked_wan_paths(cfg, base) if cfg.family == "wan" else checked_model_paths(cfg, base)


def backbone_name(cfg: ModelConfig, paths: BackbonePaths) -> str:
    """The name a person recognises: the preset's, or the folders'."""
    if cfg.base is None:
        return str(cfg.preset)
    if isinstance(paths, WanPaths):
        return paths.base.name
    return f"{paths.base.name} + {paths.motion_adapter.name}"


def configured_backbone_record(cfg: ModelConfig, paths: BackbonePaths | None = None) -> dict[str, str]:
    """The record (family, weights fingerprint, name) of the backbone the config names, without loading it."""
    paths = paths or model_paths(cfg)
    name = backbone_name(cfg, paths)
    return wan_record(paths, name) if isinstance(paths, WanPaths) else backbone_record(paths, name)


def load_backbone(cfg: ModelConfig, prompt_embeddings: PromptEmbeddings | None = None) -> VideoBackbone:
    """The backbone the config names, loaded and frozen; `prompt_embeddings` (`encode_job_prompts`)
    spare a Wan backbone its text encoder."""
    paths = model_paths(cfg)
    if isinstance(paths, WanPaths):
        return WanBackbone.from_pretrained(paths, cfg, backbone_name(cfg, paths), prompt_embeddings)
    return AnimateDiffBackbone.from_pretrained(paths, cfg, backbone_name(cfg, paths))


def encode_job_prompts(cfg: ModelConfig, prompts: list[str]) -> PromptEmbeddings | None:
    """`prompts` encoded once by the backbone's text encoder alone, for the families whose text
    encoder is worth keeping out of every worker (Wan's UMT5-XXL: 5.7 B parameters); None for the
    others (AnimateDiff's CLIP text encoder is 123 M)."""
    if cfg.family != "wan":
        return None
    return encode_prompt_embeddings(model_paths(cfg), cfg, prompts)
