"""Where pv-ray keeps what identifies a person, and how to erase or export all of it.

`PLACES` names every place under a store root that holds something of an identity, and
`BEYOND_THE_STORE` the places outside it. `pv-ray delete` erases each of them, `pv-ray
export-identity` exports each that holds the person's own data, and the README's table lists
them: a new place is added here, and the three follow. The input photos are the user's own and
are never written anywhere by pv-ray.

An erasure first leaves a tombstone (`pv_ray.storage.tombstones`: a keyed hash of the id, no
personal data), so a batch that runs meanwhile, or later over the same input, does not create
the person again. The batch documents (`report.json`, ...) are rewritten under the store's
document lock, which the batch and the evaluation take too (`write_store_document`), and they
drop the entries of identities erased while they ran.

MLflow: the store records the tracking stores its batches and evaluations logged to
(`tracking.json`: a sqlite file inside the store by its relative path, so a copied store names
its own copy; other URIs without their credentials). `tracking_uris_of` is where `delete` and
`export-identity` look, besides `--tracking-uri`.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from pv_ray.storage.adapter_store import AdapterNotFound, AdapterStore
from pv_ray.storage.identity import validate_identity_id
from pv_ray.storage.root import TMP_PREFIX, StorageUnavailable
from pv_ray.storage.tombstones import TOMBSTONES_DIR, is_refusal

if TYPE_CHECKING:
    from pv_ray.storage.tracking import Tracker

JOBS_FOLDER = "jobs"
JOB_MANIFEST = "job.json"
CONTACT_SHEET_NAME = "contact_sheet.png"
CONTACT_SHEET_IDENTITIES = "pv_ray.identities"  # the PNG text key listing who the sheet shows
BATCH_DOCUMENTS = ("report.json", "rejects.json", "evaluation.json")
TRACKING_RECORD = "tracking.json"
DOCUMENTS_LOCK = "documents"
MAX_DOCUMENT_BYTES = 256 << 20
SQLITE_PREFIX = "sqlite:///"


@dataclass(frozen=True)
class Place:
    """A place that holds something of an identity: how to erase it and, for the person's own
    data, how to export it."""

    name: str
    where: str
    holds: str
    how: str  # what `delete` does there
    erase: Callable[[AdapterStore, str], list[str]]
    export: Callable[[AdapterStore, str], dict[str, bytes]] | None = None


@dataclass(frozen=True)
class Beyond:
    """A place outside the store root (what `delete` does there is in `how`)."""

    name: str
    where: str
    holds: str
    how: str


@dataclass
class Erasure:
    """What `erase_identity` removed, and what it could not (with why)."""

    identity_id: str
    removed: list[str] = field(default_factory=list)
    left: list[str] = field(default_factory=list)
    erased_on: str | None = None  # the tombstone's date

    @property
    def complete(self) -> bool:
        return not self.left


@dataclass
class TrackingStore:
    """A tracking store named by the store (or by --tracking-uri): its tracker, or why not."""

    uri: str
    tracker: Tracker | None = None
    unreachable: str | None = None


# ------------------------------------------------------------------------- the store's places


def _erase_adapter(store: AdapterStore, identity_id: str) -> list[str]:
    try:
        store.delete(identity_id)
    except AdapterNotFound:
        return []
    return [f"adapter {store.uri(identity_id)} (weights, adapter.json with the face descriptors)"]


def _export_adapter(store: AdapterStore, identity_id: str) -> dict[str, bytes]:
    if not store.exists(identity_id):
        return {}
    with tempfile.TemporaryDirectory(prefix="pv-ray-export-") as folder:
        return {f"adapter/{p.name}": p.read_bytes() for p in sorted(store.fetch(identity_id, folder).iterdir())}


def _erase_staging(store: AdapterStore, identity_id: str) -> list[str]:
    return [f"staging folder {uri} (weights, face descriptors)" for uri in store.remove_staging(identity_id)]


def _export_staging(store: AdapterStore, identity_id: str) -> dict[str, bytes]:
    files = {}
    for uri in store.staging_folders(identity_id):
        folder = store.fs._strip_protocol(uri)
        for path in store.fs.find(folder):
            files[f"staging/{uri.rsplit('/', 1)[-1]}/{path[len(folder) + 1 :]}"] = store.fs.cat_file(path)
    return files


def _erase_entries(store: AdapterStore, identity_id: str) -> list[str]:
    """The identity's entries in the batch report, the rejects and the evaluation report (and
    what a crashed write of one left), under the document lock."""
    removed = []
    with store.root.lock(DOCUMENTS_LOCK):
        names = store.root.children()
        for name in BATCH_DOCUMENTS:
            for leftover in names:
                if leftover.startswith(f"{TMP_PREFIX}{name}-"):  # the lock is ours: no write is in flight
                    store.root.delete(leftover)
                    removed.append(f"{leftover} (a crashed write of {name})")
            try:
                document = store.root.read_json(name, MAX_DOCUMENT_BYTES)
            except FileNotFoundError:
                continue
            if _drop_entry(document, identity_id, keep_refusal=False):
                store.root.write_json(name, document)
                removed.append(f"entries of {identity_id} in {store.root.uri_of(store.root.path(name))}")
    return removed


def _export_entries(store: AdapterStore, identity_id: str) -> dict[str, bytes]:
    files = {}
    for name in BATCH_DOCUMENTS:
        try:
            entries = _entries_of(store.root.read_json(name, MAX_DOCUMENT_BYTES), identity_id)
        except FileNotFoundError:
            continue
        if entries:
            files[f"reports/{name}"] = json.dumps(entries, indent=2, sort_keys=True).encode()
    return files


def _erase_job_videos(store: AdapterStore, identity_id: str) -> list[str]:
    removed = []
    for job_id, _ in _jobs_of(store, identity_id):
        store.root.delete(f"{JOBS_FOLDER}/{job_id}")
        removed.append(f"serving job {job_id} (its video)")
    return removed


def _export_job_videos(store: AdapterStore, identity_id: str) -> dict[str, bytes]:
    files = {}
    for job_id, manifest in _jobs_of(store, identity_id):
        video = f"{JOBS_FOLDER}/{job_id}/{manifest['video']}"
        files[video] = store.root.read_bytes(video, MAX_DOCUMENT_BYTES)
    return files


def _erase_contact_sheet(store: AdapterStore, identity_id: str) -> list[str]:
    """The store root's contact sheet, when it shows the identity (or does not say whom it shows)."""
    from PIL import Image

    removed = []
    for leftover in store.root.children():
        if leftover.startswith(f"{TMP_PREFIX}{CONTACT_SHEET_NAME}-"):  # a crashed write: it may show anyone
            store.root.delete(leftover)
            removed.append(f"{leftover} (a crashed write of {CONTACT_SHEET_NAME})")
    try:
        data = store.root.read_bytes(CONTACT_SHEET_NAME, MAX_DOCUMENT_BYTES)
    except FileNotFoundError:
        return removed
    shown = Image.open(io.BytesIO(data), formats=["PNG"]).text.get(CONTACT_SHEET_IDENTITIES)
    if shown is not None and identity_id not in json.loads(shown):
        return removed
    store.root.delete(CONTACT_SHEET_NAME)
    return removed + [
        f"{CONTACT_SHEET_NAME} (it showed {identity_id}; draw it again with `pv-ray personalize --contact-sheet`)"
    ]


