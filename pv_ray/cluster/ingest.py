"""Ingest: identity folders → analysed references, with every rejection recorded.

The driver lists `root/<identity_id>/` with fsspec (names that are not valid identity ids are
rejected there and never used as paths). A lazy Ray Data pipeline then reads and analyses each
identity in a pool of tasks (retried if a worker dies; each worker process loads its insightface
`FaceAnalysis` once and keeps it for the next identities): decode and validate every photo,
detect, align, embed, mean. It streams into the tuning workers: tuning starts with the first
analysed identity, not after the last. Each identity becomes one row: usable (`ok`) with its
reference embedding, rejected with the reasons (bad input), or failed (its storage kept
failing: nothing is wrong with the identity, the next run retries it). `row_outcome` says which,
with every rejected photo; nothing is dropped silently.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from pv_ray.config import PVConfig, config_from_dict
from pv_ray.errors import InputError
from pv_ray.evaluation.judge import IndependentJudge, judge_available, judged_reference
from pv_ray.faces.analysis import PhotoResult, Reference
from pv_ray.method.prompts import IdentityMeta
from pv_ray.storage.identity_folders import read_identity_folder
from pv_ray.storage.root import StorageUnavailable


@dataclass
class Rejection:
    """One rejected identity or photo, as it goes into rejects.json."""

    identity_id: str
    reason: str
    photo: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"identity_id": self.identity_id, "photo": self.photo, "reason": self.reason}


class IdentityAnalyzer:
    """Reads one identity folder and computes its reference (the face models load once)."""

    def __init__(self, config: dict, storage_options: dict | None):
        from pv_ray.faces.analysis import FaceAnalyzer
        from pv_ray.model.backbone import resolve_model_paths

        self.cfg = config_from_dict(config)
        self.storage_options = storage_options
        self.analyzer = FaceAnalyzer.from_config(resolve_model_paths(self.cfg.model).faces, self.cfg.faces)
        self.judge = IndependentJudge() if judge_available() else None

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        identity_id = row["identity_id"]
        out = {
            "independent": [],
            "identity_id": identity_id,
            "ok": False,
            "failed": False,
            "reason": "",
            "embedding": [],
            "class_word": "person",
            "photos": "[]",
            "meta": "",
        }
        skipped: list[dict[str, Any]] = []
        try:
            folder = read_identity_folder(
                identity_id,
                row["uri"],
                max_photo_bytes=self.cfg.faces.max_photo_bytes,
                storage_options=self.storage_options,
            )
            skipped = [{"name": n, "ok": False, "reason": r, "det_score": None} for n, r in folder.skipped]
            meta = (
                IdentityMeta.parse(folder.meta, f"{identity_id}/meta.json")
                if folder.meta is not None
                else IdentityMeta()
            )
            if not folder.photos:
                reasons = "; ".join(f"{s['name']}: {s['reason']}" for s in skipped) or "empty folder"
                return out | {"photos": json.dumps(skipped), "reason": f"no photos ({reasons})"}
            reference = judged_reference(self.analyzer, self.judge, folder.photos, self.cfg.faces.max_pixels)
        except StorageUnavailable as e:  # not the identity's fault: failed, retried by the next run
            return out | {"failed": True, "reason": f"storage error (retried by the next run): {e}"}
        except InputError as e:  # no usable photo, malformed meta.json
            return out | {"photos": json.dumps(skipped), "reason": str(e)}
        except OSError as e:  # the folder vanished or cannot be read (permissions)
            return out | {"reason": f"unreadable identity folder: {e}"}
        return out | {
            "ok": True,
            "embedding": [float(x) for x in reference.embedding],
            "class_word": meta.class_word or reference.class_word,
            "photos": json.dumps(skipped + [p.to_dict() for p in reference.photos]),
            "meta": json.dumps({"class": meta.class_word, "prompts": meta.prompts}),
            "independent": [] if reference.independent is None else [float(x) for x in reference.independent],
        }


def reference_from_row(row: dict[str, Any]) -> tuple[Reference, IdentityMeta]:
    """Rebuild an analysed row's reference (for the tuner) and its metadata."""
    photos = [
        PhotoResult(name=p["name"], ok=p["ok"], reason=p["reason"], det_score=p["det_score"])
        for p in json.loads(row["photos"])
    ]
    meta = json.loads(row["meta"]) if row["meta"] else {}
    independent = np.asarray(row["independent"], np.float32) if len(row["independent"]) else None
    reference = Reference(
        embedding=np.asarray(row["embedding"], np.float32), photos=photos, class_word=row["class_word"],
        independent=independent,
    )  # fmt: skip
    return reference, IdentityMeta(class_word=meta.get("class"), prompts=meta.get("prompts") or [])


_ANALYZERS: dict[str, IdentityAnalyzer] = {}  # per worker process, keyed by its settings


def analyze_row(row: dict[str, Any], *, config: dict, storage_options: dict | None) -> dict[str, Any]:
    """Ray Data map function: the row of one identity folder, analysed by this process's analyzer."""
    key = json.dumps([config, storage_options], sort_keys=True, default=str)
    if key not in _ANALYZERS:
        _ANALYZERS.clear()  # one batch's settings at a time
        _ANALYZERS[key] = IdentityAnalyzer(config, storage_options)
    return _ANALYZERS[key](row)


def analysis_dataset(
    cfg: PVConfig,
    folders: list[tuple[str, str]],
    *,
    storage_options: dict | None = None,
    concurrency: int = 2,
    num_cpus: float = 1,
):
    """The lazy Ray Data pipeline that reads and analyses `folders` ((identity id, uri) pairs),
    `concurrency` tasks at a time, each holding `num_cpus`; nothing runs until it is iterated."""
    import ray
    import ray.data

    # Ray Data sets up its own logger on import and prints each operator's progress: the CLI has its own.
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    ds = ray.data.from_items([{"identity_id": i, "uri": u} for i, u in folders], override_num_blocks=len(folders))
    return ds.map(
        analyze_row,
        fn_kwargs={"config": cfg.model_dump(mode="json"), "storage_options": storage_options},
        compute=ray.data.TaskPoolStrategy(size=max(1, min(concurrency, len(folders)))),
        num_cpus=num_cpus,
    )


@dataclass
class Outcome:
    """What ingest made of one identity: `status` None (usable) or why it cannot be tuned
    ("rejected": bad input; "failed": storage, retried by the next run), and every rejection."""

    status: str | None
    reason: str
    rejects: list[Rejection]


def row_outcome(row: dict[str, Any]) -> Outcome:
    """The outcome of an analysed row (from `analysis_dataset`)."""
    identity_id = row["identity_id"]
    if row["ok"]:
        photos = json.loads(row["photos"])
        return Outcome(None, "", [Rejection(identity_id, p["reason"], p["name"]) for p in photos if not p["ok"]])
    if row["failed"]:
        return Outcome("failed", row["reason"], [])
    return Outcome("rejected", row["reason"], [Rejection(identity_id, row["reason"])])
