"""Identity ids: the one check every untrusted identity name goes through.

An identity id names a folder in the input data, a folder in the adapter store, an MLflow tag
and a Serve model id, so it must be safe in all of them: ASCII letters, digits, ``.``, ``_``,
``-``; starting with a letter or digit (no hidden files, no ``.``/``..``); at most 128 chars.
"""

from __future__ import annotations

import re

from pv_ray.errors import InputError

IDENTITY_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
_IDENTITY_ID_RE = re.compile(IDENTITY_ID_PATTERN)
MAX_IDENTITY_ID_LENGTH = 128


class InvalidIdentityId(InputError):
    """An identity id that does not match ``IDENTITY_ID_PATTERN``."""


def validate_identity_id(identity_id: object) -> str:
    """Return ``identity_id`` unchanged if it is a valid id, else raise ``InvalidIdentityId``."""
    if not isinstance(identity_id, str):
        raise InvalidIdentityId(f"identity id must be a str, got {type(identity_id).__name__}: {identity_id!r}")
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
