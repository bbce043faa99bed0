"""The batch job on a real local Ray cluster, with the real MLflow stores and an S3 server."""

from __future__ import annotations

import io
import itertools
import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load

from pv_ray.cluster.batch import asked_for_early, run_batch
from pv_ray.config import load_config
from pv_ray.presets.demo import demo_photos
from pv_ray.storage.adapter_store import AdapterStore
from pv_ray.storage.tracking import Tracker

from conftest import S3_BUCKET, s3_options

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
FAST = ["train.steps=2", "eval.num_prompts=1", "eval.num_frames=2", "eval.num_inference_steps=2"]


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def faces() -> list[Image.Image]:
    return [portrait for portrait, _ in demo_photos().values()]


def write_tree(fs_put, faces: list[Image.Image]) -> dict[str, str]:
    """The mixed input tree; returns identity → what should happen to it."""
    grey = Image.new("RGB", (256, 256), (120, 120, 120))
    tree = {
        "alice/a.png": png(faces[0]),
        "alice/b.jpg": jpeg(faces[0].transpose(Image.Transpose.FLIP_LEFT_RIGHT)),
        "bob/good.png": png(faces[1]),
        "bob/corrupt.jpg": jpeg(faces[1])[:1500],  # a truncated JPEG among good photos
        "frank/photo.png": png(faces[2]),
        "frank/meta.json": json.dumps({"class": "man"}).encode(),
        "carol/wall.png": png(grey),  # no face
        "dave/.keep-empty": b"",  # a folder with no photo
        "erin/photo.jpg": b"this is a text file, not a JPEG",
        "bad id!/photo.png": png(faces[3]),  # an invalid identity id
    }
    for path, data in tree.items():
        fs_put(path, data)
    return {
        "alice": "done",
        "bob": "done",
        "frank": "done",
        "carol": "rejected",
        "dave": "rejected",
        "erin": "rejected",
        "bad id!": "rejected",
    }


def local_put(root: Path):
    def put(path: str, data: bytes) -> None:
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)

    return put


def test_mixed_tree_two_workers_then_resume(tmp_path, faces, ray_cluster):
    expected = write_tree(local_put(tmp_path / "in"), faces)
    cfg = load_config(TINY, FAST)
    report = run_batch(cfg, str(tmp_path / "in"), str(tmp_path / "out"), workers=2)

    store = AdapterStore(str(tmp_path / "out"))
    done = [i for i, s in expected.items() if s == "done"]
    assert store.list_identities() == sorted(done)
    assert report.counts["done"] == 3 and report.counts["failed"] == 0 and report.counts["rejected"] == 4
    assert (
        report.counts["total"]
        == 7
        == report.counts["done"] + report.counts["failed"] + report.counts["skipped"] + report.counts["rejected"]
    )
    for identity_id, status in expected.items():
        assert report.identities[identity_id]["status"] == status, (identity_id, report.identities[identity_id])

    rejects = json.loads((tmp_path / "out" / "rejects.json").read_text())["rejects"]
    by_id = {(r["identity_id"], r["photo"]): r["reason"] for r in rejects}
    assert "no face detected" in by_id[("carol", None)]
    assert "no photos" in by_id[("dave", None)]
    assert "not an image" in by_id[("erin", None)]
    assert "invalid identity id" in by_id[("bad id!", None)]
    assert "unreadable" in by_id[("bob", "corrupt.jpg")]
    on_disk = json.loads((tmp_path / "out" / "report.json").read_text())
    assert on_disk["counts"] == report.counts and on_disk["batch_id"] == report.batch_id
    assert {e["worker"] for e in on_disk["identities"].values() if e["status"] == "done"} <= {0, 1}
    # per worker loop: how much of its wall time went into tuning steps
    loops = on_disk["worker_loops"]
    assert sorted(w["rank"] for w in loops) == [0, 1] and sum(w["identities_tuned"] for w in loops) == 3
    tuned_seconds = sum(on_disk["identities"][i]["tune_seconds"] for i in done)
    assert sum(w["tune_seconds"] for w in loops) == pytest.approx(tuned_seconds, abs=0.01)
    assert all(0 < w["tune_seconds"] < w["wall_seconds"] for w in loops if w["identities_tuned"])
    # MLflow's share of each loop (lock waits included), for the scale benchmark
    assert all(0 < w["tracking_seconds"] < w["wall_seconds"] for w in loops)
    # the backbone load is part of the wall time and not of the tuning; CPU time is this process's
    assert all(0 < w["load_seconds"] < w["wall_seconds"] - w["tune_seconds"] for w in loops)
    assert all(
        w["cpu_seconds"] > 0 and w["cpu_per_wall"] == pytest.approx(w["cpu_seconds"] / w["wall_seconds"], abs=2e-3)
        for w in loops
    )
    assert (
        on_disk["step_efficiency"]
        == report.step_efficiency
        == pytest.approx(sum(w["tune_seconds"] for w in loops) / sum(w["wall_seconds"] for w in loops), abs=1e-3)
    )

    # MLflow: one nested run per tuned identity, with per-step metrics and the adapter
    tracker = Tracker(report.tracking_uri)
    runs = tracker.find_identity_runs(report.batch_id)
    assert sorted(r.data.tags["identity_id"] for r in runs) == sorted(done)
    for run in runs:
        assert run.info.status == "FINISHED"
        assert [m.step for m in tracker.client.get_metric_history(run.info.run_id, "loss")] == [1, 2]
        assert "face_sim_after" in run.data.metrics
        assert {a.path for a in tracker.client.list_artifacts(run.info.run_id, "adapter")} >= {
            "adapter/pytorch_lora_weights.safetensors",
            "adapter/adapter.json",
        }

    # a rerun of the same job retrains nothing
    mtimes = {
        i: (tmp_path / "out" / "adapters" / i / "pytorch_lora_weights.safetensors").stat().st_mtime_ns for i in done
    }
    t0 = time.time()
    again = run_batch(cfg, str(tmp_path / "in"), str(tmp_path / "out"), workers=2)
    assert again.counts["done"] == 0 and again.counts["skipped"] == 3
    assert {
        i: (tmp_path / "out" / "adapters" / i / "pytorch_lora_weights.safetensors").stat().st_mtime_ns for i in done
    } == mtimes
    print(f"\nresume run: {time.time() - t0:.1f}s, nothing retrained")


