"""An identity's adapter folder: its LoRA weights and adapter.json, written and read by one class.

An adapter folder (written by tuning, kept by the adapter store) holds:

- `pytorch_lora_weights.safetensors`: the LoRA weights in the diffusers LoRA format (`LoraWeights`):
  tensors `<component>.<module>.lora.down.weight` / `.lora.up.weight` and the peft config as
  metadata, so alpha survives; `AnimateDiffPipeline.load_lora_weights` loads it as it is;
- `adapter.json`: the identity, the config it was tuned with, its photos' verdicts, metrics
  before and after tuning, versions and hashes, and the reference embeddings (biometric data:
  the adapter store is their only home; the copy uploaded to MLflow goes without them, and
  without anything else estimated from the face or named after a photo: see `for_tracking`).

`AdapterFolder.write` and its readers are each other's inverse. The weights file is written with
a canonical header (sorted keys), so the same weights give the same bytes: the Rust writer of
safetensors orders the metadata of a file at random, and a content hash of the weights must not.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pv_ray.errors import InputError

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
METADATA_NAME = "adapter.json"
ADAPTER_FILES = (WEIGHTS_NAME, METADATA_NAME)
FORMAT = "diffusers-lora"
# adapter.json's face descriptors of the reference photos: the ArcFace embedding the tuning
# used, and the independent judge's descriptor.
BIOMETRIC_FIELDS = ("reference_embedding", "independent_reference")
# What else adapter.json holds of the person that tracking must not: the photos' names and
# detection scores, the class word (it may be inferred from the face: a sex estimate) and the
# evaluation prompts written with it.
PERSONAL_FIELDS = ("photos", "class_word", "class_word_source", "eval_prompts")
MAX_ALPHA_PER_RANK = 1e4  # alpha / rank scales every LoRA output: beyond this it is no adapter's
_PEFT_CONFIG_KEY = "lora_adapter_metadata"  # where diffusers keeps the peft config in the file


class AdapterFileError(InputError):
    """An adapter file that cannot be read, or loaded into this backbone."""


@dataclass(frozen=True)
class LoraWeights:
    """One adapter's LoRA weights as a diffusers LoRA file holds them.

    `tensors` maps `<component>.<module>.lora.down.weight` (rank x in) and `.lora.up.weight`
    (out x rank) to CPU tensors; `peft_config` is the peft `LoraConfig` the file records (r,
    lora_alpha, target_modules, ...), empty for a file without one."""

    tensors: dict[str, torch.Tensor]
    rank: int
    alpha: float
    component: str = "unet"  # the pipeline component the LoRA belongs to (diffusers' key prefix)
    peft_config: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def read(cls, path: str | Path) -> LoraWeights:
        """The weights of a file (or of a folder's `pytorch_lora_weights.safetensors`), checked. Never unpickles."""
        path = Path(path)
        if path.is_dir():
            path = path / WEIGHTS_NAME
        if not path.is_file():
            raise AdapterFileError(f"no adapter file at {path}")
        return cls.from_bytes(path.read_bytes(), str(path))

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "<bytes>") -> LoraWeights:
        """`read` for a file's bytes (e.g. from the adapter store); `source` names it in errors."""
        from safetensors.torch import load

        try:
            tensors = load(data)  # validates the whole header and every tensor's extent
            metadata = safetensors_header(data).get("__metadata__") or {}
        except Exception as e:  # safetensors raises several types for a damaged header
            raise AdapterFileError(f"{source}: not a readable safetensors file ({e})") from None
        return _checked(tensors, metadata, source)

    def to_bytes(self) -> bytes:
        """The file's bytes, as diffusers' `save_lora_weights` writes them but with a canonical header."""
        from safetensors.torch import save

        metadata = {"format": "pt"}
        if self.peft_config:
            packed = {f"{self.component}.{key}": value for key, value in self.peft_config.items()}
            metadata[_PEFT_CONFIG_KEY] = json.dumps(packed, indent=2, sort_keys=True)
        return _canonical_header(save({key: t.contiguous() for key, t in self.tensors.items()}, metadata))


