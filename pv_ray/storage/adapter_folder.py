"""What an identity's adapter folder holds, and how to read what adapter.json recorded.

An adapter folder (written by the tuner, kept by the adapter store) holds:

- `pytorch_lora_weights.safetensors`: the LoRA weights in the diffusers format;
- `adapter.json`: the identity, the config it was tuned with, its photos' verdicts, metrics
  before and after tuning, versions and hashes, and the reference embeddings (biometric data:
  the adapter store is their only home; the copy uploaded to MLflow goes without them, and
  without anything else estimated from the face or named after a photo: see `for_tracking`).
"""

from __future__ import annotations

from typing import Any

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
METADATA_NAME = "adapter.json"
ADAPTER_FILES = (WEIGHTS_NAME, METADATA_NAME)
# adapter.json's face descriptors of the reference photos: the ArcFace embedding the tuning
# used, and the independent judge's descriptor.
BIOMETRIC_FIELDS = ("reference_embedding", "independent_reference")
# What else adapter.json holds of the person that tracking must not: the photos' names and
# detection scores, the class word (it may be inferred from the face: a sex estimate) and the
# evaluation prompts written with it.
PERSONAL_FIELDS = ("photos", "class_word", "class_word_source", "eval_prompts")


def for_tracking(metadata: dict[str, Any]) -> dict[str, Any]:
    """adapter.json as it may leave the store (to MLflow): without the face descriptors (nor the
    hash of one, which would confirm a guessed embedding), the photos' names, nor the class word
    (nor the prompts written with it)."""
    kept = {key: value for key, value in metadata.items() if key not in BIOMETRIC_FIELDS + PERSONAL_FIELDS}
    if isinstance(kept.get("sha256"), dict):
        kept["sha256"] = {name: digest for name, digest in kept["sha256"].items() if name not in BIOMETRIC_FIELDS}
    if isinstance(kept.get("final_step"), dict):
        # The last step's metrics, less its training prompt: written with the class word.
        kept["final_step"] = {key: value for key, value in kept["final_step"].items() if key != "prompt"}
    return kept


def recorded_config(metadata: dict[str, Any]) -> dict[str, Any] | None:
    """The whole config the adapter was tuned with (None when adapter.json records none)."""
    config = metadata.get("config")
    return config if isinstance(config, dict) else None


def recorded_adapter_config(metadata: dict[str, Any]) -> dict[str, Any]:
    """The `adapter` section of the config recorded in adapter.json ({} when absent or malformed)."""
    config = metadata.get("config")
    section = config.get("adapter") if isinstance(config, dict) else None
    return section if isinstance(section, dict) else {}


def backbone_mismatch(metadata: dict[str, Any], backbone: dict[str, str]) -> str | None:
    """Why an adapter (its adapter.json) must not run on `backbone` (a `backbone_record`): it was
    tuned on other weights. None when it may, or when it records no backbone (tuned before the record)."""
    recorded = metadata.get("backbone")
    if not isinstance(recorded, dict) or recorded.get("fingerprint") in (None, backbone.get("fingerprint")):
        return None

    def named(record: dict[str, Any]) -> str:
        return f"{record.get('name')!r} ({record.get('family')}, weights {str(record.get('fingerprint'))[:12]})"

    return f"it was tuned on backbone {named(recorded)}, not on this config's {named(backbone)}"


def recorded_active_fraction(metadata: dict[str, Any], default: float) -> float:
    """The isolation window the identity was tuned with (`default` when not recorded).

    Raises ValueError for a recorded value outside (0, 1]."""
    fraction = recorded_adapter_config(metadata).get("active_fraction", default)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ValueError(f"adapter.json adapter.active_fraction {fraction!r} is not in (0, 1]")
    return float(fraction)
