"""Tombstones: an erased identity stays erased, and its tombstone says nothing of whom it stands for.

`pv-ray delete` leaves `tombstones/<HMAC-SHA256(key, identity id case-folded), hex>` in the store, a JSON
document holding only the date of the erasure. The key is 32 random bytes made once per store
(`tombstones/key`, made under the store's lock, so two first erasures agree on it). Without
the key a tombstone is 64 hex digits; with the store, it can only confirm a guessed id, which is
what the store's refusal of that id does anyway.

The adapter store reads them: a tombstoned id is not found (so serving refuses it), `put` refuses
it, and `pv-ray personalize` reports it as erased, with the date, until `pv-ray reinstate` removes
its tombstone.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import secrets
from collections.abc import Iterable

from pv_ray.storage.identity import identity_key, validate_identity_id
from pv_ray.storage.root import StorageRoot

TOMBSTONES_DIR = "tombstones"
KEY_NAME = "key"
KEY_BYTES = 32
_MAX_TOMBSTONE_BYTES = 4096
ERASED_PREFIX = "erased on "


def refusal_reason(identity_id: str, erased_on: str) -> str:
    """The one line a refused (erased) identity gets in the batch report."""
    return f"{ERASED_PREFIX}{erased_on}; `pv-ray reinstate {identity_id}` to allow it again"


def is_refusal(reason: object) -> bool:
    """Whether a report entry's reason is an erased identity's refusal (which holds nothing of it)."""
    return isinstance(reason, str) and reason.startswith(ERASED_PREFIX)


class Tombstones:
    """The tombstones under a store root."""

    def __init__(self, root: StorageRoot) -> None:
        self.root = root
        self._key: bytes | None = None  # once made, a store's key never changes: cached

    def add(self, identity_id: str) -> str:
        """Tombstone `identity_id` (again: the date is renewed); returns the date."""
        name = self._name(identity_id, self._key_for_writing())
        erased_on = dt.datetime.now(dt.timezone.utc).date().isoformat()
        self.root.write_json(f"{TOMBSTONES_DIR}/{name}", {"erased_on": erased_on})
        return erased_on

    def erased_on(self, identity_id: str) -> str | None:
        """The date `identity_id` was erased, or None if it has no tombstone."""
        key = self._read_key()
        if key is None:
            return None
        try:
            document = self.root.read_json(f"{TOMBSTONES_DIR}/{self._name(identity_id, key)}", _MAX_TOMBSTONE_BYTES)
        except FileNotFoundError:
            return None
        return str(document.get("erased_on", "an unknown date")) if isinstance(document, dict) else "an unknown date"

    def erased(self, identity_ids: Iterable[str]) -> dict[str, str]:
        """{id: date} of the tombstoned ones among `identity_ids` (one listing, one read per hit)."""
        ids = list(dict.fromkeys(identity_ids))
        key = self._read_key() if ids else None
        if key is None:
            return {}
        present = set(self.root.children(TOMBSTONES_DIR))
        hits = [i for i in ids if self._name(i, key) in present]
        return {i: self.erased_on(i) or "an unknown date" for i in hits}

    def remove(self, identity_id: str) -> bool:
        """Remove the tombstone (`pv-ray reinstate`); False if there was none."""
        key = self._read_key()
        return key is not None and self.root.delete(f"{TOMBSTONES_DIR}/{self._name(identity_id, key)}")

    @staticmethod
    def _name(identity_id: str, key: bytes) -> str:
        # Of the id's case-folded key: ids are unique case-insensitively, so erasing `alice` bars `Alice` too.
        return hmac.new(key, identity_key(validate_identity_id(identity_id)).encode(), hashlib.sha256).hexdigest()

    def _read_key(self) -> bytes | None:
        if self._key is None:
            try:
                text = self.root.read_bytes(f"{TOMBSTONES_DIR}/{KEY_NAME}", 1024).decode().strip()
            except FileNotFoundError:
                return None
            self._key = bytes.fromhex(text)
            if len(self._key) != KEY_BYTES:
                self._key = None
                raise ValueError(f"{self.root.uri}/{TOMBSTONES_DIR}/{KEY_NAME} is not a {KEY_BYTES}-byte hex key")
        return self._key

    def _key_for_writing(self) -> bytes:
        """The store's key, made now if it has none. Made under the store's `tombstones` lock: two
        first erasures at once must agree on one key, or the tombstone made with the other would
        never be found again (a conditional create alone is not atomic on every file system)."""
        key = self._read_key()
        if key is not None:
            return key
        path = self.root.path(TOMBSTONES_DIR, KEY_NAME)
        with self.root.lock(TOMBSTONES_DIR):
            self.root.fs.invalidate_cache()
            key = self._read_key()
            if key is not None:  # made by another erasure while this one waited for the lock
                return key
            self.root.fs.makedirs(self.root.path(TOMBSTONES_DIR), exist_ok=True)
            self.root.write_bytes(f"{TOMBSTONES_DIR}/{KEY_NAME}", secrets.token_hex(KEY_BYTES).encode())
        key = self._read_key()
        if key is None:
            raise FileNotFoundError(f"{self.root.uri_of(path)} vanished after it was written")
        return key
