"""What an identity's adapter folder holds, and how to read what adapter.json recorded.

An adapter folder (written by the tuner, kept by the adapter store, uploaded to MLflow) holds:

- `pytorch_lora_weights.safetensors`: the LoRA weights in the diffusers format;
- `adapter.json`: the identity, the config it was tuned with, its photos' verdicts, metrics
  before and after tuning, versions and hashes, and the reference embedding (biometric data).
"""

from __future__ import annotations

from typing import Any

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
METADATA_NAME = "adapter.json"
ADAPTER_FILES = (WEIGHTS_NAME, METADATA_NAME)


def recorded_adapter_config(metadata: dict[str, Any]) -> dict[str, Any]:
    """The `adapter` section of the config recorded in adapter.json ({} when absent or malformed)."""
    config = metadata.get("config")
    section = config.get("adapter") if isinstance(config, dict) else None
    return section if isinstance(section, dict) else {}


def recorded_active_fraction(metadata: dict[str, Any], default: float) -> float:
    """The isolation window the identity was tuned with (`default` when not recorded).

    Raises ValueError for a recorded value outside (0, 1]."""
    fraction = recorded_adapter_config(metadata).get("active_fraction", default)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ValueError(f"adapter.json adapter.active_fraction {fraction!r} is not in (0, 1]")
    return float(fraction)