def work_folders() -> Path:
    """Where batch workers keep an identity's working copy while they tune it (this machine)."""
    return Path(tempfile.gettempdir()) / f"pv-ray-work-{os.getuid()}"


def new_work_folder(identity_id: str) -> Path:
    """A fresh working folder for one tuning of `identity_id`, named after this process (so a
    crashed worker's can be told from a running one's: `remove_stale_work_folders`)."""
    parent = work_folders() / validate_identity_id(identity_id)
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=parent))


def remove_work_folder(folder: Path) -> None:
    """Remove a working folder, and its identity's folder once no other one is in it."""
    shutil.rmtree(folder, ignore_errors=True)
    with contextlib.suppress(OSError):  # another worker's folder of the same identity is still in it
        folder.parent.rmdir()


def remove_stale_work_folders() -> None:
    """Remove the working folders of worker processes that died (a crash skips their cleanup)."""
    root = work_folders()
    for folder in root.glob("*/*") if root.is_dir() else []:
        pid = folder.name.split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            remove_work_folder(folder)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _erase_work_folders(store: AdapterStore, identity_id: str) -> list[str]:
    folder = work_folders() / identity_id
    if not folder.exists():
        return []
    shutil.rmtree(folder)
    return [f"worker folder {folder} on this machine"]