class AdapterFolder:
    """One identity's adapter folder: `write` puts the weights and adapter.json there, the readers
    give them back."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.weights_path = self.path / WEIGHTS_NAME
        self.metadata_path = self.path / METADATA_NAME

    def write(self, weights: LoraWeights, metadata: dict[str, Any] | None = None) -> Path:
        """Write the weights and, when given, adapter.json (its format, weights file name and the
        weights' sha256 filled in here). Returns the weights file."""
        data = weights.to_bytes()
        self.path.mkdir(parents=True, exist_ok=True)
        self.weights_path.write_bytes(data)
        if metadata is not None:
            digests = {**(metadata.get("sha256") or {}), WEIGHTS_NAME: hashlib.sha256(data).hexdigest()}
            record = {**metadata, "format": FORMAT, "weights": WEIGHTS_NAME, "sha256": digests}
            self.metadata_path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        return self.weights_path

    def weights(self) -> LoraWeights:
        return LoraWeights.read(self.weights_path)

    def metadata(self) -> dict[str, Any] | None:
        """adapter.json (None when the folder has none or it is not a JSON object)."""
        try:
            metadata = json.loads(self.metadata_path.read_text())
        except (OSError, ValueError):
            return None
        return metadata if isinstance(metadata, dict) else None


def safetensors_header(data: bytes) -> dict[str, Any]:
    """A safetensors file's JSON header (tensor entries and `__metadata__`): the file starts with
    8 bytes of little-endian length, then the header."""
    return json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])


def _canonical_header(data: bytes) -> bytes:
    """A safetensors file with its JSON header's keys sorted (the tensors' bytes unchanged: their
    offsets count from the end of the header), padded to 8 bytes as safetensors pads it."""
    length = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8 : 8 + length]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + data[8 + length :]


def _checked(tensors: dict[str, torch.Tensor], metadata: dict[str, str], source: str) -> LoraWeights:
    """The weights of a diffusers LoRA file's tensors and metadata, range-checked: a rank that is
    not the tensors' (or not positive), an alpha that is not finite and positive (or absurdly
    large) or a weight that is not finite would make a garbage video or divide by zero."""
    downs = [(k, v) for k, v in tensors.items() if k.endswith(".lora.down.weight")]
    if not downs:
        raise AdapterFileError(f"{source}: no LoRA weights (keys '*.lora.down.weight') in the file")
    component = LoraWeights.component  # diffusers' default prefix; a file's peft config names its own
    tensor_rank = int(downs[0][1].shape[0])
    rank: int = tensor_rank
    alpha: float = rank  # diffusers' default when the file has no metadata
    peft_config: dict[str, Any] = {}
    if _PEFT_CONFIG_KEY in metadata:
        try:
            packed = json.loads(metadata[_PEFT_CONFIG_KEY])  # diffusers packs the peft config as "unet.<key>"
            component = next(iter(packed)).split(".", 1)[0]
            peft_config = {key.removeprefix(f"{component}."): value for key, value in packed.items()}
            rank, alpha = peft_config["r"], float(peft_config["lora_alpha"])
        except (ValueError, KeyError, TypeError, AttributeError, StopIteration) as e:
            raise AdapterFileError(f"{source}: malformed LoRA metadata ({e})") from None
    if isinstance(rank, bool) or not isinstance(rank, int) or rank != tensor_rank or rank <= 0:
        raise AdapterFileError(f"{source}: LoRA rank {rank!r} is not the weights' rank ({tensor_rank})")
    if not (math.isfinite(alpha) and 0 < alpha <= MAX_ALPHA_PER_RANK * rank):
        raise AdapterFileError(f"{source}: LoRA alpha {alpha!r} is not in (0, {MAX_ALPHA_PER_RANK:g} * rank]")
    for key, value in tensors.items():
        if key.endswith((".lora.down.weight", ".lora.up.weight")):
            axis = 0 if key.endswith(".down.weight") else -1
            if value.ndim != 2 or value.shape[axis] != tensor_rank:
                raise AdapterFileError(f"{source}: {key} has shape {tuple(value.shape)}, not rank {tensor_rank}")
            if not bool(torch.isfinite(value).all()):
                raise AdapterFileError(f"{source}: {key} holds values that are not finite")
    return LoraWeights(tensors, rank, alpha, component, peft_config)


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
