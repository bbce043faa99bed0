"""An identity adapter in the kohya/A1111 LoRA key format, for ComfyUI and A1111.

The weights are the same tensors: `lora_unet_<module path with _>.lora_down/.lora_up.weight`
plus a per-module `.alpha`, so kohya's scale `alpha / rank` is the adapter's own. What those
tools do not know is the isolation window: the adapter was tuned to act only at timesteps
t < active_fraction * 1000, the last `active_fraction` of the denoising. The file records it in
its metadata (`pv_ray.active_fraction`); README ("Use an adapter in ComfyUI or A1111") says how
to apply it there with a scheduled LoRA strength.
"""

from __future__ import annotations

import json

import torch
from safetensors.torch import save

from pv_ray.storage.adapter_folder import LoraWeights


def kohya_lora_bytes(weights: bytes, active_fraction: float, source: str = "<bytes>") -> bytes:
    """The kohya-format safetensors file of a diffusers adapter file's bytes."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

    lora = LoraWeights.from_bytes(weights, source)
    rank, alpha = lora.rank, lora.alpha
    unet = {k.removeprefix("unet."): v for k, v in lora.tensors.items() if k.startswith("unet.")}
    peft = {f"unet.{k}": v for k, v in convert_unet_state_dict_to_peft(unet).items()}
    kohya = convert_state_dict_to_kohya(peft)
    for key in [k for k in kohya if k.endswith(".alpha")]:
        kohya[key] = torch.tensor(float(alpha))  # diffusers writes alpha = rank; this adapter's own
    kohya = {k: v.contiguous() for k, v in kohya.items()}
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "ss_base_model_version": "sd_v1",
        "pv_ray.active_fraction": json.dumps(active_fraction),
        "pv_ray.window": f"strength 0 before {1 - active_fraction:.0%} of the denoising, 1 after",
    }
    return save(kohya, metadata=metadata)
