"""Where a path points: the one place that decides whether a location is local or remote, and
makes a local one absolute.

A location is a local path (`out`, `~/out`, `/data/out`, `file:///data/out`) or a URI of an fsspec
filesystem (`s3://bucket/out`, `memory://x`). Local paths are made absolute before anything else
sees them: Ray Train workers and Serve replicas run in working directories of their own.
"""

from __future__ import annotations

import os


def is_remote(location: str) -> bool:
    """Whether `location` names another filesystem than this machine's (a scheme other than file://)."""
    return "://" in location.removeprefix("file://")


def scheme_of(location: str) -> str:
    """The URI scheme (`s3`), "file" for a local path."""
    return location.split("://", 1)[0] if is_remote(location) else "file"


def absolute_uri(location: str) -> str:
    """`location` with a local path (plain or `file://`) made absolute; other URIs unchanged."""
    if is_remote(location):
        return location
    return os.path.abspath(os.path.expanduser(location.removeprefix("file://")))
