"""Where pv-ray keeps what identifies a person, and how to erase or export all of it.

Under a store root, an identity's personal data lives in (README "Data protection"):

- `adapters/<id>/`: the adapter weights (they render the person) and `adapter.json`, which holds
  the face descriptors of the reference photos (biometric data; their only home);
- `report.json`, `rejects.json`, `evaluation.json`: the batch's and evaluation's entries for it;
- `jobs/<job>/`: videos made by the service (`job.json` names the identity);
- `contact_sheet.png`: reference photos and clips (its PNG text lists the identities shown).

MLflow keeps the identity's runs (metrics, params, the weights and adapter.json without the face
descriptors); `Tracker.erase_identity` removes them. The input photos are the user's own and are
never written anywhere by pv-ray.
"""

from __future__ import annotations

import io
import json
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pv_ray.storage.adapter_store import AdapterNotFound, AdapterStore
from pv_ray.storage.identity import validate_identity_id

if TYPE_CHECKING:
    from pv_ray.storage.tracking import Tracker

JOBS_FOLDER = "jobs"
JOB_MANIFEST = "job.json"
CONTACT_SHEET_NAME = "contact_sheet.png"
CONTACT_SHEET_IDENTITIES = "pv_ray.identities"  # the PNG text key listing who the sheet shows
BATCH_DOCUMENTS = ("report.json", "rejects.json", "evaluation.json")
MAX_DOCUMENT_BYTES = 256 << 20


@dataclass
class Erasure:
    """What `erase_identity` removed, and what it could not (with why)."""

    identity_id: str
    removed: list[str] = field(default_factory=list)
    left: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.left


def erase_identity(store: AdapterStore, identity_id: str, tracker: Tracker | None = None) -> Erasure:
    """Remove `identity_id` from the store root (every place listed above) and, given a tracker,
    from MLflow. Each place is tried even when another fails; failures are listed in `left`."""
    validate_identity_id(identity_id)
    erasure = Erasure(identity_id)
    places: list[tuple[str, Callable[[], list[str]]]] = [
        ("adapter", lambda: _erase_adapter(store, identity_id)),
        ("batch documents", lambda: _erase_entries(store, identity_id)),
        ("job videos", lambda: _erase_job_videos(store, identity_id)),
        ("contact sheet", lambda: _erase_contact_sheet(store, identity_id)),
    ]
    for what, erase in places:
        try:
            erasure.removed += erase()
        except Exception as e:  # the other places must still be erased
            erasure.left.append(f"{what}: {type(e).__name__}: {e}")
    if tracker is not None:
        try:
            removed, left = tracker.erase_identity(identity_id)
            erasure.removed += removed
            erasure.left += left
        except Exception as e:
            erasure.left.append(f"MLflow ({tracker.tracking_uri}): {type(e).__name__}: {e}")
    return erasure


def _erase_adapter(store: AdapterStore, identity_id: str) -> list[str]:
    try:
        store.delete(identity_id)
    except AdapterNotFound:
        return []
    return [f"adapter {store.uri(identity_id)} (weights, adapter.json with the face descriptors)"]


def _erase_entries(store: AdapterStore, identity_id: str) -> list[str]:
    """The identity's entries in the batch report, the rejects and the evaluation report."""
    removed = []
    for name in BATCH_DOCUMENTS:
        try:
            document = store.root.read_json(name, MAX_DOCUMENT_BYTES)
        except FileNotFoundError:
            continue
        if _drop_entry(document, identity_id):
            store.root.write_json(name, document)
            removed.append(f"entries of {identity_id} in {store.root.uri_of(store.root.path(name))}")
    return removed