PLACES: tuple[Place, ...] = (
    Place(
        "adapter", "store: `adapters/<id>/`",
        "the LoRA weights (they render the person); adapter.json: the face descriptors of the reference photos "
        "(their only home), photo names and verdicts, the class word (and whether it was given or inferred), "
        "metrics", "removed", _erase_adapter, _export_adapter,
    ),
    Place(
        "staging folders", "store: `adapters/.tmp-<id>-*/`",
        "an upload in flight, or left by a crash: the same files as the adapter", "removed",
        _erase_staging, _export_staging,
    ),
    Place(
        "batch documents", "store: `report.json`, `rejects.json`, `evaluation.json`",
        "the identity's entries: status, reasons, photo names, metrics", "removed (counts adjusted)",
        _erase_entries, _export_entries,
    ),
    Place(
        "serving videos", "store: `jobs/<job>/`",
        "videos made by the service (`job.json` names the identity); its job records, in the service's memory",
        "videos removed; records expire after `serving.job_ttl_s`", _erase_job_videos, _export_job_videos,
    ),
    Place(
        "contact sheet", "store: `contact_sheet.png`",
        "reference photos and clips of the identities it shows (its PNG text lists them); not exported: it "
        "shows others too", "removed when it shows the identity (and a crashed write of it, always)",
        _erase_contact_sheet,
    ),
    Place(
        "worker folders", "each worker machine: `<temp dir>/pv-ray-work-<uid>/<id>/`",
        "a worker's working copy of the adapter folder while it tunes the identity",
        "removed on the machine delete runs on; elsewhere when the identity ends, or by the next worker there "
        "after a crash", _erase_work_folders,
    ),
)  # fmt: skip

BEYOND_THE_STORE: tuple[Beyond, ...] = (
    Beyond(
        "MLflow runs", "the tracking stores in the store's `tracking.json` (default: `mlflow.db` and `artifacts/` "
        "in the store)",
        "the identity's tuning and evaluation runs: params (the config), metrics, tags, the weights and adapter.json "
        "without face descriptors, photo names or class word",
        "sqlite: runs hard-deleted and the file vacuumed; a tracking server: artifacts deleted, runs soft-deleted, "
        "and the `mlflow gc` to run there is listed (exit 1); an unreachable one: exit 1",
    ),
    Beyond(
        "tombstone", f"store: `{TOMBSTONES_DIR}/<HMAC-SHA256 of the id>`, keyed by `{TOMBSTONES_DIR}/key`",
        "no personal data: a keyed hash of the id, and the date",
        "left by delete (personalize refuses the id); `pv-ray reinstate` removes it",
    ),
)  # fmt: skip


def readme_table() -> str:
    """The README's table of where personal data lives, made from `PLACES` and `BEYOND_THE_STORE`
    (tests/test_personal_data.py checks that the README holds it as printed here)."""
    rows = ["| what | where | what of the person | `pv-ray delete` |", "|---|---|---|---|"]
    rows += [f"| {p.name} | {p.where} | {p.holds} | {p.how} |" for p in (*PLACES, *BEYOND_THE_STORE)]
    return "\n".join(rows)


