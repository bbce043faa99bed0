"""Identity folders, the batch job's input: `root/<identity_id>/*.{jpg,jpeg,png,webp}` + `meta.json`.

Read through fsspec (local paths, `s3://`, `gs://`, `memory://`). Nothing is skipped silently:
a name that is not a valid identity id, ids that differ only in case (both refused: on a
case-folding file system they are one folder), a file at the root, a photo that is too large,
a file that is not a photo, a sub-folder and a symbolic link (never followed), and the photos
past an identity's caps (`faces.max_photos_per_identity`, `faces.max_identity_bytes`) are each
reported with a reason. The extension only picks the files to read: what a file holds is judged
by its content (`pv_ray.faces.photos`). Transient storage errors are retried; what keeps failing
raises `StorageUnavailable` (the identity is then failed, to be retried by the next run, not
rejected); a folder that cannot be read at all (gone, no permission) is an `UnreadableFolder`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pv_ray.errors import InputError
from pv_ray.storage.identity import InvalidIdentityId, case_clashes, identity_key, validate_identity_id
from pv_ray.storage.root import StorageRoot

PHOTO_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
META_NAME = "meta.json"
MAX_META_BYTES = 64 * 1024
# Defaults of `faces.max_photos_per_identity` / `faces.max_identity_bytes` (config.FacesConfig).
DEFAULT_MAX_PHOTOS = 64
DEFAULT_MAX_IDENTITY_BYTES = 256 * 2**20


class UnreadableFolder(InputError):
    """An identity folder that cannot be listed at all: it is gone, or not readable."""


class _TooLarge(ValueError):
    """A file that grew past its cap between the listing and the read."""


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


def check_input_root(root_uri: str, storage_options: dict | None = None) -> None:
    """Refuse, before anything is written, an input root that cannot be the batch's: missing, empty,
    or one identity's folder (photos at its root, no sub-folder) where their parent was meant."""
    _input_root(root_uri, storage_options)


def _input_root(root_uri: str, storage_options: dict | None) -> tuple[StorageRoot, list[dict[str, Any]]]:
    """The root and its entries, or an `InputError` saying why it cannot be an input root."""
    root = StorageRoot(root_uri, storage_options)
    if not root.retry(f"checking {root.uri}", lambda: root.fs.isdir(root.root)):
        raise InputError(f"--input {root_uri}: folder not found")
    entries = _list(root, root.root)
    if not entries:
        raise InputError(f"--input {root_uri}: the folder is empty (one sub-folder per identity expected)")
    photos = [e for e in entries if e["type"] == "file" and _name(e).lower().endswith(PHOTO_EXTENSIONS)]
    if photos and not any(e["type"] == "directory" for e in entries):
        raise InputError(
            f"--input {root_uri}: holds photos and no identity folder; it looks like one identity's folder: "
            "pass the folder above it (one sub-folder per identity), or tune it alone with `pv-ray tune --images`"
        )
    return root, entries


def list_identity_folders(
    root_uri: str, storage_options: dict | None = None, *, taken: Iterable[str] = ()
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Folders under `root_uri`: ([(identity_id, folder uri)], [(name, reason)] for the rest).

    Names that are not valid identity ids are reported, never used as paths further on; so are
    ids that differ only in case, from each other or from an id in `taken` (the ids already in
    the adapter store) spelt otherwise: none of them is picked over the others."""
    root, entries = _input_root(root_uri, storage_options)
    valid, invalid = [], []
    for entry in entries:
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
    clashes = case_clashes(i for i, _ in valid)
    stored = {identity_key(t): t for t in taken}
    unique = []
    for identity_id, uri in valid:
        if identity_id in clashes:
            others = ", ".join(repr(i) for i in clashes[identity_id] if i != identity_id)
            invalid.append((identity_id, f"identity id {identity_id!r} differs only in case from {others} in the "
                            "input (ids must be unique case-insensitively; rename one)"))  # fmt: skip
        elif stored.get(identity_key(identity_id), identity_id) != identity_id:
            invalid.append((identity_id, f"identity id {identity_id!r} differs only in case from "
                            f"{stored[identity_key(identity_id)]!r} in the adapter store (ids must be unique "
                            "case-insensitively)"))  # fmt: skip
        else:
            unique.append((identity_id, uri))
    return unique, sorted(invalid)


def read_identity_folder(
    identity_id: str,
    uri: str,
    *,
    max_photo_bytes: int,
    max_photos: int = DEFAULT_MAX_PHOTOS,
    max_total_bytes: int = DEFAULT_MAX_IDENTITY_BYTES,
    storage_options: dict | None = None,
) -> IdentityFolder:
    """Read an identity folder's photos (by extension, in name order, up to `max_photos` of them
    and `max_total_bytes` in all) and meta.json; every entry it does not use is recorded in
    `skipped` with the reason."""
    validate_identity_id(identity_id)
    root = StorageRoot(uri, storage_options)
    folder = IdentityFolder(identity_id=identity_id, uri=root.uri)
    try:
        entries = _list(root, root.root)
    except (FileNotFoundError, NotADirectoryError, PermissionError) as e:
        raise UnreadableFolder(f"cannot read the photo folder {root.uri}: {type(e).__name__}: {e}") from None
    total = 0
    for entry in entries:
        name, size = _name(entry), entry.get("size") or 0
        reason = _not_regular(entry)
        if reason is None and name == META_NAME and size > MAX_META_BYTES:
            reason = f"meta.json larger than {MAX_META_BYTES} bytes"
        elif reason is None and name != META_NAME:
            reason = _photo_skip_reason(name, size, len(folder.photos), total, max_photo_bytes, max_photos,
                                        max_total_bytes)  # fmt: skip
        if reason is not None:
            folder.skipped.append((name, reason))
            continue
        cap = MAX_META_BYTES if name == META_NAME else min(max_photo_bytes, max_total_bytes - total)
        try:
            data = root.retry(
                f"reading {root.uri_of(entry['name'])}",
                lambda path=entry["name"], cap=cap, name=name: root.read_capped(path, cap, name, _TooLarge),
            )
        except _TooLarge:  # bigger than listed (it grew, or the listing had no size)
            over_photo_cap = cap == max_photo_bytes or name == META_NAME
            folder.skipped.append((name, f"file too large (over {cap} bytes when read)" if over_photo_cap else
                                   _over_identity_bytes(max_total_bytes)))  # fmt: skip
            continue
        if name == META_NAME:
            folder.meta = data
        else:
            folder.photos[name] = data
            total += len(data)
    return folder


def _photo_skip_reason(
    name: str, size: int, photos: int, total: int, max_photo_bytes: int, max_photos: int, max_total_bytes: int
) -> str | None:
    """Why a listed file is not read as a photo (None: it is read)."""
    if not name.lower().endswith(PHOTO_EXTENSIONS):
        return f"not a photo (extension not one of {', '.join(PHOTO_EXTENSIONS)})"
    if size > max_photo_bytes:
        return f"file too large ({size} bytes > {max_photo_bytes})"
    if photos >= max_photos:
        return f"over the cap of {max_photos} photos per identity (faces.max_photos_per_identity)"
    if total + size > max_total_bytes:
        return _over_identity_bytes(max_total_bytes)
    return None


def _over_identity_bytes(max_total_bytes: int) -> str:
    return f"over the cap of {max_total_bytes} bytes of photos per identity (faces.max_identity_bytes)"