def test_a_killed_worker_is_survived_and_nothing_is_duplicated(tmp_path, faces, ray_cluster):
    import psutil

    put = local_put(tmp_path / "in")
    ids = [f"person-{i}" for i in range(5)]
    for i, identity_id in enumerate(ids):
        put(f"{identity_id}/photo.png", png(faces[i % len(faces)]))
    cfg = load_config(TINY, ["train.steps=6", "eval.num_prompts=1", "eval.num_frames=2", "eval.num_inference_steps=2"])
    out = tmp_path / "out"
    killed: list[int] = []

    def kill_a_worker_after_first_adapter() -> None:
        deadline = time.time() + 300
        while time.time() < deadline and not killed:
            if (out / "adapters").exists() and AdapterStore(str(out)).list_identities():
                # Only this test's cluster: its raylet, and so its workers, descend from this process.
                for proc in psutil.Process(os.getpid()).children(recursive=True):
                    if "RayTrainWorker" in " ".join(proc.cmdline()):  # Ray's process title
                        os.kill(proc.pid, signal.SIGKILL)
                        killed.append(proc.pid)
                        return
            time.sleep(0.2)

    chaos = threading.Thread(target=kill_a_worker_after_first_adapter, daemon=True)
    chaos.start()
    report = run_batch(cfg, str(tmp_path / "in"), str(out), workers=2)
    chaos.join(timeout=5)
    assert killed, "the test must have killed a training worker"
    assert report.error is None
    assert AdapterStore(str(out)).list_identities() == ids
    assert report.counts["done"] + report.counts["skipped"] == 5 and report.counts["failed"] == 0
    runs = Tracker(report.tracking_uri).find_identity_runs(report.batch_id)
    assert sorted(r.data.tags["identity_id"] for r in runs) == ids, "exactly one MLflow run per identity"