# ----------------------------------------------------------------------- erasure and export


def erase_identity(
    store: AdapterStore, identity_id: str, tracking: Sequence[TrackingStore] = (), *, tombstone: bool = True
) -> Erasure:
    """Remove `identity_id` from every place of `PLACES` and from the `tracking` stores, after
    leaving its tombstone (unless `tombstone` is false: a batch finishing an erasure made while
    it ran). Each place is tried even when another fails; failures are listed in `left`."""
    validate_identity_id(identity_id)
    erasure = Erasure(identity_id)
    if tombstone:
        try:
            erasure.erased_on = store.tombstones.add(identity_id)
        except Exception as e:  # the erasure itself must still happen
            erasure.left.append(f"tombstone: {type(e).__name__}: {e}")
    for place in PLACES:
        try:
            erasure.removed += place.erase(store, identity_id)
        except Exception as e:  # the other places must still be erased
            erasure.left.append(f"{place.name}: {type(e).__name__}: {e}")
    for where in tracking:
        if where.tracker is None:
            erasure.left.append(f"MLflow runs in {where.uri}: unreachable ({where.unreachable})")
            continue
        try:
            removed, left = where.tracker.erase_identity(identity_id)
            erasure.removed += removed
            erasure.left += left
        except Exception as e:
            erasure.left.append(f"MLflow ({where.uri}): {type(e).__name__}: {e}")
    return erasure


def reinstate_identity(store: AdapterStore, identity_id: str) -> bool:
    """Remove the identity's tombstone, so that it may be tuned again; False if it had none."""
    return store.tombstones.remove(validate_identity_id(identity_id))


def export_identity(store: AdapterStore, identity_id: str, tracking: Sequence[TrackingStore] = ()) -> bytes:
    """One identity's data as a zip (a subject access request): what each place of `PLACES`
    holds of it, and its MLflow runs' params, metrics and tags. `AdapterNotFound` when pv-ray
    holds nothing of it; `StorageUnavailable` when a tracking store cannot be reached."""
    validate_identity_id(identity_id)
    files: dict[str, bytes] = {}
    for place in PLACES:
        if place.export is not None:
            files.update(place.export(store, identity_id))
    runs = []
    for where in tracking:
        if where.tracker is None:
            raise StorageUnavailable(f"MLflow tracking store {where.uri} is unreachable ({where.unreachable})")
        runs += where.tracker.identity_runs(identity_id)
    if runs:
        files["mlflow_runs.json"] = json.dumps(runs, indent=2, sort_keys=True).encode()
    if not files:
        raise AdapterNotFound(f"pv-ray holds nothing of {identity_id!r} in {store.root_uri}")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


# ------------------------------------------------------------------------- batch documents


def write_store_document(store: AdapterStore, name: str, document: dict[str, Any]) -> str:
    """Write a batch document (`report.json`, ...) under the store's document lock, without the
    entries of identities erased meanwhile (their refusal entries excepted); returns its URI."""
    with store.root.lock(DOCUMENTS_LOCK):
        for identity_id in store.tombstones.erased(_identities_in(document)):
            _drop_entry(document, identity_id, keep_refusal=True)
        return store.root.write_json(name, document)


def _identities_in(document: dict[str, Any]) -> list[str]:
    identities = document.get("identities")
    rejects = document.get("rejects")
    ids = list(identities) if isinstance(identities, dict) else []
    if isinstance(rejects, list):
        ids += [r["identity_id"] for r in rejects if isinstance(r, dict) and isinstance(r.get("identity_id"), str)]
    return [i for i in ids if isinstance(i, str)]


