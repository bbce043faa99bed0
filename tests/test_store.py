from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from pv_ray.storage.adapter_folder import METADATA_NAME, WEIGHTS_NAME
from pv_ray.storage.adapter_store import (
    COMPLETE_MARK,
    AdapterCorrupted,
    AdapterExists,
    AdapterNotFound,
    AdapterStore,
    AdapterTooLarge,
)
from pv_ray.storage.identity import InvalidIdentityId

from conftest import S3_BUCKET as BUCKET


@pytest.fixture(params=["local", "file", "memory", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> AdapterStore:
    kind = request.param
    if kind == "local":
        return AdapterStore(str(tmp_path / "store"))
    if kind == "file":
        return AdapterStore(f"file://{tmp_path}/store")
    if kind == "memory":
        return AdapterStore(f"memory://pv-ray-{uuid.uuid4().hex}")
    endpoint = request.getfixturevalue("s3_endpoint")
    options: dict[str, Any] = {
        "key": "x",
        "secret": "x",
        "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
    }
    return AdapterStore(f"s3://{BUCKET}/run-{uuid.uuid4().hex}", storage_options=options)


def write_adapter(folder: Path, identity_id: str, seed: int = 0) -> Path:
    """What the adapter writer leaves on local disk: safetensors weights + adapter.json."""
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    save_file(
        {"unet.down.lora.down.weight": torch.randn(4, 8, generator=generator)},
        str(folder / WEIGHTS_NAME),
    )
    (folder / METADATA_NAME).write_text(json.dumps({"identity_id": identity_id, "rank": 4}))
    return folder


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_put_get_fetch_round_trip(store: AdapterStore, tmp_path: Path) -> None:
    src = write_adapter(tmp_path / "src", "alice")
    assert not store.exists("alice")

    record = store.put("alice", src)

    assert store.exists("alice")
    assert store.list_identities() == ["alice"]
    assert store.incomplete() == []
    expected = {name: sha256_of(src / name) for name in (WEIGHTS_NAME, METADATA_NAME)}
    assert record.sha256 == expected
    assert store.checksums("alice") == expected
    got = store.get("alice")
    assert got == record
    assert got.metadata == {"identity_id": "alice", "rank": 4}
    assert got.uri.endswith("/adapters/alice")
    assert got.weights_uri == f"{got.uri}/{WEIGHTS_NAME}"
    store.verify("alice")

    out = store.fetch("alice", tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == sorted([METADATA_NAME, WEIGHTS_NAME])
    assert (out / WEIGHTS_NAME).read_bytes() == (src / WEIGHTS_NAME).read_bytes()
    torch.testing.assert_close(load_file(str(out / WEIGHTS_NAME)), load_file(str(src / WEIGHTS_NAME)))
    assert store.read_weights_bytes("alice") == (src / WEIGHTS_NAME).read_bytes()
    # No temporary prefix is left behind by a successful put.
    assert [Path(p).name for p in store.fs.ls(store.root.path("adapters"), detail=False)] == ["alice"]


def test_put_refuses_to_replace_unless_overwrite(store: AdapterStore, tmp_path: Path) -> None:
    store.put("bob", write_adapter(tmp_path / "v1", "bob", seed=1))
    v2 = write_adapter(tmp_path / "v2", "bob", seed=2)
    with pytest.raises(AdapterExists, match="pass overwrite=True"):
        store.put("bob", v2)

    store.put("bob", v2, overwrite=True)

    assert store.read_weights_bytes("bob") == (v2 / WEIGHTS_NAME).read_bytes()
    store.verify("bob")


def test_crash_before_the_mark_is_incomplete_not_existing(store: AdapterStore, tmp_path: Path) -> None:
    store.put("done", write_adapter(tmp_path / "done", "done"))
    src = write_adapter(tmp_path / "crashed", "crashed")
    # A crash after the files were moved into place but before _COMPLETE was written.
    crashed_dir = store.root.path("adapters", "crashed")
    store.fs.makedirs(crashed_dir, exist_ok=True)
    for name in (WEIGHTS_NAME, METADATA_NAME):
        store.fs.put_file(str(src / name), f"{crashed_dir}/{name}")

    assert not store.exists("crashed")
    assert store.list_identities() == ["done"]
    assert store.incomplete() == ["crashed"]
    with pytest.raises(AdapterNotFound, match="no complete adapter 'crashed'"):
        store.get("crashed")
    with pytest.raises(AdapterNotFound):
        store.fetch("crashed", tmp_path / "out")

    # Retrying the identity completes it; deleting a leftover also works.
    store.put("crashed", src)
    assert store.list_identities() == ["crashed", "done"]
    assert store.incomplete() == []
    store.delete("crashed")
    assert store.list_identities() == ["done"]
    with pytest.raises(AdapterNotFound):
        store.delete("crashed")


def test_tampered_weights_are_detected(store: AdapterStore, tmp_path: Path) -> None:
    store.put("eve", write_adapter(tmp_path / "src", "eve"))
    weights = store.root.path("adapters", "eve", WEIGHTS_NAME)
    data = bytearray(store.fs.cat_file(weights))
    data[-1] ^= 0xFF
    store.fs.pipe_file(weights, bytes(data))

    assert store.exists("eve")  # the mark is still there: exists() does not hash
    with pytest.raises(AdapterCorrupted, match="does not match"):
        store.fetch("eve", tmp_path / "out")
    assert not (tmp_path / "out" / WEIGHTS_NAME).exists()
    assert list((tmp_path / "out").iterdir()) == []
    with pytest.raises(AdapterCorrupted):
        store.read_weights_bytes("eve")
    with pytest.raises(AdapterCorrupted):
        store.verify("eve")


def test_tampered_metadata_is_detected_by_get(store: AdapterStore, tmp_path: Path) -> None:
    store.put("meta", write_adapter(tmp_path / "src", "meta"))
    store.fs.pipe_file(store.root.path("adapters", "meta", METADATA_NAME), b'{"identity_id": "x"}')
    with pytest.raises(AdapterCorrupted, match=METADATA_NAME):
        store.get("meta")


@pytest.mark.parametrize("bad", ["../x", "a/b", "", ".hidden", "..", "a\x00b"])
def test_invalid_ids_are_refused_before_any_path_use(store: AdapterStore, tmp_path: Path, bad: str) -> None:
    src = write_adapter(tmp_path / "src", "whoever")
    for call in (
        lambda: store.put(bad, src),
        lambda: store.exists(bad),
        lambda: store.get(bad),
        lambda: store.fetch(bad, tmp_path / "out"),
        lambda: store.read_weights_bytes(bad),
        lambda: store.delete(bad),
        lambda: store.checksums(bad),
    ):
        with pytest.raises(InvalidIdentityId):
            call()
    assert not store.fs.exists(store.root.path("adapters"))


def test_pagination(store: AdapterStore, tmp_path: Path) -> None:
    ids = [f"id{i:02d}" for i in range(7)]
    for identity_id in reversed(ids):
        store.put(identity_id, write_adapter(tmp_path / identity_id, identity_id))

    pages, cursor = [], None
    while page := store.list_identities(limit=3, start_after=cursor):
        pages.append(page)
        cursor = page[-1]

    assert pages == [ids[0:3], ids[3:6], ids[6:7]]
    assert store.list_identities(limit=0) == []
    assert store.list_identities(start_after="id04") == ["id05", "id06"]


def test_metadata_for_another_identity_is_refused(store: AdapterStore, tmp_path: Path) -> None:
    src = write_adapter(tmp_path / "src", "carol")
    with pytest.raises(ValueError, match="identity_id='carol', refusing to store it as 'dave'"):
        store.put("dave", src)
    assert not store.exists("dave")


def test_batch_json_files(store: AdapterStore) -> None:
    report = {"complete": ["a"], "rejected": {"b": "no face"}}
    uri = store.root.write_json("batches/b1/report.json", report)
    assert uri.endswith("batches/b1/report.json")
    assert store.root.read_json("batches/b1/report.json") == report
    with pytest.raises(FileNotFoundError):
        store.root.read_json("batches/b1/rejects.json")
    for bad in ("../report.json", "/abs.json", "a//b.json", "a/./b.json", "adapters/x/_COMPLETE"):
        with pytest.raises(ValueError, match="relpath"):
            store.root.write_json(bad, {})


def test_size_caps(tmp_path: Path) -> None:
    store = AdapterStore(str(tmp_path / "store"), max_weights_bytes=64)
    src = write_adapter(tmp_path / "src", "big")
    with pytest.raises(AdapterTooLarge, match="over the store's cap of 64"):
        store.put("big", src)

    roomy = AdapterStore(str(tmp_path / "store"))
    roomy.put("big", src)
    with pytest.raises(AdapterTooLarge):
        store.read_weights_bytes("big")
    with pytest.raises(AdapterTooLarge):
        store.fetch("big", tmp_path / "out")

    (src / METADATA_NAME).write_text(json.dumps({"pad": "x" * (1 << 20)}))
    with pytest.raises(AdapterTooLarge, match=METADATA_NAME):
        roomy.put("huge-meta", src)


def test_unreadable_mark_is_corruption(tmp_path: Path) -> None:
    store = AdapterStore(str(tmp_path / "store"))
    store.put("m", write_adapter(tmp_path / "src", "m"))
    (tmp_path / "store" / "adapters" / "m" / COMPLETE_MARK).write_text("{not json")
    with pytest.raises(AdapterCorrupted, match="not valid JSON"):
        store.get("m")


def test_crash_while_overwriting_never_looks_complete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = AdapterStore(str(tmp_path / "store"))
    store.put("x", write_adapter(tmp_path / "v1", "x", seed=1))
    move = store.fs.mv

    def move_then_crash_before_mark(src: str, dst: str, **kwargs: Any) -> None:
        if dst.endswith(COMPLETE_MARK):
            raise OSError("simulated crash before the mark")
        move(src, dst, **kwargs)

    monkeypatch.setattr(store.fs, "mv", move_then_crash_before_mark)
    with pytest.raises(OSError, match="simulated crash"):
        store.put("x", write_adapter(tmp_path / "v2", "x", seed=2), overwrite=True)
    monkeypatch.undo()

    # New files are in place but the old mark is gone: neither version claims completeness.
    assert not store.exists("x")
    assert store.incomplete() == ["x"]
    assert sorted(p.name for p in (tmp_path / "store" / "adapters").iterdir()) == ["x"]