def test_s3_input_and_output_with_an_mlflow_server(tmp_path, faces, ray_cluster, s3_endpoint, mlflow_server):
    import s3fs

    options = s3_options(s3_endpoint)
    fs = s3fs.S3FileSystem(**options)
    prefix = f"{S3_BUCKET}/batch-{int(time.time() * 1000)}"
    for i, identity_id in enumerate(("s3-alice", "s3-bob")):
        fs.pipe_file(f"{prefix}/in/{identity_id}/photo.png", png(faces[i]))
    cfg = load_config(TINY, FAST)
    report = run_batch(
        cfg, f"s3://{prefix}/in", f"s3://{prefix}/out", workers=2, tracking_uri=mlflow_server, storage_options=options
    )
    assert report.counts["done"] == 2
    assert AdapterStore(f"s3://{prefix}/out", options).list_identities() == ["s3-alice", "s3-bob"]
    assert fs.exists(f"{prefix}/out/report.json") and fs.exists(f"{prefix}/out/rejects.json")
    runs = Tracker(mlflow_server).find_identity_runs(report.batch_id)
    assert sorted(r.data.tags["identity_id"] for r in runs) == ["s3-alice", "s3-bob"]
    assert all(r.data.tags["adapter_uri"].startswith("s3://") for r in runs)


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        (["train.lr=1e30"], r"diverged at step [12]: (loss nan|LoRA weights norm inf)"),
        (
            ["train.face_det_thresh=1.0"],
            "no training signal: no face was detected in the generated frames at any of the 2 steps",
        ),
    ],
)
def test_an_identity_without_a_usable_adapter_is_failed_with_its_reason(
    tmp_path, faces, ray_cluster, overrides, reason
):
    """Nothing reaches the store; the report says why; its MLflow run is FAILED with the
    traceback as an artifact; the CLI-facing counts say failed, not done."""
    local_put(tmp_path / "in")("alice/a.png", png(faces[0]))
    report = run_batch(load_config(TINY, [*FAST, *overrides]), str(tmp_path / "in"), str(tmp_path / "out"), workers=1)
    assert report.counts["failed"] == 1 and report.counts["done"] == 0
    assert report.identities["alice"]["status"] == "failed" and re.match(reason, report.identities["alice"]["reason"])
    store = AdapterStore(str(tmp_path / "out"))
    assert store.list_identities() == [] and store.incomplete() == []
    tracker = Tracker(report.tracking_uri)
    (run,) = tracker.find_identity_runs(report.batch_id)
    assert run.info.status == "FAILED" and re.match(reason, run.data.tags["failure_reason"])
    traceback = Path(tracker.client.download_artifacts(run.info.run_id, "failure.txt", str(tmp_path))).read_text()
    assert "Traceback (most recent call last)" in traceback and re.search(reason, traceback)


def test_storage_errors_are_retried_then_failed_never_rejected(tmp_path, faces, ray_cluster, s3_endpoint):
    """Behind a proxy that answers 503: an identity whose photo fails its first reads is still
    tuned; one whose photo always fails is failed with the storage reason (not rejected, which
    means bad input) while the others complete; once storage heals, a rerun tunes it."""
    import s3fs
    from flaky_proxy import FlakyProxy

    proxy = FlakyProxy(s3_endpoint)
    # The S3 client's own retries off, so pv-ray's are what recovers (a client out of retries).
    options = s3_options(proxy.url) | {"config_kwargs": {"retries": {"max_attempts": 1}}}
    prefix = f"{S3_BUCKET}/flaky-{int(time.time() * 1000)}"
    fs = s3fs.S3FileSystem(**s3_options(s3_endpoint))
    for i, identity_id in enumerate(("steady", "flaky-a", "flaky-b")):
        fs.pipe_file(f"{prefix}/in/{identity_id}/photo.png", png(faces[i]))
    proxy.failures = {"in/flaky-a/photo.png": 3, "in/flaky-b/photo.png": -1}
    cfg = load_config(TINY, FAST)
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"  # an s3:// output has no default tracking store
    try:
        report = run_batch(
            cfg, f"s3://{prefix}/in", f"s3://{prefix}/out", workers=1, storage_options=options, tracking_uri=tracking
        )
        assert {i: e["status"] for i, e in report.identities.items()} == {
            "steady": "done",
            "flaky-a": "done",
            "flaky-b": "failed",
        }
        assert report.identities["flaky-b"]["reason"].startswith(
            "storage error (retried by the next run): reading s3://"
        )
        assert "failed 4 times" in report.identities["flaky-b"]["reason"]
        assert report.counts["rejected"] == 0 and sum("flaky-a" in p for p in proxy.failed) == 3
        proxy.failures = {}
        again = run_batch(
            cfg, f"s3://{prefix}/in", f"s3://{prefix}/out", workers=1, storage_options=options, tracking_uri=tracking
        )
        assert {i: e["status"] for i, e in again.identities.items()} == {
            "steady": "skipped",
            "flaky-a": "skipped",
            "flaky-b": "done",
        }
        assert AdapterStore(f"s3://{prefix}/out", options).list_identities() == ["flaky-a", "flaky-b", "steady"]
    finally:
        proxy.close()


