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


def test_two_writers_of_one_identity_never_mix_files(store: AdapterStore, tmp_path: Path) -> None:
    """Two `--force` runs putting one identity at once: whoever wins, the stored files are all that
    writer's and match the mark (each writer checks its mark and files after writing, and writes
    again if the other's files landed over its own)."""
    import threading

    sources = [write_adapter(tmp_path / f"w{i}", "twin", seed=i) for i in range(2)]
    (sources[1] / METADATA_NAME).write_text(json.dumps({"identity_id": "twin", "rank": 4, "writer": 1}))
    errors: list[BaseException] = []

    def put(src: Path, barrier: threading.Barrier) -> None:
        barrier.wait()
        try:
            store.put("twin", src, overwrite=True)
        except BaseException as e:
            errors.append(e)

    for _ in range(6):
        barrier = threading.Barrier(2)
        threads = [threading.Thread(target=put, args=(src, barrier)) for src in sources]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        store.verify("twin")
        weights, metadata = store.read_weights_bytes("twin"), store.get("twin").metadata
        (winner,) = [src for src in sources if (src / WEIGHTS_NAME).read_bytes() == weights]
        assert metadata == json.loads((winner / METADATA_NAME).read_text())
        assert store.incomplete() == [] and store.staging_folders("twin") == []


def test_an_erased_identity_is_not_found_nor_written_until_reinstated(store: AdapterStore, tmp_path: Path) -> None:
    from pv_ray.storage.adapter_store import IdentityErased
    from pv_ray.storage.tombstones import TOMBSTONES_DIR

    src = write_adapter(tmp_path / "src", "gone")
    store.put("gone", src)
    store.put("kept", write_adapter(tmp_path / "kept", "kept"))
    erased_on = store.tombstones.add("gone")

    assert not store.exists("gone") and store.list_identities() == ["kept"]
    for call in (lambda: store.get("gone"), lambda: store.read_weights_bytes("gone"), lambda: store.verify("gone")):
        with pytest.raises(IdentityErased, match=f"erased on {erased_on}; `pv-ray reinstate gone`"):
            call()
    with pytest.raises(IdentityErased):
        store.put("gone", src, overwrite=True)
    assert store.tombstones.erased(["gone", "kept", "never"]) == {"gone": erased_on}
    assert store.tombstones.erased(["GONE", "Gone"]) == {"GONE": erased_on, "Gone": erased_on}  # one person

    # The tombstone holds no personal data: a keyed hash, and the date.
    names = store.root.children(TOMBSTONES_DIR)
    assert len(names) == 2 and "key" in names
    (tombstone,) = [n for n in names if n != "key"]
    assert len(tombstone) == 64 and "gone" not in tombstone
    assert store.root.read_json(f"{TOMBSTONES_DIR}/{tombstone}") == {"erased_on": erased_on}

    assert store.tombstones.remove("gone") and not store.tombstones.remove("gone")
    assert store.exists("gone")
    store.put("gone", src, overwrite=True)


def test_first_erasures_at_once_agree_on_the_store_key(tmp_path: Path) -> None:
    """Eight first erasures at once on a store with no key yet (each its own store object, as
    parallel `pv-ray delete` processes have): every tombstone is found with the key that stays."""
    from concurrent.futures import ThreadPoolExecutor

    ids = [f"person-{i}" for i in range(8)]
    with ThreadPoolExecutor(len(ids)) as pool:
        list(pool.map(lambda i: AdapterStore(str(tmp_path / "store")).tombstones.add(i), ids))
    assert sorted(AdapterStore(str(tmp_path / "store")).tombstones.erased(ids)) == ids


