"""The backbone a config names: its family, its folders (the configured ones, or a tiny preset's,
built on demand), loaded, and the record adapters tuned on it keep.

It sits above both the model layer (whose families load folders they are given) and the presets
(which build folders), so neither imports the other. A second family adds its loader here.
"""

from __future__ import annotations

from pathlib import Path

from pv_ray.config import ModelConfig
from pv_ray.model.animatediff.backbone import AnimateDiffBackbone, ModelPaths, backbone_record, checked_model_paths
from pv_ray.model.protocol import VideoBackbone


def model_paths(cfg: ModelConfig) -> ModelPaths:
    """The config's model folders, checked: `model.base` and its companions, or the preset's."""
    if cfg.base is not None:
        base = Path(cfg.base).expanduser()
    elif cfg.preset == "tiny-prior":
        from pv_ray.presets.tiny import ensure_tiny_prior_models

        base = ensure_tiny_prior_models()
    else:
        from pv_ray.presets.tiny import ensure_tiny_models

        base = ensure_tiny_models(seed=cfg.seed)
    return checked_model_paths(cfg, base)


def backbone_name(cfg: ModelConfig, paths: ModelPaths) -> str:
    """The name a person recognises: the preset's, or the folders'."""
    return str(cfg.preset if cfg.base is None else f"{paths.base.name} + {paths.motion_adapter.name}")


def configured_backbone_record(cfg: ModelConfig, paths: ModelPaths | None = None) -> dict[str, str]:
    """The record (family, weights fingerprint, name) of the backbone the config names, without loading it."""
    paths = paths or model_paths(cfg)
    return backbone_record(paths, backbone_name(cfg, paths))


def load_backbone(cfg: ModelConfig) -> VideoBackbone:
    """The backbone the config names, loaded and frozen."""
    paths = model_paths(cfg)
    return AnimateDiffBackbone.from_pretrained(paths, cfg, backbone_name(cfg, paths))