def _drop_entry(document: dict, identity_id: str) -> bool:
    """Remove the identity from one report in place (its counts follow); whether it was there."""
    identities = document.get("identities")
    if isinstance(identities, dict) and identity_id in identities:
        entry = identities.pop(identity_id)
        counts = document.get("counts")
        status = entry.get("status") if isinstance(entry, dict) else None
        if isinstance(counts, dict) and "total" in counts and status in counts:
            counts[status] -= 1
            counts["total"] -= 1
        return True
    rejects = document.get("rejects")
    if isinstance(rejects, list):
        kept = [r for r in rejects if not (isinstance(r, dict) and r.get("identity_id") == identity_id)]
        if len(kept) != len(rejects):
            document["rejects"] = kept
            return True
    return False


def _erase_job_videos(store: AdapterStore, identity_id: str) -> list[str]:
    removed = []
    for job_id, _ in _jobs_of(store, identity_id):
        store.root.delete(f"{JOBS_FOLDER}/{job_id}")
        removed.append(f"serving job {job_id} (its video)")
    return removed


def _erase_contact_sheet(store: AdapterStore, identity_id: str) -> list[str]:
    """The store root's contact sheet, when it shows the identity (or does not say whom it shows)."""
    from PIL import Image

    try:
        data = store.root.read_bytes(CONTACT_SHEET_NAME, MAX_DOCUMENT_BYTES)
    except FileNotFoundError:
        return []
    shown = Image.open(io.BytesIO(data)).text.get(CONTACT_SHEET_IDENTITIES)
    if shown is not None and identity_id not in json.loads(shown):
        return []
    store.root.delete(CONTACT_SHEET_NAME)
    return [f"{CONTACT_SHEET_NAME} (it showed {identity_id}; draw it again with `pv-ray personalize --contact-sheet`)"]


def export_identity(store: AdapterStore, identity_id: str, tracker: Tracker | None = None) -> bytes:
    """One identity's data as a zip (a subject access request): its adapter files, its entries in
    the store's reports, its serving videos, and its MLflow runs' params, metrics and tags.
    `AdapterNotFound` when pv-ray holds nothing of it."""
    validate_identity_id(identity_id)
    files: dict[str, bytes] = {}
    if store.exists(identity_id):
        with tempfile.TemporaryDirectory(prefix="pv-ray-export-") as folder:
            for path in sorted(store.fetch(identity_id, folder).iterdir()):
                files[f"adapter/{path.name}"] = path.read_bytes()
    for name in BATCH_DOCUMENTS:
        try:
            entries = _entries_of(store.root.read_json(name, MAX_DOCUMENT_BYTES), identity_id)
        except FileNotFoundError:
            continue
        if entries:
            files[f"reports/{name}"] = json.dumps(entries, indent=2, sort_keys=True).encode()
    for job_id, manifest in _jobs_of(store, identity_id):
        video = f"{JOBS_FOLDER}/{job_id}/{manifest['video']}"
        files[video] = store.root.read_bytes(video, MAX_DOCUMENT_BYTES)
    runs = tracker.identity_runs(identity_id) if tracker is not None else []
    if runs:
        files["mlflow_runs.json"] = json.dumps(runs, indent=2, sort_keys=True).encode()
    if not files:
        raise AdapterNotFound(f"pv-ray holds nothing of {identity_id!r} in {store.root_uri}")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _jobs_of(store: AdapterStore, identity_id: str) -> list[tuple[str, dict]]:
    """(job id, job.json) of the serving jobs that made videos of the identity."""
    jobs = []
    for job_id in store.root.children(JOBS_FOLDER):
        try:
            manifest = store.root.read_json(f"{JOBS_FOLDER}/{job_id}/{JOB_MANIFEST}")
        except FileNotFoundError:
            continue
        if manifest.get("identity") == identity_id:
            jobs.append((job_id, manifest))
    return jobs


def _entries_of(document: dict, identity_id: str) -> dict:
    identities = document.get("identities")
    if isinstance(identities, dict) and identity_id in identities:
        return {identity_id: identities[identity_id]}
    rejects = document.get("rejects")
    if isinstance(rejects, list):
        mine = [r for r in rejects if isinstance(r, dict) and r.get("identity_id") == identity_id]
        return {"rejects": mine} if mine else {}
    return {}
