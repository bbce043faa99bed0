"""Identity folders, the batch job's input: `root/<identity_id>/*.{jpg,jpeg,png,webp}` + `meta.json`.

Read through fsspec (local paths, `s3://`, `gs://`, `memory://`). Nothing is skipped silently:
a name that is not a valid identity id, a file at the root, a photo that is too large, a file
that is not a photo, a sub-folder and a symbolic link (never followed) are each reported with a
reason. Transient storage errors are retried; what keeps failing raises `StorageUnavailable`
(the identity is then failed, to be retried by the next run, not rejected).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pv_ray.storage.identity import InvalidIdentityId, validate_identity_id
from pv_ray.storage.root import StorageRoot

PHOTO_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
META_NAME = "meta.json"
MAX_META_BYTES = 64 * 1024


@dataclass
class IdentityFolder:
    """One identity's input: its photos' bytes, its meta.json, and the entries it could not use."""

    identity_id: str
    uri: str
    photos: dict[str, bytes] = field(default_factory=dict)
    meta: bytes | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (entry name, reason)


def _name(entry: dict[str, Any]) -> str:
    return entry["name"].rstrip("/").rsplit("/", 1)[-1]


def _not_regular(entry: dict[str, Any]) -> str | None:
    """Why a listed entry is not a regular file to read (None when it is one)."""
    if entry.get("islink"):
        return "symbolic link (not followed)"
    if entry["type"] == "directory":
        return "sub-folder (identity folders are flat)"
    if entry["type"] != "file":
        return f"not a regular file ({entry['type']})"
    return None


def _list(root: StorageRoot, path: str) -> list[dict[str, Any]]:

    return root.retry(f"listing {root.uri_of(path)}", lambda: sorted(root.fs.ls(path, detail=True), key=_name))


def list_identity_folders(
    root_uri: str, storage_options: dict | None = None
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Folders under `root_uri`: ([(identity_id, folder uri)], [(name, reason)] for the rest).

    Names that are not valid identity ids are reported, never used as paths further on."""
    root = StorageRoot(root_uri, storage_options)
    if not root.retry(f"checking {root.uri}", lambda: root.fs.isdir(root.root)):
        raise FileNotFoundError(f"input folder not found: {root_uri}")
    valid, invalid = [], []
    for entry in _list(root, root.root):
        name = _name(entry)
        if entry.get("islink"):
            invalid.append((name, "symbolic link (not followed)"))
        elif entry["type"] != "directory":
            invalid.append((name, "not an identity folder (a file at the input root)"))
        else:
            try:
                valid.append((validate_identity_id(name), root.uri_of(entry["name"])))
            except InvalidIdentityId as e:
                invalid.append((name, str(e)))
    return valid, invalid


def read_identity_folder(
    identity_id: str, uri: str, *, max_photo_bytes: int, storage_options: dict | None = None
) -> IdentityFolder:
    """Read an identity folder's photos (by extension) and meta.json; every entry it does not use
    is recorded in `skipped` with the reason."""
    validate_identity_id(identity_id)
    root = StorageRoot(uri, storage_options)
    folder = IdentityFolder(identity_id=identity_id, uri=root.uri)
    for entry in _list(root, root.root):
        name, size = _name(entry), entry.get("size") or 0
        reason = _not_regular(entry)
        if reason is None and name == META_NAME and size > MAX_META_BYTES:
            reason = f"meta.json larger than {MAX_META_BYTES} bytes"
        elif reason is None and name != META_NAME and not name.lower().endswith(PHOTO_EXTENSIONS):
            reason = f"not a photo (extension not one of {', '.join(PHOTO_EXTENSIONS)})"
        elif reason is None and name != META_NAME and size > max_photo_bytes:
            reason = f"file too large ({size} bytes > {max_photo_bytes})"
        if reason is not None:
            folder.skipped.append((name, reason))
            continue
        data = root.retry(f"reading {root.uri_of(entry['name'])}", lambda path=entry["name"]: root.fs.cat_file(path))
        if name == META_NAME:
            folder.meta = data
        else:
            folder.photos[name] = data
    return folder
