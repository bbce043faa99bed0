"""Identity ids: the one check every untrusted identity name goes through.

An identity id names a folder in the input data, a folder in the adapter store, an MLflow tag
and a Serve model id, so it must be safe in all of them: ASCII letters, digits, ``.``, ``_``,
``-``; starting with a letter or digit (no hidden files, no ``.``/``..``); at most 128 chars.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import fsspec

IDENTITY_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
_IDENTITY_ID_RE = re.compile(IDENTITY_ID_PATTERN)
MAX_IDENTITY_ID_LENGTH = 128


class InvalidIdentityId(ValueError):
    """An identity id that does not match ``IDENTITY_ID_PATTERN``."""


def validate_identity_id(identity_id: object) -> str:
    """Return ``identity_id`` unchanged if it is a valid id, else raise ``InvalidIdentityId``."""
    if not isinstance(identity_id, str):
        raise InvalidIdentityId(
            f"identity id must be a str, got {type(identity_id).__name__}: {identity_id!r}"
        )
    # fullmatch, not match: "$" alone would accept a trailing newline.
    if _IDENTITY_ID_RE.fullmatch(identity_id):
        return identity_id
    if not identity_id:
        reason = "it is empty"
    elif len(identity_id) > MAX_IDENTITY_ID_LENGTH:
        reason = f"it is {len(identity_id)} characters long (max {MAX_IDENTITY_ID_LENGTH})"
    elif not (identity_id[0].isascii() and identity_id[0].isalnum()):
        reason = f"it starts with {identity_id[0]!r} (must start with an ASCII letter or digit)"
    else:
        bad = sorted({c for c in identity_id if not re.fullmatch(r"[A-Za-z0-9._-]", c)})
        reason = f"it contains forbidden characters {bad!r} (allowed: A-Z a-z 0-9 . _ -)"
    raise InvalidIdentityId(f"invalid identity id {identity_id!r}: {reason}")


def is_valid_identity_id(identity_id: object) -> bool:
    """True if ``identity_id`` would pass ``validate_identity_id``."""
    return isinstance(identity_id, str) and _IDENTITY_ID_RE.fullmatch(identity_id) is not None


# ---------------------------------------------------------------------------------------------
# identity folders: root/<identity_id>/*.{jpg,jpeg,png,webp} + optional meta.json

PHOTO_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
META_NAME = "meta.json"
MAX_META_BYTES = 64 * 1024


@dataclass
class IdentityFolder:
    """One identity's input: its photos' bytes, its meta.json, and files it could not use."""

    identity_id: str
    uri: str
    photos: dict[str, bytes] = field(default_factory=dict)
    meta: bytes | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file name, reason)


def list_identity_folders(root_uri: str, storage_options: dict | None = None) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Sub-folders of `root_uri`: ([(identity_id, folder uri)], [(name, reason)] for invalid ids).

    Names that are not valid identity ids are reported, never used as paths further on."""
    fs, root = fsspec.core.url_to_fs(root_uri, **(storage_options or {}))
    if not fs.isdir(root):
        raise FileNotFoundError(f"input folder not found: {root_uri}")
    valid, invalid = [], []
    for entry in sorted(fs.ls(root, detail=True), key=lambda e: e["name"]):
        if entry["type"] != "directory":
            continue
        name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
        try:
            valid.append((validate_identity_id(name), fs.unstrip_protocol(entry["name"])))
        except InvalidIdentityId as e:
            invalid.append((name, str(e)))
    return valid, invalid


def read_identity_folder(identity_id: str, uri: str, *, max_photo_bytes: int, storage_options: dict | None = None) -> IdentityFolder:
    """Read an identity folder's photos (by extension) and meta.json; oversized or unreadable
    files are recorded in `skipped` with the reason, not raised."""
    validate_identity_id(identity_id)
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    folder = IdentityFolder(identity_id=identity_id, uri=uri)
    for entry in sorted(fs.ls(path, detail=True), key=lambda e: e["name"]):
        name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
        if entry["type"] != "file":
            continue
        if name == META_NAME:
            if (entry.get("size") or 0) > MAX_META_BYTES:
                folder.skipped.append((name, f"meta.json larger than {MAX_META_BYTES} bytes"))
            else:
                folder.meta = fs.cat_file(entry["name"])
            continue
        if not name.lower().endswith(PHOTO_EXTENSIONS):
            folder.skipped.append((name, f"not a photo (extension not one of {', '.join(PHOTO_EXTENSIONS)})"))
            continue
        size = entry.get("size") or 0
        if size > max_photo_bytes:
            folder.skipped.append((name, f"file too large ({size} bytes > {max_photo_bytes})"))
            continue
        try:
            folder.photos[name] = fs.cat_file(entry["name"])
        except OSError as e:
            folder.skipped.append((name, f"unreadable ({e})"))
    return folder
