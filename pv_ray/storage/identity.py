"""Identity ids: the one check every untrusted identity name goes through.

An identity id names a folder in the input data, a folder in the adapter store (on any file
system: Linux, a case-folding macOS or Windows mount, object storage), an MLflow tag and a Serve
model id, so it must be safe in all of them:

- ASCII letters, digits, ``.``, ``_``, ``-`` (``IDENTITY_ID_PATTERN``), at most 128 characters;
- starting with a letter or digit (no hidden files, no ``.``/``..``) and not ending with ``.``
  (Windows drops a trailing dot: ``alice.`` would be ``alice``'s folder);
- not a Windows reserved device name (``CON``, ``PRN``, ``AUX``, ``NUL``, ``COM0``-``COM9``,
  ``LPT0``-``LPT9``, in any case, alone or before an extension: ``con.txt`` too).

Two ids that differ only in case name one folder on a case-folding file system, so ids are
unique case-insensitively: ``identity_key`` is what must be unique, ``case_clashes`` finds the ids
that share one.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from pv_ray.errors import InputError

# The characters and length; `validate_identity_id` adds the rules a pattern would hide.
IDENTITY_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
_IDENTITY_ID_RE = re.compile(IDENTITY_ID_PATTERN)
MAX_IDENTITY_ID_LENGTH = 128
# Windows opens a device, not a file, for these names, whatever the extension after them.
WINDOWS_RESERVED_NAMES = frozenset(
    {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(10)), *(f"LPT{i}" for i in range(10))}
)


class InvalidIdentityId(InputError):
    """An identity id that breaks one of the rules of this module."""


def _why_invalid(identity_id: str) -> str | None:
    """The reason `identity_id` (a str) is not a valid id, None when it is one."""
    # fullmatch, not match: "$" alone would accept a trailing newline.
    if not _IDENTITY_ID_RE.fullmatch(identity_id):
        if not identity_id:
            return "it is empty"
        if len(identity_id) > MAX_IDENTITY_ID_LENGTH:
            return f"it is {len(identity_id)} characters long (max {MAX_IDENTITY_ID_LENGTH})"
        if not (identity_id[0].isascii() and identity_id[0].isalnum()):
            return f"it starts with {identity_id[0]!r} (must start with an ASCII letter or digit)"
        bad = sorted({c for c in identity_id if not re.fullmatch(r"[A-Za-z0-9._-]", c)})
        return f"it contains forbidden characters {bad!r} (allowed: A-Z a-z 0-9 . _ -)"
    if identity_id.endswith("."):
        return "it ends with '.' (Windows drops a trailing dot, so it would name another id's folder)"
    stem = identity_id.split(".", 1)[0]
    if stem.upper() in WINDOWS_RESERVED_NAMES:
        return f"{stem!r} is a reserved device name on Windows (CON, PRN, AUX, NUL, COM0-9, LPT0-9)"
    return None


def validate_identity_id(identity_id: object) -> str:
    """Return ``identity_id`` unchanged if it is a valid id, else raise ``InvalidIdentityId``."""
    if not isinstance(identity_id, str):
        raise InvalidIdentityId(f"identity id must be a str, got {type(identity_id).__name__}: {identity_id!r}")
    reason = _why_invalid(identity_id)
    if reason is not None:
        raise InvalidIdentityId(f"invalid identity id {identity_id!r}: {reason}")
    return identity_id


def is_valid_identity_id(identity_id: object) -> bool:
    """True if ``identity_id`` would pass ``validate_identity_id``."""
    return isinstance(identity_id, str) and _why_invalid(identity_id) is None


def identity_key(identity_id: str) -> str:
    """What must be unique among ids: the id case-folded (ids are ASCII, so lower() is exact)."""
    return identity_id.lower()


def case_clashes(identity_ids: Iterable[str]) -> dict[str, list[str]]:
    """The ids that share an `identity_key` with another of `identity_ids`: id -> all ids of its
    group, sorted (empty when every id is unique case-insensitively)."""
    groups: dict[str, list[str]] = {}
    for identity_id in identity_ids:
        groups.setdefault(identity_key(identity_id), []).append(identity_id)
    return {i: sorted(group) for group in groups.values() if len(set(group)) > 1 for i in group}
