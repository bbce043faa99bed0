"""Adapter store: per-identity LoRA adapters on any fsspec filesystem, written atomically.

Layout under the root URI (local path, ``file://``, ``memory://``, ``s3://``, ``gs://`` ...)::

    adapters/<identity_id>/pytorch_lora_weights.safetensors
    adapters/<identity_id>/adapter.json
    adapters/<identity_id>/_COMPLETE      JSON: sha256 + size of both files, completed_at
    <relpath>                             batch-level JSON files (report.json, rejects.json),
                                          written through ``store.root`` (a ``StorageRoot``)

Atomicity: object stores have no atomic rename of a folder, so the folder is never what makes
an adapter visible. ``put`` uploads to a private ``adapters/.tmp-<id>-<uuid>/`` prefix, checks
the uploaded bytes, moves the files into place and writes ``_COMPLETE`` LAST (itself as one
whole object). An adapter exists iff its mark exists; a crash at any point leaves either the
old complete adapter, or files without a mark (``incomplete()`` lists those), never a half
adapter that looks whole. The mark's hashes let ``fetch``/``verify`` detect files that were
changed after the fact.

Two writers of one identity (two ``--force`` runs) could interleave their moves. Each mark names
its writer, and a writer checks, after writing its mark, whether the mark is still its own and
the files match it; if another writer's files landed over its own it writes again. The last
mark written is thus always checked by its writer: the final adapter's files all come from one
writer and match its mark.

Erased identities (``pv_ray.storage.tombstones``): a tombstoned id is not found by every reader
(``exists``, ``get``, ``fetch``, ``read_weights_bytes``, ``list_identities``: serving refuses it)
and ``put`` refuses it (``IdentityErased``), checking again after its mark, so a put that races an
erasure removes what it wrote.

Every public operation is retried on transient storage errors (``StorageRoot.retry``); ``put``
is safe to rerun from the start because nothing is visible before its mark.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import hashlib
import json
import posixpath
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pv_ray.errors import InputError
from pv_ray.storage.adapter_folder import (
    ADAPTER_FILES,
    METADATA_NAME,
    WEIGHTS_NAME,
    backbone_mismatch,
    recorded_config,
)
from pv_ray.storage.identity import is_valid_identity_id, validate_identity_id
from pv_ray.storage.root import TMP_PREFIX, StorageRoot
from pv_ray.storage.tombstones import Tombstones, refusal_reason

ADAPTERS_DIR = "adapters"
COMPLETE_MARK = "_COMPLETE"
WRITE_ROUNDS = 5  # a put whose files another writer's kept replacing gives up after this many
_STAGING_SUFFIX = re.compile(r"-[0-9a-f]{32}$")  # what put appends to .tmp-<id>
MAX_METADATA_BYTES = 1 << 20
DEFAULT_MAX_WEIGHTS_BYTES = 512 << 20
MAX_MARK_BYTES = 64 << 10
_CHUNK = 8 << 20


class AdapterStoreError(Exception):
    """Base class of the store's own errors."""


class AdapterNotFound(AdapterStoreError, KeyError):
    """No complete adapter for this identity."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else ""


class AdapterExists(AdapterStoreError, FileExistsError):
    """``put`` without ``overwrite=True`` onto a complete adapter."""


class AdapterCorrupted(AdapterStoreError):
    """Stored bytes do not match the completion mark (or the mark is unreadable)."""


class OtherBackbone(InputError):
    """The store's adapters were tuned on other backbone weights than the command's config loads."""


class AdapterTooLarge(AdapterStoreError):
    """A file is over the store's size cap; it is refused before it is read whole."""


class IdentityErased(AdapterNotFound):
    """The identity was erased (`pv-ray delete`): not found, and not written, until reinstated."""


@dataclass(frozen=True)
class AdapterRecord:
    """A complete adapter as the store sees it."""

    identity_id: str
    uri: str
    weights_uri: str
    metadata: dict[str, Any]
    sha256: dict[str, str]
    completed_at: str


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _parse_json_object(data: bytes, what: str, error: type[Exception]) -> dict[str, Any]:
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{what} is not valid JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise error(f"{what} must hold a JSON object, got {type(obj).__name__}")
    return obj


