"""Style LoRAs: standard SD1.5 LoRA files applied with an identity adapter, no retuning.

A style LoRA (diffusers or kohya/A1111 key format, safetensors only) is injected into the UNet
(and, for its text-encoder part, the text encoder) as one more peft adapter and stays resident.
Each generation selects which styles are on and at what scale; the identity adapter keeps its
isolation window while the styles act at every step. Identity swaps stay in-place copies into
the identity adapter: loading a style never re-injects it.
"""

from __future__ import annotations

import re
from pathlib import Path

from safetensors.torch import load_file

from pv_ray.errors import InputError
from pv_ray.model.adapter import IdentityAdapter, route_lora_layer
from pv_ray.model.animatediff.backbone import AnimateDiffBackbone

STYLE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


class StyleError(InputError):
    """A style LoRA file or selection that cannot be used."""


def parse_style_option(text: str) -> tuple[Path, float]:
    """`FILE[:SCALE]` (the CLI's --style-lora) -> (path, scale); the scale defaults to 1."""
    path, sep, scale = text.rpartition(":")
    if not sep or not re.fullmatch(r"-?\d+(\.\d+)?", scale):
        return Path(text), 1.0
    return Path(path), float(scale)


class StyleLoras:
    """The style LoRAs resident in one backbone, by name, and which are on."""

    def __init__(self, backbone: AnimateDiffBackbone, adapter: IdentityAdapter):
        self.backbone, self.adapter = backbone, adapter
        self.loaded: dict[str, str] = {}  # style name -> peft adapter name

    def load(self, name: str, path: str | Path) -> None:
        """Inject the LoRA at `path` (a .safetensors file) as style `name`."""
        from diffusers import AnimateDiffPipeline

        if not STYLE_NAME.fullmatch(name):
            raise StyleError(f"style name {name!r}: letters, digits, _ and - only (max 64)")
        path = Path(path).expanduser()
        if path.suffix != ".safetensors" or not path.is_file():
            raise StyleError(f"style LoRA {path}: need a .safetensors file (LoRA weights are never unpickled)")
        try:
            state_dict, alphas = AnimateDiffPipeline.lora_state_dict(load_file(str(path)))
        except Exception as e:  # safetensors and diffusers raise several types for a bad file
            raise StyleError(f"style LoRA {path}: not a readable LoRA file ({e})") from None
        adapter_name = f"style_{name}"
        unet_part = {k: v for k, v in state_dict.items() if k.startswith("unet.")}
        text_part = {k: v for k, v in state_dict.items() if k.startswith("text_encoder.")}
        if not unet_part and not text_part:
            raise StyleError(f"style LoRA {path}: no UNet or text-encoder LoRA weights in it")
        if unet_part:
            AnimateDiffPipeline.load_lora_into_unet(unet_part, alphas, self.backbone.unet, adapter_name=adapter_name)
        if text_part:
            AnimateDiffPipeline.load_lora_into_text_encoder(
                text_part, alphas, self.backbone.text_encoder, prefix="text_encoder", adapter_name=adapter_name
            )
        self.loaded[name] = adapter_name
        self.adapter.refresh_layers()
        self.use({})

    def use(self, selection: dict[str, float]) -> None:
        """Turn on exactly the styles of `selection` (name -> scale) for the next generations."""
        unknown = sorted(set(selection) - set(self.loaded))
        if unknown:
            raise StyleError(
                f"unknown style(s) {', '.join(unknown)} (loaded: {', '.join(sorted(self.loaded)) or 'none'})"
            )
        active = {self.loaded[name]: float(scale) for name, scale in selection.items()}
        # A backbone of another family (Wan) has no style LoRAs and no text encoder here: nothing to switch.
        text_encoder = getattr(self.backbone, "text_encoder", None)
        text_layers = _lora_layers(text_encoder) if text_encoder is not None else []
        for layer in _lora_layers(self.backbone.denoiser) + text_layers:
            for adapter_name, scale in active.items():
                if adapter_name in layer.lora_A:
                    layer.set_scale(adapter_name, scale)
        self.adapter.active_styles = active
        for layer in text_layers:  # no window there: on for the whole prompt
            route_lora_layer(layer, [n for n in active if n in layer.lora_A])


def _lora_layers(module):
    from peft.tuners.lora import LoraLayer

    return [m for m in module.modules() if isinstance(m, LoraLayer)]