def _drop_entry(document: dict, identity_id: str, *, keep_refusal: bool) -> bool:
    """Remove the identity from one report in place (its counts follow); whether it was there.
    With `keep_refusal`, an entry saying the identity was refused as erased stays."""
    identities = document.get("identities")
    if isinstance(identities, dict) and identity_id in identities:
        entry = identities[identity_id]
        status = entry.get("status") if isinstance(entry, dict) else None
        if keep_refusal and status == "rejected" and is_refusal(entry.get("reason")):
            return False
        del identities[identity_id]
        counts = document.get("counts")
        if isinstance(counts, dict) and "total" in counts and status in counts:
            counts[status] -= 1
            counts["total"] -= 1
        for other in identities.values():  # those tuned in one rollout with it name it
            if isinstance(other, dict) and isinstance(other.get("tuned_with"), list):
                other["tuned_with"] = [i for i in other["tuned_with"] if i != identity_id]
        return True
    rejects = document.get("rejects")
    if isinstance(rejects, list):
        kept = [
            r for r in rejects
            if not (isinstance(r, dict) and r.get("identity_id") == identity_id)
            or (keep_refusal and is_refusal(r.get("reason")))
        ]  # fmt: skip
        if len(kept) != len(rejects):
            document["rejects"] = kept
            return True
    return False


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


# ------------------------------------------------------------------------- tracking stores


def record_tracking_uri(store: AdapterStore, tracking_uri: str) -> None:
    """Note in the store's `tracking.json` that runs of its identities go to `tracking_uri`."""
    with store.root.lock(DOCUMENTS_LOCK):
        try:
            record = store.root.read_json(TRACKING_RECORD)
        except FileNotFoundError:
            record = {}
        in_store, uris = list(record.get("in_store", [])), list(record.get("uris", []))
        relative = _inside_store(store, tracking_uri)
        entry, entries = (relative, in_store) if relative is not None else (_without_credentials(tracking_uri), uris)
        if entry not in entries:
            entries.append(entry)
            store.root.write_json(TRACKING_RECORD, {"in_store": in_store, "uris": uris})


def tracking_uris_of(store: AdapterStore, given: str | None = None) -> list[str]:
    """The tracking stores to clean for this store: `given` (--tracking-uri), those the store
    recorded, and the default sqlite file in a local store where it exists."""
    try:
        record = store.root.read_json(TRACKING_RECORD)
    except FileNotFoundError:
        record = {}
    uris = [given] if given else []
    if store.root.is_local:
        in_store = [*record.get("in_store", []), "mlflow.db"]
        uris += [f"{SQLITE_PREFIX}{store.root.path(p)}" for p in in_store if Path(store.root.path(p)).is_file()]
    uris += record.get("uris", [])
    seen: dict[str, str] = {}
    for uri in uris:
        seen.setdefault(_without_credentials(uri), uri)
    return list(seen.values())


def open_tracking_stores(uris: Iterable[str]) -> list[TrackingStore]:
    """Open each tracking store as it is (nothing created); an unreachable one says why."""
    from pv_ray.storage.tracking import Tracker

    opened = []
    for uri in uris:
        try:
            opened.append(TrackingStore(uri, Tracker(uri, create=False)))
        except Exception as e:  # any failure to reach it is reported, never skipped
            opened.append(TrackingStore(uri, unreachable=f"{type(e).__name__}: {e}".splitlines()[0]))
    return opened


def _inside_store(store: AdapterStore, tracking_uri: str) -> str | None:
    """A sqlite store inside a local store root, by its path relative to the root (else None)."""
    if not (store.root.is_local and tracking_uri.startswith(SQLITE_PREFIX)):
        return None
    db = Path(tracking_uri[len(SQLITE_PREFIX) :]).resolve()
    root = Path(store.root.root).resolve()
    return db.relative_to(root).as_posix() if db.is_relative_to(root) else None


def _without_credentials(uri: str) -> str:
    """`uri` without a user:password@ part, whatever its scheme (http, postgresql, mysql...): the
    store is no place for a secret."""
    parts = urlsplit(uri)
    if "@" in parts.netloc:
        return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))
    return uri
