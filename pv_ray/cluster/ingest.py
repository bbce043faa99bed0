"""Ingest: identity folders → analysed references, with every rejection recorded.

The driver lists `root/<identity_id>/` with fsspec (names that are not valid identity ids are
rejected there and never used as paths). Ray Data then reads and analyses each identity in an
actor pool (one insightface `FaceAnalysis` per actor, loaded once): decode and validate every
photo, detect, align, embed, mean. Each identity becomes one row: usable (`ok`) with its
reference embedding, or rejected with the reasons. Nothing is dropped silently.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from pv_ray.config import PVConfig, config_from_dict
from pv_ray.faces.analysis import IdentityRejected, PhotoResult, Reference
from pv_ray.storage.identity import list_identity_folders, read_identity_folder
from pv_ray.method.tuner import IdentityMeta


@dataclass
class Rejection:
    """One rejected identity or photo, as it goes into rejects.json."""

    identity_id: str
    reason: str
    photo: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"identity_id": self.identity_id, "photo": self.photo, "reason": self.reason}


class IdentityAnalyzer:
    """Ray Data callable class: reads one identity folder and computes its reference."""

    def __init__(self, config: dict, storage_options: dict | None):
        from pv_ray.model.backbone import resolve_model_paths
        from pv_ray.faces.analysis import FaceAnalyzer

        self.cfg = config_from_dict(config)
        self.storage_options = storage_options
        self.analyzer = FaceAnalyzer.from_config(resolve_model_paths(self.cfg.model).faces, self.cfg.faces)

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        identity_id = row["identity_id"]
        out = {"identity_id": identity_id, "ok": False, "reason": "", "embedding": [], "class_word": "person", "photos": "[]", "meta": ""}
        try:
            folder = read_identity_folder(identity_id, row["uri"], max_photo_bytes=self.cfg.faces.max_photo_bytes, storage_options=self.storage_options)
            skipped = [{"name": n, "ok": False, "reason": r, "det_score": None} for n, r in folder.skipped]
            meta = IdentityMeta.parse(folder.meta, f"{identity_id}/meta.json") if folder.meta is not None else IdentityMeta()
            if not folder.photos:
                out["photos"] = json.dumps(skipped)
                out["reason"] = "no photos (" + ("; ".join(f"{s['name']}: {s['reason']}" for s in skipped) or "empty folder") + ")"
                return out
            reference = self.analyzer.reference(folder.photos)
        except IdentityRejected as e:
            out["reason"] = str(e)
            out["photos"] = json.dumps(skipped)
            return out
        except (ValueError, OSError) as e:  # unreadable folder, malformed meta.json
            out["reason"] = str(e)
            return out
        out.update(
            ok=True,
            embedding=[float(x) for x in reference.embedding],
            class_word=meta.class_word or reference.class_word,
            photos=json.dumps(skipped + [photo_to_dict(p) for p in reference.photos]),
            meta=json.dumps({"class": meta.class_word, "prompts": meta.prompts}),
        )
        return out


def photo_to_dict(photo: PhotoResult) -> dict[str, Any]:
    return {"name": photo.name, "ok": photo.ok, "reason": photo.reason, "det_score": None if photo.det_score is None else float(photo.det_score)}


def reference_from_row(row: dict[str, Any]) -> tuple[Reference, IdentityMeta]:
    """Rebuild an analysed row's reference (for the tuner) and its metadata."""
    photos = [PhotoResult(name=p["name"], ok=p["ok"], reason=p["reason"], det_score=p["det_score"]) for p in json.loads(row["photos"])]
    meta = json.loads(row["meta"]) if row["meta"] else {}
    reference = Reference(embedding=np.asarray(row["embedding"], np.float32), photos=photos, class_word=row["class_word"])
    return reference, IdentityMeta(class_word=meta.get("class"), prompts=meta.get("prompts") or [])


def analyze_identities(
    cfg: PVConfig, input_uri: str, *, storage_options: dict | None = None, max_actors: int = 2
) -> tuple[list[dict[str, Any]], list[Rejection]]:
    """List, read and analyse every identity under `input_uri` on Ray Data.

    Returns (usable rows, rejections): rejections hold invalid folder names, identities with no
    usable photo (with every photo's reason), and the rejected photos of usable identities."""
    import ray

    folders, invalid = list_identity_folders(input_uri, storage_options)
    rejects = [Rejection(name, reason) for name, reason in invalid]
    rows: list[dict[str, Any]] = []
    if folders:
        ds = ray.data.from_items([{"identity_id": i, "uri": u} for i, u in folders], override_num_blocks=len(folders))
        ds = ds.map(
            IdentityAnalyzer,
            fn_constructor_kwargs={"config": cfg.model_dump(mode="json"), "storage_options": storage_options},
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, min(max_actors, len(folders)))),
        )
        rows = sorted(ds.take_all(), key=lambda r: r["identity_id"])
    usable = []
    for row in rows:
        photos = json.loads(row["photos"])
        if row["ok"]:
            usable.append(row)
            rejects += [Rejection(row["identity_id"], p["reason"], p["name"]) for p in photos if not p["ok"]]
        else:
            rejects.append(Rejection(row["identity_id"], row["reason"]))
    return usable, rejects
