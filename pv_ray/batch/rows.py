"""Analysed identity rows: what ingest makes of one identity folder, and how the tuner reads it back.

`IdentityAnalyzer` reads one identity folder and computes its reference: decode and validate every
photo, detect, align, embed, mean. Each identity becomes one row (plain columns, so Ray Data can
carry it): usable (`ok`) with its reference embedding, rejected with the reasons (bad input), or
failed (its storage kept failing, or its analysis raised something unexpected: nothing is known to
be wrong with the identity, the next run retries it). `row_outcome` says which, with every rejected
photo; nothing is dropped silently. The analyzer never raises, whatever one identity's photos or
meta.json hold. Ray-free: `pv_ray.cluster.ingest` maps it over a Ray Data pipeline.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from pv_ray.config import config_from_dict
from pv_ray.errors import InputError
from pv_ray.evaluation.judge import IndependentJudge, judge_available, judged_reference
from pv_ray.faces.analysis import PhotoResult, Reference
from pv_ray.prompts import IdentityMeta
from pv_ray.storage.identity_folders import read_identity_folder
from pv_ray.storage.root import StorageUnavailable

logger = logging.getLogger(__name__)


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
        from pv_ray.backbones import model_paths
        from pv_ray.faces.analysis import FaceAnalyzer

        self.cfg = config_from_dict(config)
        self.storage_options = storage_options
        self.analyzer = FaceAnalyzer.from_config(model_paths(self.cfg.model).faces, self.cfg.faces)
        self.judge = IndependentJudge() if judge_available() else None

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        """The analysed row of one identity. Never raises: whatever goes wrong with this identity
        (any exception type) becomes its own `failed` or `rejected` row, so one identity can
        never fail the Ray Data map, and with it the others."""
        identity_id = row["identity_id"]
        skipped: list[dict[str, Any]] = []
        try:
            analysed = self._analyze(identity_id, row["uri"], skipped)
        except StorageUnavailable as e:  # not the identity's fault: failed, retried by the next run
            analysed = failed_row(identity_id, f"storage error (retried by the next run): {e}")
        except InputError as e:  # no usable photo, malformed meta.json, an unreadable folder
            analysed = _empty_row(identity_id) | {"photos": json.dumps(skipped), "reason": str(e)}
        except OSError as e:  # the folder cannot be read (permissions, gone while being read)
            analysed = _empty_row(identity_id) | {"reason": f"unreadable identity folder: {describe(e)}"}
        except Exception as e:  # a bug or a library's failure: this identity alone fails, with the reason
            logger.exception("analysing identity %s failed", identity_id)
            analysed = failed_row(identity_id, f"analysis failed ({describe(e)})")
        return analysed | {"reason": utf8_safe(analysed["reason"])}

    def _analyze(self, identity_id: str, uri: str, skipped: list[dict[str, Any]]) -> dict[str, Any]:
        faces = self.cfg.faces
        folder = read_identity_folder(
            identity_id,
            uri,
            max_photo_bytes=faces.max_photo_bytes,
            max_photos=faces.max_photos_per_identity,
            max_total_bytes=faces.max_identity_bytes,
            storage_options=self.storage_options,
        )
        skipped += [{"name": n, "ok": False, "reason": r, "det_score": None} for n, r in folder.skipped]
        meta = IdentityMeta() if folder.meta is None else IdentityMeta.parse(folder.meta, f"{identity_id}/meta.json")
        if not folder.photos:
            reasons = "; ".join(f"{s['name']}: {s['reason']}" for s in skipped) or "empty folder"
            return _empty_row(identity_id) | {"photos": json.dumps(skipped), "reason": f"no photos ({reasons})"}
        reference = judged_reference(self.analyzer, self.judge, folder.photos, faces.max_pixels)
        return _empty_row(identity_id) | {
            "ok": True,
            "embedding": [float(x) for x in reference.embedding],
            "class_word": meta.class_word or reference.class_word,
            "photos": json.dumps(skipped + [p.to_dict() for p in reference.photos]),
            "meta": json.dumps({"class": meta.class_word, "prompts": meta.prompts}),
            "independent": [] if reference.independent is None else [float(x) for x in reference.independent],
        }


def _empty_row(identity_id: str) -> dict[str, Any]:
    """An identity's row before analysis: not usable, no reason yet (every row has every column)."""
    return {
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


def failed_row(identity_id: str, reason: str) -> dict[str, Any]:
    """The row of an identity whose analysis failed for a reason that is not its input's."""
    return _empty_row(identity_id) | {"failed": True, "reason": reason}


def utf8_safe(text: str) -> str:
    """`text` as valid UTF-8: names read from storage may hold lone surrogates (undecodable
    bytes), which Arrow refuses; they are kept as visible escapes, so the row always converts."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def describe(error: BaseException) -> str:
    """An exception as `Type: first line of its message`."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


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