def test_workers_tune_identities_in_groups_of_identities_per_batch(tmp_path, faces, ray_cluster):
    """train.identities_per_batch=2, three identities, one worker: a group of two tuned in one
    rollout and one alone; each has its own adapter, report entry and FINISHED MLflow run."""
    put = local_put(tmp_path / "in")
    for name, face in zip(("alice", "bob", "frank"), faces):
        put(f"{name}/a.png", png(face))
    cfg = load_config(TINY, [*FAST, "train.identities_per_batch=2"])
    report = run_batch(cfg, str(tmp_path / "in"), str(tmp_path / "out"), workers=1)
    assert report.counts["done"] == 3 and report.counts["failed"] == 0
    groups = sorted(sorted(entry["tuned_with"]) for entry in report.identities.values())
    assert sorted(len(group) for group in groups) == [1, 2, 2]
    (pair,) = {tuple(group) for group in groups if len(group) == 2}
    assert all(report.identities[name]["tuned_with"] == report.identities[pair[0]]["tuned_with"] for name in pair)
    store = AdapterStore(str(tmp_path / "out"))
    assert store.list_identities() == ["alice", "bob", "frank"]
    weights = [load(store.read_weights_bytes(name)) for name in ("alice", "bob", "frank")]
    for a, b in itertools.combinations(weights, 2):
        assert a.keys() == b.keys() and any(not torch.equal(a[key], b[key]) for key in a)
    tracker = Tracker(report.tracking_uri)
    runs = tracker.find_identity_runs(report.batch_id)
    assert [r.info.status for r in runs] == ["FINISHED"] * 3
    for run in runs:
        losses = tracker.client.get_metric_history(run.info.run_id, "loss")
        assert sorted(point.step for point in losses) == [1, 2] and all(point.value == point.value for point in losses)


def test_tuning_starts_before_ingest_ends(tmp_path, faces, ray_cluster, s3_endpoint):
    """The analysis streams into the trainer: with the last identity's photo slow to read (a
    slow bucket), the first identity is tuned and done before the last one is analysed."""
    import s3fs
    from flaky_proxy import FlakyProxy

    proxy = FlakyProxy(s3_endpoint)
    prefix = f"{S3_BUCKET}/stream-{int(time.time() * 1000)}"
    fs = s3fs.S3FileSystem(**s3_options(s3_endpoint))
    for i, identity_id in enumerate(("aa-first", "bb-second")):
        fs.pipe_file(f"{prefix}/in/{identity_id}/photo.png", png(faces[i]))
    for k in range(4):  # read one after the other, each held back for less than s3fs's 15 s read timeout
        fs.pipe_file(f"{prefix}/in/zz-slow/photo-{k}.png", png(faces[2].rotate(k)))
    proxy.delays = {"in/zz-slow/photo-": 10.0}
    try:
        report = run_batch(
            load_config(TINY, FAST), f"s3://{prefix}/in", f"s3://{prefix}/out", workers=1,
            storage_options=s3_options(proxy.url), tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        )  # fmt: skip
    finally:
        proxy.close()
    entries = report.identities
    assert {i: e["status"] for i, e in entries.items()} == dict.fromkeys(("aa-first", "bb-second", "zz-slow"), "done")
    first_done = min(e["finished"] for e in entries.values())
    assert first_done < entries["zz-slow"]["analysed"], entries
    assert all(e["analysed"] <= e["started"] <= e["finished"] for e in entries.values())
    on_disk = json.loads(fs.cat_file(f"{prefix}/out/report.json"))
    assert on_disk["identities"]["zz-slow"]["analysed"] == entries["zz-slow"]["analysed"]


def test_a_worker_asks_for_its_first_row_at_once_and_for_no_other_ahead():
    """Ray Data starts the analysis when a worker first asks for a row: the worker asks before it
    loads its backbone, for one row only (the split gives rows to whichever worker asks)."""
    produced: list[str] = []
    first_asked = threading.Event()

    def rows():
        for identity_id in ("a", "b", "c"):
            produced.append(identity_id)
            first_asked.set()
            yield {"identity_id": identity_id}

    early = asked_for_early(rows())
    assert first_asked.wait(10), "the first row is asked for before anyone iterates"
    time.sleep(0.2)
    assert produced == ["a"], "no second row is taken ahead"
    assert [row["identity_id"] for row in early] == ["a", "b", "c"]
    assert list(asked_for_early(iter([]))) == []

    def failing():
        raise RuntimeError("the dataset failed")
        yield

    with pytest.raises(RuntimeError, match="the dataset failed"):
        list(asked_for_early(failing()))