def test_staging_folders_are_told_apart_by_identity(tmp_path: Path) -> None:
    """`.tmp-<id>-<uuid>` upload prefixes (in flight, or left by a crash) are found for their own
    identity only, also when one id is a prefix of another."""
    store = AdapterStore(str(tmp_path / "store"))
    adapters = tmp_path / "store" / "adapters"
    for name, owner in ((".tmp-alice-xyz", "alice"), (f".tmp-alice-b-{uuid.uuid4().hex}", None), (".tmp-alice-", None)):
        write_adapter(adapters / name, owner or "someone")
        if owner is None:
            (adapters / name / METADATA_NAME).unlink()
    assert [Path(u).name for u in store.staging_folders("alice")] == [".tmp-alice-", ".tmp-alice-xyz"]
    assert [Path(u).name for u in store.staging_folders("alice-b")] == [sorted(p.name for p in adapters.iterdir())[1]]
    removed = store.remove_staging("alice")
    assert len(removed) == 2 and sorted(p.name for p in adapters.iterdir()) == [
        Path(store.staging_folders("alice-b")[0]).name
    ]


def test_the_store_lock_serialises_read_modify_writes(store: AdapterStore) -> None:
    """Two processes' worth of read-modify-write on one document lose no update: an fcntl lock on
    a local root, a conditional-write lease on S3, a process lock in memory."""
    import threading

    store.root.write_json("counter.json", {"n": 0})

    def bump() -> None:
        for _ in range(5):
            with store.root.lock("documents"):
                n = store.root.read_json("counter.json")["n"]
                store.root.write_json("counter.json", {"n": n + 1})

    threads = [threading.Thread(target=bump) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.root.read_json("counter.json") == {"n": 10}


@pytest.mark.parametrize(
    ("metadata", "reason"),
    [
        ({"unet.r": 4, "unet.lora_alpha": float("nan")}, r"alpha nan is not in \(0, 10000 \* rank\]"),
        ({"unet.r": 4, "unet.lora_alpha": float("inf")}, "alpha inf is not in"),
        ({"unet.r": 4, "unet.lora_alpha": 1e30}, "alpha 1e\\+30 is not in"),
        ({"unet.r": 4, "unet.lora_alpha": -1.0}, "alpha -1.0 is not in"),
        ({"unet.r": 0, "unet.lora_alpha": 4.0}, r"rank 0 is not the weights' rank \(4\)"),
        ({"unet.r": 8, "unet.lora_alpha": 4.0}, r"rank 8 is not the weights' rank \(4\)"),
    ],
)
def test_adapter_metadata_out_of_range_is_refused_when_read(metadata: dict, reason: str) -> None:
    """A stored adapter's alpha and rank are checked as it is read: never a division by zero or a
    garbage video."""
    from safetensors.torch import save

    from pv_ray.storage.adapter_folder import AdapterFileError, LoraWeights

    tensors = {"unet.a.lora.down.weight": torch.ones(4, 8), "unet.a.lora.up.weight": torch.ones(8, 4)}
    data = save(tensors, metadata={"lora_adapter_metadata": json.dumps(metadata)})
    with pytest.raises(AdapterFileError, match=f"alice: LoRA {reason}"):
        LoraWeights.from_bytes(data, source="alice")
    nan = save({**tensors, "unet.a.lora.up.weight": torch.full((8, 4), float("nan"))})
    with pytest.raises(AdapterFileError, match="up.weight holds values that are not finite"):
        LoraWeights.from_bytes(nan, source="alice")
    read = LoraWeights.from_bytes(
        save(tensors, metadata={"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 8.0})})
    )
    assert (read.rank, read.alpha) == (4, 8.0)


def test_active_fraction_out_of_range_is_refused() -> None:
    from pv_ray.storage.adapter_folder import recorded_active_fraction

    for bad in (0, -0.5, 1.5, float("nan"), float("inf"), "0.5", True):
        with pytest.raises(ValueError, match=r"active_fraction .* is not in \(0, 1\]"):
            recorded_active_fraction({"config": {"adapter": {"active_fraction": bad}}}, 0.4)
    assert recorded_active_fraction({}, 0.4) == 0.4
