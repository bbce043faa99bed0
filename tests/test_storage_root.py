"""Storage roots: local paths made absolute, transient errors retried, persistent ones named."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pv_ray.storage.root import StorageRoot, StorageUnavailable, with_retries
from pv_ray.storage.uris import absolute_uri, is_remote, scheme_of


def test_local_paths_become_absolute_and_uris_stay(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert absolute_uri("out/personalize") == str(tmp_path / "out" / "personalize")
    assert absolute_uri("file://out") == str(tmp_path / "out")
    assert absolute_uri("~/x") == os.path.expanduser("~/x")
    assert absolute_uri("s3://bucket/run") == "s3://bucket/run"
    assert absolute_uri("memory://a/b") == "memory://a/b"
    assert [is_remote(u) for u in ("out", "/a", "file:///a", "~/x", "s3://b/k", "memory://a")] == [False] * 4 + [
        True
    ] * 2
    assert (scheme_of("s3://b/k"), scheme_of("file:///a"), scheme_of("out")) == ("s3", "file", "file")
    assert StorageRoot("out").uri == f"file://{tmp_path / 'out'}"


def test_transient_errors_are_retried_then_succeed():
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("connection reset by peer")
        return "bytes"

    assert with_retries("reading x", flaky, attempts=4, base_delay_s=0.001) == "bytes"
    assert len(calls) == 3


def test_persistent_errors_name_the_operation_after_every_attempt():
    calls = []

    def down() -> None:
        calls.append(1)
        raise TimeoutError("read timed out")

    with pytest.raises(
        StorageUnavailable, match=r"reading s3://b/x failed 3 times; last error: TimeoutError\('read timed out'\)"
    ):
        with_retries("reading s3://b/x", down, attempts=3, base_delay_s=0.001)
    assert len(calls) == 3


@pytest.mark.parametrize("error", [FileNotFoundError("gone"), PermissionError("denied"), ValueError("bad")])
def test_errors_a_retry_cannot_fix_are_raised_at_once(error):
    calls = []

    def fails() -> None:
        calls.append(1)
        raise error

    with pytest.raises(type(error)):
        with_retries("op", fails, attempts=5, base_delay_s=0.001)
    assert len(calls) == 1


def test_json_documents_are_written_whole(tmp_path: Path):
    root = StorageRoot(str(tmp_path))
    uri = root.write_json("batches/b1/report.json", {"a": 1})
    assert uri == f"file://{tmp_path}/batches/b1/report.json" and root.read_json("batches/b1/report.json") == {"a": 1}
    assert [p.name for p in (tmp_path / "batches" / "b1").iterdir()] == ["report.json"]  # no temporary left
    for bad in ("../x.json", "adapters/a/x.json", "/abs.json"):
        with pytest.raises(ValueError, match="relpath"):
            root.write_json(bad, {})
