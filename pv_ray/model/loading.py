"""What every backbone family's loader shares: devices, dtypes, the weights fingerprint and the
record an adapter keeps of the weights it was tuned on, the missing-folder error."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from pv_ray.errors import InputError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_SAMPLE_BYTES = 1 << 20


class ModelFolderError(InputError):
    """A configured model folder is missing or incomplete."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def weights_record(family: str, weights_folders: list[tuple[str, Path]], name: str) -> dict[str, str]:
    """What an adapter records of the backbone it was tuned on, and what is compared before it runs
    on another: the family, a fingerprint of the weights (`weights_fingerprint` of the folders),
    and `name`, one a person recognises."""
    return {"family": family, "fingerprint": weights_fingerprint(weights_folders), "name": name}


def weights_fingerprint(folders: list[tuple[str, Path]]) -> str:
    """sha256 over every weights file's place, size and first and last MiB in the (name, folder)
    pairs: different weights give a different fingerprint (a size or header differs, or the sampled
    bytes), and many GB are not read in full at every load."""
    files = [(f"{part}/{f.name}", f) for part, folder in folders for f in sorted(folder.glob("*.safetensors"))]
    digest = hashlib.sha256()
    for name, path in files:
        size = path.stat().st_size
        with path.open("rb") as file:
            head = file.read(_SAMPLE_BYTES)
            file.seek(max(0, size - _SAMPLE_BYTES))
            tail = file.read(_SAMPLE_BYTES)
        digest.update(f"{name}\0{size}\0".encode())
        digest.update(hashlib.sha256(head).digest() + hashlib.sha256(tail).digest())
    return digest.hexdigest()