def _retried(method):
    """Run a store operation again on transient storage errors (see `StorageRoot.retry`)."""

    @functools.wraps(method)
    def wrapper(self: AdapterStore, *args, **kwargs):
        what = f"{method.__name__}({', '.join(map(repr, args))}) on {self.root_uri}"
        return self.root.retry(what, lambda: method(self, *args, **kwargs))

    return wrapper


@dataclass(frozen=True)
class _LocalAdapter:
    """An adapter folder on local disk, checked and hashed, ready to upload."""

    files: dict[str, Path]
    metadata: dict[str, Any]
    sha256: dict[str, str]
    size: dict[str, int]


class AdapterStore:
    """Per-identity adapters under ``root``; see the module docstring for the layout."""

    def __init__(
        self,
        root: str,
        storage_options: dict[str, Any] | None = None,
        max_weights_bytes: int = DEFAULT_MAX_WEIGHTS_BYTES,
    ) -> None:
        if max_weights_bytes <= 0:
            raise ValueError(f"max_weights_bytes must be > 0, got {max_weights_bytes}")
        self.root = StorageRoot(root, storage_options)
        self.fs = self.root.fs
        self.root_uri = self.root.uri
        self.max_weights_bytes = max_weights_bytes
        self.tombstones = Tombstones(self.root)

    def __repr__(self) -> str:
        return f"AdapterStore({self.root_uri!r})"

    # ---------------------------------------------------------------- paths

    def _adapter_dir(self, identity_id: str) -> str:
        # Validation here means no code path can build a store path from an unchecked id.
        return self.root.path(ADAPTERS_DIR, validate_identity_id(identity_id))

    def uri(self, identity_id: str) -> str:
        """Full URI of the identity's adapter folder (whether or not it exists)."""
        return self.root.uri_of(self._adapter_dir(identity_id))

    # --------------------------------------------------------------- writing

    @_retried
    def put(self, identity_id: str, local_dir: str | Path, overwrite: bool = False) -> AdapterRecord:
        """Store the adapter saved in ``local_dir``; atomic as described in the module docstring.

        Raises ``AdapterExists`` if a complete adapter is there and ``overwrite`` is False, and
        ``IdentityErased`` for an erased identity. With ``overwrite=True`` the old mark is removed
        before any old file is replaced, so readers see "not found" during the swap, never the
        old mark over new files.
        """
        validate_identity_id(identity_id)  # before any path is built from it
        local = self._check_local(identity_id, Path(local_dir))
        self._refuse_erased(identity_id)
        writer = uuid.uuid4().hex
        for attempt in range(WRITE_ROUNDS):
            completed_at = self._write(identity_id, local, writer, overwrite=overwrite or attempt > 0)
            if not self._written_over(identity_id, local, writer):
                break
        else:
            raise AdapterCorrupted(
                f"adapter {identity_id!r}: another writer replaced its files {WRITE_ROUNDS} times; write it again"
            )
        try:
            self._refuse_erased(identity_id)
        except IdentityErased:  # erased while it was written: nothing of it may stay
            self.delete(identity_id)
            raise
        return self._record(identity_id, local.metadata, local.sha256, completed_at)

    def _write(self, identity_id: str, local: _LocalAdapter, writer: str, overwrite: bool) -> str:
        """Upload to a private prefix, move into place, write the mark last; returns completed_at."""
        final_dir = self._adapter_dir(identity_id)
        mark_path = posixpath.join(final_dir, COMPLETE_MARK)
        self.fs.invalidate_cache()
        if self.fs.exists(mark_path) and not overwrite:
            raise AdapterExists(
                f"adapter {identity_id!r} already exists at {self.uri(identity_id)}; pass overwrite=True to replace it"
            )
        tmp_dir = self.root.path(ADAPTERS_DIR, f"{TMP_PREFIX}{identity_id}-{uuid.uuid4().hex}")
        try:
            tmp_mark, completed_at = self._upload(identity_id, local, tmp_dir, writer)
            with contextlib.suppress(FileNotFoundError):  # overwrite: un-complete first (another writer may have)
                self.fs.rm_file(mark_path)
            self.fs.makedirs(final_dir, exist_ok=True)
            for name in ADAPTER_FILES:
                self.fs.mv(posixpath.join(tmp_dir, name), posixpath.join(final_dir, name))
            self.fs.mv(tmp_mark, mark_path)  # LAST: this is what makes the adapter exist
        finally:
            # Best effort: a failed cleanup must not hide the real error, and a leftover
            # ".tmp-" prefix is ignored by every reader (and removed by `pv-ray delete`).
            with contextlib.suppress(OSError):
                if self.fs.exists(tmp_dir):
                    self.fs.rm(tmp_dir, recursive=True)
            self.fs.invalidate_cache()
        return completed_at

    def _written_over(self, identity_id: str, local: _LocalAdapter, writer: str) -> bool:
        """After our mark: True if it is still ours but another writer's files landed over ours
        (write again). A mark that is gone or another writer's is that writer's to check."""
        mark_path = posixpath.join(self._adapter_dir(identity_id), COMPLETE_MARK)
        self.fs.invalidate_cache()
        try:
            mark = json.loads(self.fs.cat_file(mark_path))
        except FileNotFoundError:
            return False
        if mark.get("writer") != writer:
            return False
        try:
            adapter_dir = self._adapter_dir(identity_id)
            for name in ADAPTER_FILES:
                self._check_sha256(posixpath.join(adapter_dir, name), local.sha256[name], identity_id)
        except (AdapterCorrupted, FileNotFoundError):
            return True
        return False

    def _refuse_erased(self, identity_id: str) -> None:
        erased_on = self.tombstones.erased_on(identity_id)
        if erased_on is not None:
            raise IdentityErased(f"identity {identity_id!r}: {refusal_reason(identity_id, erased_on)}")

    def _check_local(self, identity_id: str, local_dir: Path) -> _LocalAdapter:
        """The adapter folder's files, checked against the caps and its own identity id."""
        files = {name: local_dir / name for name in ADAPTER_FILES}
        for name, path in files.items():
            if not path.is_file():
                raise FileNotFoundError(f"adapter folder {local_dir} has no {name}")
        weights_size = files[WEIGHTS_NAME].stat().st_size
        if weights_size > self.max_weights_bytes:
            raise AdapterTooLarge(
                f"{files[WEIGHTS_NAME]} is {weights_size} bytes, over the store's cap of "
                f"{self.max_weights_bytes} (max_weights_bytes)"
            )
        metadata_bytes = files[METADATA_NAME].read_bytes()
        if len(metadata_bytes) > MAX_METADATA_BYTES:
            raise AdapterTooLarge(f"{files[METADATA_NAME]} is {len(metadata_bytes)} bytes (max {MAX_METADATA_BYTES})")
        metadata = _parse_json_object(metadata_bytes, str(files[METADATA_NAME]), ValueError)
        if metadata.get("identity_id", identity_id) != identity_id:
            raise ValueError(
                f"{files[METADATA_NAME]} says identity_id={metadata['identity_id']!r}, "
                f"refusing to store it as {identity_id!r}"
            )
        sha256 = {name: sha256_file(path) for name, path in files.items()}
        return _LocalAdapter(files, metadata, sha256, {WEIGHTS_NAME: weights_size, METADATA_NAME: len(metadata_bytes)})

    def _upload(self, identity_id: str, local: _LocalAdapter, tmp_dir: str, writer: str) -> tuple[str, str]:
        """Upload both files and their mark to `tmp_dir`, checking what landed; (mark path, time)."""
        self.fs.makedirs(tmp_dir, exist_ok=True)
        for name, path in local.files.items():
            self.fs.put_file(str(path), posixpath.join(tmp_dir, name))
        # Check what landed, not what we sent: catches truncated uploads before the mark.
        for name in ADAPTER_FILES:
            self._check_sha256(posixpath.join(tmp_dir, name), local.sha256[name], identity_id)
        completed_at = dt.datetime.now(dt.timezone.utc).isoformat()
        mark = {
            "identity_id": identity_id, "sha256": local.sha256, "size": local.size, "completed_at": completed_at,
            "writer": writer,
        }  # fmt: skip
        tmp_mark = posixpath.join(tmp_dir, COMPLETE_MARK)
        self.fs.pipe_file(tmp_mark, json.dumps(mark, indent=2).encode())
        return tmp_mark, completed_at

    @_retried
    def delete(self, identity_id: str) -> None:
        """Remove an adapter, complete or not; the mark goes first so readers never see a
        complete adapter with missing files. Raises ``AdapterNotFound`` if nothing is there."""
        adapter_dir = self._adapter_dir(identity_id)
        self.fs.invalidate_cache()
        if not self.fs.exists(adapter_dir):
            raise AdapterNotFound(f"no adapter {identity_id!r} in {self.root_uri}")
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(posixpath.join(adapter_dir, COMPLETE_MARK))
        self.fs.rm(adapter_dir, recursive=True)
        self.fs.invalidate_cache()

    @_retried
    def staging_folders(self, identity_id: str) -> list[str]:
        """URIs of the ``adapters/.tmp-*`` upload prefixes of `identity_id` (one in flight, or a
        crash's leftover: both hold adapter.json with the face descriptors). A prefix is the
        identity's when put named it so (``.tmp-<id>-<uuid hex>``), when its adapter.json or mark
        says so, or, for a leftover that says nothing, when its name starts with ``.tmp-<id>-``."""
        validate_identity_id(identity_id)
        adapters = self.root.path(ADAPTERS_DIR)
        self.fs.invalidate_cache()
        if not self.fs.isdir(adapters):
            return []
        found = []
        for entry in self.fs.ls(adapters, detail=False):
            name = posixpath.basename(entry.rstrip("/"))
            if not name.startswith(TMP_PREFIX):
                continue
            owner = self._staged_for(entry, name)
            if owner == identity_id or (owner is None and name.startswith(f"{TMP_PREFIX}{identity_id}-")):
                found.append(self.root.uri_of(self.fs._strip_protocol(entry)))
        return sorted(found)

    def _staged_for(self, path: str, name: str) -> str | None:
        """Whose upload prefix `path` is, by its name or its files (None: it does not say)."""
        for file_name in (METADATA_NAME, COMPLETE_MARK):
            try:
                recorded = json.loads(self.fs.cat_file(posixpath.join(path, file_name))).get("identity_id")
            except (OSError, ValueError, AttributeError):
                continue
            if is_valid_identity_id(recorded):
                return recorded
        base = _STAGING_SUFFIX.sub("", name[len(TMP_PREFIX) :])
        return base if base != name[len(TMP_PREFIX) :] and is_valid_identity_id(base) else None

    @_retried
    def remove_staging(self, identity_id: str) -> list[str]:
        """Remove the identity's upload prefixes (see `staging_folders`); returns their URIs."""
        folders = self.staging_folders(identity_id)
        for uri in folders:
            self.fs.rm(self.fs._strip_protocol(uri), recursive=True)
        self.fs.invalidate_cache()
        return folders

    # --------------------------------------------------------------- reading

    @_retried
    def exists(self, identity_id: str) -> bool:
        """True iff the adapter is complete (its mark exists) and not erased. ``verify`` checks the bytes."""
        mark_path = posixpath.join(self._adapter_dir(identity_id), COMPLETE_MARK)
        self.fs.invalidate_cache()
        return self.fs.exists(mark_path) and self.tombstones.erased_on(identity_id) is None

    def list_identities(self, limit: int | None = None, start_after: str | None = None) -> list[str]:
        """Sorted ids of complete adapters, ``> start_after``, at most ``limit`` of them.

        One recursive listing of ``adapters/`` (a few list requests per thousand adapters on
        an object store), no per-adapter request.
        """
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0 or None, got {limit}")
        complete, _ = self._scan()
        complete -= set(self.tombstones.erased(complete))
        ids = sorted(i for i in complete if start_after is None or i > start_after)
        return ids if limit is None else ids[:limit]

    def incomplete(self) -> list[str]:
        """Sorted ids that have files under ``adapters/<id>/`` but no mark: crash leftovers."""
        complete, with_files = self._scan()
        return sorted(with_files - complete)

    @_retried
    def get(self, identity_id: str) -> AdapterRecord:
        """The record of a complete adapter (reads the mark and adapter.json, not the weights)."""
        mark = self._read_mark(identity_id)
        metadata_path = posixpath.join(self._adapter_dir(identity_id), METADATA_NAME)
        what = f"{identity_id}/{METADATA_NAME}"
        data = self.root.read_capped(metadata_path, MAX_METADATA_BYTES, what, AdapterTooLarge)
        if hashlib.sha256(data).hexdigest() != mark["sha256"][METADATA_NAME]:
            raise AdapterCorrupted(
                f"{self.root.uri_of(metadata_path)} does not match the sha256 in its {COMPLETE_MARK} mark"
            )
        metadata = _parse_json_object(data, what, AdapterCorrupted)
        return self._record(identity_id, metadata, mark["sha256"], mark["completed_at"])

    def check_backbone(self, backbone: dict[str, str], identity_id: str | None = None) -> None:
        """Refuse (`OtherBackbone`, one line naming both) a config whose backbone is not the one the
        identity's adapter, by default the store's first, was tuned on. A store holds one backbone's
        adapters, so the first stands for all; replicas check each adapter again as they load it."""
        identity_id = identity_id or next(iter(self.list_identities(1)), None)
        if identity_id is None:
            return
        why = backbone_mismatch(self.get(identity_id).metadata, backbone)
        if why:
            raise OtherBackbone(f"adapter {identity_id!r} of {self.root_uri}: {why}; use the config it was tuned with")

    def tuning_config(self) -> tuple[dict[str, Any], str] | None:
        """The config the store's adapters were tuned with (its first adapter's, as `check_backbone`
        reads it) and where it is recorded; None for an empty store or one that records none."""
        identity_id = next(iter(self.list_identities(1)), None)
        config = recorded_config(self.get(identity_id).metadata) if identity_id is not None else None
        return None if config is None else (config, f"{self.uri(identity_id)}/{METADATA_NAME}")

    @_retried
    def checksums(self, identity_id: str) -> dict[str, str]:
        """``{file name: sha256}`` recorded in the completion mark."""
        return dict(self._read_mark(identity_id)["sha256"])

    @_retried
    def verify(self, identity_id: str) -> None:
        """Stream both files and compare with the mark; raises ``AdapterCorrupted``."""
        mark = self._read_mark(identity_id)
        adapter_dir = self._adapter_dir(identity_id)
        for name in ADAPTER_FILES:
            self._check_sha256(posixpath.join(adapter_dir, name), mark["sha256"][name], identity_id)

    @_retried
    def fetch(self, identity_id: str, local_dir: str | Path) -> Path:
        """Download both files into ``local_dir`` (created) and verify them against the mark.

        Files land under temporary names and are renamed only once verified, so a corrupted
        download never sits in ``local_dir`` under the real names.
        """
        mark = self._read_mark(identity_id)
        adapter_dir = self._adapter_dir(identity_id)
        local_dir = Path(local_dir)
        local_dir.mkdir(parents=True, exist_ok=True)
        staged: list[tuple[Path, Path]] = []
        try:
            for name in ADAPTER_FILES:
                cap = self.max_weights_bytes if name == WEIGHTS_NAME else MAX_METADATA_BYTES
                if mark["size"].get(name, 0) > cap:
                    raise AdapterTooLarge(f"{identity_id}/{name} is {mark['size'][name]} bytes (cap {cap})")
                tmp = local_dir / f".{name}.{uuid.uuid4().hex}.part"
                staged.append((tmp, local_dir / name))
                self.fs.get_file(posixpath.join(adapter_dir, name), str(tmp))
                if tmp.stat().st_size > cap:
                    raise AdapterTooLarge(f"{identity_id}/{name} is over the cap of {cap} bytes")
                if sha256_file(tmp) != mark["sha256"][name]:
                    raise AdapterCorrupted(
                        f"{self.uri(identity_id)}/{name} does not match the sha256 in its {COMPLETE_MARK} mark"
                    )
            for tmp, final in staged:
                tmp.replace(final)
        finally:
            for tmp, _ in staged:
                tmp.unlink(missing_ok=True)
        return local_dir

    @_retried
    def read_weights_bytes(self, identity_id: str) -> bytes:
        """The verified safetensors bytes of a complete adapter (for serving from memory)."""
        mark = self._read_mark(identity_id)
        size = mark["size"].get(WEIGHTS_NAME, 0)
        if size > self.max_weights_bytes:
            raise AdapterTooLarge(
                f"{identity_id}/{WEIGHTS_NAME} is {size} bytes, over the store's cap of "
                f"{self.max_weights_bytes} (max_weights_bytes)"
            )
        path = posixpath.join(self._adapter_dir(identity_id), WEIGHTS_NAME)
        data = self.root.read_capped(path, self.max_weights_bytes, f"{identity_id}/{WEIGHTS_NAME}", AdapterTooLarge)
        if hashlib.sha256(data).hexdigest() != mark["sha256"][WEIGHTS_NAME]:
            raise AdapterCorrupted(f"{self.root.uri_of(path)} does not match the sha256 in its {COMPLETE_MARK} mark")
        return data

    # -------------------------------------------------------------- helpers

    def _record(
        self, identity_id: str, metadata: dict[str, Any], sha256: dict[str, str], completed_at: str
    ) -> AdapterRecord:
        adapter_dir = self._adapter_dir(identity_id)
        return AdapterRecord(
            identity_id=identity_id,
            uri=self.root.uri_of(adapter_dir),
            weights_uri=self.root.uri_of(posixpath.join(adapter_dir, WEIGHTS_NAME)),
            metadata=metadata,
            sha256=dict(sha256),
            completed_at=completed_at,
        )

    def _read_mark(self, identity_id: str) -> dict[str, Any]:
        mark_path = posixpath.join(self._adapter_dir(identity_id), COMPLETE_MARK)
        self.fs.invalidate_cache()
        try:
            data = self.root.read_capped(mark_path, MAX_MARK_BYTES, f"{identity_id}/{COMPLETE_MARK}", AdapterTooLarge)
        except FileNotFoundError:
            raise AdapterNotFound(f"no complete adapter {identity_id!r} in {self.root_uri}") from None
        self._refuse_erased(identity_id)
        mark = _parse_json_object(data, f"{identity_id}/{COMPLETE_MARK}", AdapterCorrupted)
        sha256, size = mark.get("sha256"), mark.get("size")
        if (
            not isinstance(sha256, dict)
            or not isinstance(size, dict)
            or any(not isinstance(sha256.get(name), str) for name in ADAPTER_FILES)
            or not isinstance(mark.get("completed_at"), str)
        ):
            raise AdapterCorrupted(
                f"{identity_id}/{COMPLETE_MARK} lacks sha256/size of {ADAPTER_FILES} or completed_at"
            )
        return mark

    def _check_sha256(self, path: str, expected: str, identity_id: str) -> None:
        digest = hashlib.sha256()
        with self.fs.open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
        if digest.hexdigest() != expected:
            raise AdapterCorrupted(
                f"{self.root.uri_of(path)} (adapter {identity_id!r}) does not match its expected sha256"
            )

    @_retried
    def _scan(self) -> tuple[set[str], set[str]]:
        """(ids with a mark, ids with any file) from one recursive listing of adapters/."""
        adapters = self.root.path(ADAPTERS_DIR)
        self.fs.invalidate_cache()
        try:
            files = self.fs.find(adapters)
        except FileNotFoundError:
            return set(), set()
        prefix = self.fs._strip_protocol(adapters).rstrip("/") + "/"
        complete: set[str] = set()
        with_files: set[str] = set()
        for file in files:
            rel = self.fs._strip_protocol(file)
            if not rel.startswith(prefix):
                continue
            parts = rel[len(prefix) :].split("/")
            # Temporary ".tmp-*" prefixes and stray names are not identities.
            if len(parts) != 2 or not is_valid_identity_id(parts[0]):
                continue
            with_files.add(parts[0])
            if parts[1] == COMPLETE_MARK:
                complete.add(parts[0])
        return complete, with_files
