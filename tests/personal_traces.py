"""Finding what would betray an identity in a folder's files, byte for byte."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def traces_of(metadata: dict, identity_id: str) -> dict[str, bytes]:
    """What would betray the identity in any file: its id, its face descriptors as float32 bytes
    (a run of 4 values) and as JSON text (compared with whitespace removed)."""
    needles = {"id": identity_id.encode()}
    for field in ("reference_embedding", "independent_reference"):
        values = metadata[field]
        if values is None:
            continue
        needles[f"{field} float32"] = np.asarray(values[8:12], np.float32).tobytes()
        needles[f"{field} json"] = json.dumps(values[8:12], separators=(",", ":")).encode()
    return needles


def found_in(folder: Path, needles: dict[str, bytes]) -> list[str]:
    hits = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        compact = b"".join(data.split())
        hits += [f"{what} in {path}" for what, needle in needles.items() if needle in data or needle in compact]
    return hits
