"""A storage root: a folder on any fsspec filesystem, with whole-file JSON documents and retries.

- Local paths are made absolute (`pv_ray.storage.uris.absolute_uri`) before anything else sees
  them: Ray Train workers and Serve replicas run in working directories of their own.
- Object stores fail transiently (a dropped connection, a timeout, a 503). `with_retries` runs
  an operation again with backoff on `OSError` and `TimeoutError`, but not on errors that another
  try cannot change (file not found, permission, exists); what still fails is a
  `StorageUnavailable` naming the operation, which the batch job reports as a failure to retry
  later, never as bad input.
- Read-modify-write of a shared document (`report.json` rewritten by `pv-ray delete` while a batch
  writes it) runs under `lock(name)`: an `fcntl` lock on a local root (released if the process
  dies), an object created with a conditional write (`If-None-Match`) on an object store, held as
  a lease that another process breaks once it is `LEASE_S` old (a holder that crashed).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import posixpath
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from pv_ray.storage.uris import absolute_uri

_T = TypeVar("_T")
TMP_PREFIX = ".tmp-"
DEFAULT_MAX_JSON_BYTES = 64 << 20
RETRY_ATTEMPTS = int(os.environ.get("PV_RAY_STORAGE_ATTEMPTS", "4"))
RETRY_BASE_DELAY_S = float(os.environ.get("PV_RAY_STORAGE_RETRY_DELAY_S", "0.5"))
# Errors a second try cannot fix (subclasses of OSError, so listed before the transient ones).
_PERMANENT = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)
LOCK_PREFIX = ".lock-"
LEASE_S = float(os.environ.get("PV_RAY_STORAGE_LEASE_S", "120"))
LOCK_TIMEOUT_S = 600.0
_PROCESS_LOCKS: dict[str, threading.Lock] = {}  # memory:// roots live in one process


class StorageUnavailable(OSError):
    """A storage operation that kept failing (transiently) through every retry."""


def with_retries(
    what: str,
    operation: Callable[[], _T],
    *,
    attempts: int = RETRY_ATTEMPTS,
    base_delay_s: float = RETRY_BASE_DELAY_S,
    before_retry: Callable[[], None] | None = None,
) -> _T:
    """`operation()`, tried up to `attempts` times while it fails transiently."""
    for attempt in range(attempts):
        try:
            return operation()
        except (*_PERMANENT, StorageUnavailable):
            raise
        except (OSError, TimeoutError) as error:
            if attempt == attempts - 1:
                raise StorageUnavailable(f"{what} failed {attempts} times; last error: {error!r}") from error
            time.sleep(base_delay_s * 2**attempt * random.uniform(0.5, 1.5))
            if before_retry is not None:
                before_retry()
    raise AssertionError("unreachable")


class StorageRoot:
    """The folder at `uri` and the filesystem it lives on."""

    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None) -> None:
        self.fs, root = url_to_fs(absolute_uri(str(uri)), **(storage_options or {}))
        self.root = root.rstrip("/")
        self.uri = self.fs.unstrip_protocol(self.root or "/")

    def __repr__(self) -> str:
        return f"StorageRoot({self.uri!r})"

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def uri_of(self, path: str) -> str:
        return self.fs.unstrip_protocol(path)

    def retry(self, what: str, operation: Callable[[], _T]) -> _T:
        """`with_retries`, dropping the filesystem's listing cache between tries."""
        return with_retries(what, operation, before_retry=self.fs.invalidate_cache)

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    def exists(self) -> bool:
        """Whether the root folder (or, on an object store, any object under its prefix) exists."""

        def check() -> bool:
            self.fs.invalidate_cache()
            return self.fs.isdir(self.root or "/")

        return self.retry(f"looking up {self.uri}", check)

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """Hold the root's lock `name` (see the module docstring) around a read-modify-write."""
        path = self.path(f"{LOCK_PREFIX}{validate_relpath(name)}")
        if self.is_local:
            self.fs.makedirs(self.root, exist_ok=True)
            with open(path, "a+") as lock_file:
                fcntl.flock(lock_file, fcntl.LOCK_EX)  # released by close, or by the process's death
                yield
            return
        if self.fs.protocol in ("memory", ("memory",)):
            with _PROCESS_LOCKS.setdefault(path, threading.Lock()):
                yield
            return
        token = self._take_lease(path)
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                if json.loads(self.fs.cat_file(path)).get("token") == token:
                    self.fs.rm_file(path)

    def _take_lease(self, path: str) -> str:
        """Create the lease object `path` (a conditional write); break it once it is older than LEASE_S."""
        token, deadline, delay = uuid.uuid4().hex, time.monotonic() + LOCK_TIMEOUT_S, 0.05
        while True:
            try:
                self.fs.pipe_file(path, json.dumps({"token": token, "at": time.time()}).encode(), mode="create")
                return token
            except FileExistsError:
                pass
            with contextlib.suppress(FileNotFoundError, ValueError):
                if time.time() - float(json.loads(self.fs.cat_file(path))["at"]) > LEASE_S:
                    self.fs.rm_file(path)  # its holder crashed: nothing renews a lease
                    continue
            if time.monotonic() > deadline:
                raise StorageUnavailable(f"{self.uri_of(path)} was held for over {LOCK_TIMEOUT_S:.0f} s")
            time.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, 1.0)

    def read_capped(self, path: str, max_bytes: int, what: str, too_large: type[Exception] = ValueError) -> bytes:
        """Read at most `max_bytes`; refuse bigger files (`too_large`) without reading them whole."""
        with self.fs.open(path, "rb") as f:
            data = f.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise too_large(f"{what} is over the cap of {max_bytes} bytes")
        return data

    def write_json(self, relpath: str, obj: Any) -> str:
        """Write a JSON document (e.g. `report.json`) under the root; returns its URI."""
        return self.write_bytes(relpath, json.dumps(obj, indent=2, sort_keys=True).encode())

    def write_bytes(self, relpath: str, data: bytes) -> str:
        """Write a file under the root; returns its URI. Written to a temporary name and moved,
        so a reader never sees half a file."""
        path = self.path(validate_relpath(relpath))

        def write() -> None:
            parent = posixpath.dirname(path)
            tmp = posixpath.join(parent, f"{TMP_PREFIX}{posixpath.basename(path)}-{uuid.uuid4().hex}")
            self.fs.makedirs(parent, exist_ok=True)
            try:
                self.fs.pipe_file(tmp, data)
                self.fs.mv(tmp, path)
            finally:
                if self.fs.exists(tmp):
                    self.fs.rm_file(tmp)
                self.fs.invalidate_cache()

        self.retry(f"writing {self.uri_of(path)}", write)
        return self.uri_of(path)

    def read_json(self, relpath: str, max_bytes: int = DEFAULT_MAX_JSON_BYTES) -> Any:
        """Read a document written by `write_json`; `FileNotFoundError` if missing."""
        return json.loads(self.read_bytes(relpath, max_bytes))

    def read_bytes(self, relpath: str, max_bytes: int) -> bytes:
        """Read a file under the root, refusing one over `max_bytes`; `FileNotFoundError` if missing."""
        path = self.path(validate_relpath(relpath))

        def read() -> bytes:
            self.fs.invalidate_cache()
            return self.read_capped(path, max_bytes, relpath)

        return self.retry(f"reading {self.uri_of(path)}", read)

    def children(self, relpath: str = "") -> list[str]:
        """The names of the entries of a folder under the root, or of the root itself ([] if there
        is no such folder)."""
        path = self.path(validate_relpath(relpath)) if relpath else (self.root or "/")

        def list_folder() -> list[str]:
            self.fs.invalidate_cache()
            if not self.fs.isdir(path):
                return []
            return sorted(posixpath.basename(entry.rstrip("/")) for entry in self.fs.ls(path, detail=False))

        return self.retry(f"listing {self.uri_of(path)}", list_folder)

    def delete(self, relpath: str) -> bool:
        """Remove a file or folder under the root; False if nothing was there."""
        path = self.path(validate_relpath(relpath))

        def remove() -> bool:
            self.fs.invalidate_cache()
            if not self.fs.exists(path):
                return False
            self.fs.rm(path, recursive=True)
            return True

        return self.retry(f"deleting {self.uri_of(path)}", remove)


def validate_relpath(relpath: str, reserved: tuple[str, ...] = ("adapters",)) -> str:
    """A relative POSIX path under a root that cannot escape it nor touch `reserved` folders."""
    if not isinstance(relpath, str) or not relpath:
        raise ValueError(f"relpath must be a non-empty str, got {relpath!r}")
    if relpath.startswith("/") or "\\" in relpath or "\x00" in relpath or "://" in relpath:
        raise ValueError(f"relpath {relpath!r} must be relative, with '/' separators only")
    parts = relpath.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"relpath {relpath!r} has an empty, '.' or '..' segment")
    if parts[0] in reserved:
        raise ValueError(f"relpath {relpath!r} is inside {parts[0]}/, which only the adapter store writes")
    return relpath
