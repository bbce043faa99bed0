"""Erasure that sticks and reaches, stores that say where they are, adapters checked on resume.

`pv-ray delete` leaves a tombstone, so the next `personalize` over the same input refuses the
identity until `pv-ray reinstate`; it reaches a crash's staging folder, a copied output folder (and
only it), a batch running meanwhile; it fails loudly on an unreachable tracking store or a store
that does not exist. Resume re-tunes a corrupt adapter instead of skipping it; MLflow gets nothing
estimated from a face; a remote output without a tracking store is refused."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from personal_traces import found_in, traces_of
from PIL import Image

from pv_ray.cluster.batch import run_batch
from pv_ray.config import load_config
from pv_ray.presets.demo import demo_photos
from pv_ray.storage.adapter_store import AdapterStore
from pv_ray.storage.tracking import Tracker

from conftest import S3_BUCKET

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
PV_RAY = str(Path(sys.executable).with_name("pv-ray"))
FAST = ["train.steps=1", "eval.num_prompts=1", "eval.num_frames=2", "eval.num_inference_steps=2"]
GONE, KEPT, THIRD = "zq-erased-7", "zq-kept-3", "zq-third-5"  # ids no other text contains
PHOTO = "holiday-snap-8841.png"  # a photo name that must never reach MLflow


@pytest.fixture(scope="module")
def faces() -> list[Image.Image]:
    return [portrait for portrait, _ in demo_photos().values()]


def write_input(root: Path, people: dict[str, Image.Image]) -> Path:
    """root/<id>/<PHOTO>, no meta.json: the class word is inferred from the face."""
    for identity_id, portrait in people.items():
        (root / identity_id).mkdir(parents=True)
        buffer = io.BytesIO()
        portrait.save(buffer, format="PNG")
        (root / identity_id / PHOTO).write_bytes(buffer.getvalue())
    return root


def pv_ray(*args: str, cwd: Path, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """The CLI run as a user would, in `cwd`; `env` entries set to None are removed."""
    cwd.mkdir(parents=True, exist_ok=True)
    environment = {k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None}
    return subprocess.run([PV_RAY, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=environment)


def said(result: subprocess.CompletedProcess) -> str:
    return " ".join(result.stderr.split())


def file_hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens once the socket is closed


def test_erasure_sticks_until_reinstated_and_resume_checks_hashes(tmp_path, ray_cluster, faces):
    """Tune two identities; MLflow holds no class word inferred from the face and no photo name.
    Flip a byte in one adapter, leave a crashed upload of the other, delete the other: the next
    batch over the same input refuses it as erased (reason in report.json) and re-tunes the
    corrupt one; after `pv-ray reinstate` it is tuned again and the repaired one is skipped."""
    source = write_input(tmp_path / "in", {GONE: faces[0], KEPT: faces[1]})
    out = tmp_path / "out"
    cfg = load_config(TINY, FAST)
    first = run_batch(cfg, str(source), str(out), workers=1)
    assert first.counts["done"] == 2
    store = AdapterStore(str(out))
    assert store.get(GONE).metadata["class_word_source"] == "face"

    tracker = Tracker(first.tracking_uri)
    for run in tracker.find_identity_runs(first.batch_id):
        assert all(key.startswith("config.") for key in run.data.params), run.data.params
        assert run.data.params["config.train.class_word"] == "None"  # not given: nothing logged in its place
        assert not any("class_word" in key for key in run.data.tags), run.data.tags
        assert "holiday-snap" not in json.dumps([run.data.params, run.data.tags])
        uploaded = Path(tracker.client.download_artifacts(run.info.run_id, "adapter/adapter.json", str(tmp_path)))
        text = uploaded.read_text()
        assert not {"class_word", "photos", "eval_prompts", "reference_embedding"} & set(json.loads(text))
        assert "holiday-snap" not in text

    weights = out / "adapters" / KEPT / "pytorch_lora_weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    staging = out / "adapters" / f".tmp-{GONE}-xyz"  # an upload a crash left, with the face descriptors
    staging.mkdir()
    shutil.copy(out / "adapters" / GONE / "adapter.json", staging / "adapter.json")
    gone_needles = traces_of(store.get(GONE).metadata, GONE)

    r = pv_ray("delete", "--store", str(out), GONE, cwd=tmp_path / "elsewhere")
    assert r.returncode == 0, r.stderr
    assert f"staging folder file://{staging}" in said(r) and "tombstone left" in said(r)
    assert not staging.exists() and found_in(out, gone_needles) == []
    assert list((tmp_path / "elsewhere").iterdir()) == []

    second = run_batch(cfg, str(source), str(out), workers=1)
    erased_on = time.strftime("%Y-%m-%d", time.gmtime())
    refusal = f"erased on {erased_on}; `pv-ray reinstate {GONE}` to allow it again"
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["identities"][GONE] == {"status": "rejected", "reason": refusal}
    assert {"identity_id": GONE, "photo": None, "reason": refusal} in json.loads((out / "rejects.json").read_text())[
        "rejects"
    ]
    kept = second.identities[KEPT]
    assert kept["status"] == "done", kept  # never "skipped": its bytes did not match its mark
    assert kept["stored_adapter"].startswith("corrupt, tuned again: ") and "does not match" in kept["stored_adapter"]
    store.verify(KEPT)
    assert not store.exists(GONE) and Tracker(first.tracking_uri).identity_runs(GONE) == []

    r = pv_ray("reinstate", "--store", str(out), GONE, cwd=tmp_path / "elsewhere")
    assert r.returncode == 0 and f"reinstated {GONE}" in said(r), r.stderr
    third = run_batch(cfg, str(source), str(out), workers=1)
    assert third.identities[GONE]["status"] == "done" and third.identities[KEPT]["status"] == "skipped"
    assert store.list_identities() == sorted([GONE, KEPT])


def test_delete_in_a_copied_output_folder_changes_only_the_copy(tmp_path, ray_cluster, faces):
    """`cp -r out copy; pv-ray delete --store copy GONE`: no byte of GONE is left in the copy (its
    adapter, reports, mlflow.db rows, MLflow artifacts), and not one file of the original changes
    (MLflow recorded the original's absolute artifact paths: they are not followed)."""
    out = tmp_path / "out"
    report = run_batch(
        load_config(TINY, FAST), str(write_input(tmp_path / "in", {GONE: faces[0]})), str(out), workers=1
    )
    assert report.counts["done"] == 1
    needles = traces_of(AdapterStore(str(out)).get(GONE).metadata, GONE)
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    original = file_hashes(out)
    assert found_in(copy, needles) and any(p.startswith("artifacts/") for p in original)

    r = pv_ray("delete", "--store", str(copy), GONE, cwd=tmp_path / "elsewhere")

    assert r.returncode == 0, r.stderr
    assert "MLflow run" in said(r)
    assert found_in(copy, needles) == []
    assert file_hashes(out) == original
    assert AdapterStore(str(out)).list_identities() == [GONE]
    assert [run["status"] for run in Tracker(report.tracking_uri).identity_runs(GONE)] == ["FINISHED"]


def test_parallel_deletes_during_a_running_batch_leave_neither_in_the_report(tmp_path, ray_cluster, faces):
    """A batch runs (a subprocess on this module's cluster); two `pv-ray delete` run meanwhile,
    each for another identity. At its end report.json holds neither, nor does the store or MLflow:
    the batch's last write honours the erasures made while it ran, under the store's lock."""
    import ray

    source = write_input(tmp_path / "in", {GONE: faces[0], KEPT: faces[1], THIRD: faces[2]})
    out, log = tmp_path / "out", tmp_path / "batch.log"
    with open(log, "w") as stderr:
        batch = subprocess.Popen(
            [PV_RAY, "personalize", "--config", str(TINY), *(f"--set={o}" for o in FAST), "--input", str(source),
             "--output", str(out)],
            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=stderr,
            env={**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address},
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not (out / "tracking.json").exists():  # written once the batch has started
            assert batch.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        deletes = [
            subprocess.Popen(
                [PV_RAY, "delete", "--store", str(out), i], cwd=tmp_path, stderr=subprocess.PIPE, text=True
            )
            for i in (GONE, KEPT)
        ]
        for delete in deletes:
            _, delete_said = delete.communicate(timeout=300)
            assert delete.returncode == 0, delete_said
        assert batch.poll() is None, "the deletes must run while the batch does"
        batch.wait(timeout=600)
    finally:
        if batch.poll() is None:
            batch.kill()
    assert batch.returncode == 0, log.read_text()
    report = json.loads((out / "report.json").read_text())
    assert list(report["identities"]) == [THIRD] and report["identities"][THIRD]["status"] == "done"
    assert report["counts"]["total"] == 1 and report["counts"]["done"] == 1
    assert all(r["identity_id"] == THIRD for r in json.loads((out / "rejects.json").read_text())["rejects"])
    store = AdapterStore(str(out))
    assert store.list_identities() == [THIRD] and store.incomplete() == []
    tracker = Tracker(report["tracking_uri"])
    assert tracker.identity_runs(GONE) == [] and tracker.identity_runs(KEPT) == []
    assert found_in(out, {"gone": GONE.encode(), "kept": KEPT.encode()}) == []


def test_delete_reaches_a_crashed_upload_and_fails_loudly_on_what_it_cannot_reach(tmp_path):
    """A staging folder a crash left (with face descriptors) is removed; a tracking store that
    cannot be reached, given or recorded by the store, is exit 1; a store that does not exist is
    exit 2 with one line, never "nothing was found"."""
    store = tmp_path / "store"
    staging = store / "adapters" / f".tmp-{GONE}-xyz"
    staging.mkdir(parents=True)
    (staging / "adapter.json").write_text(json.dumps({"identity_id": GONE, "reference_embedding": [0.25] * 16}))
    (staging / "pytorch_lora_weights.safetensors").write_bytes(b"weights")
    server = f"http://127.0.0.1:{closed_port()}"
    quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}

    # What delete reaches, a subject access request gets: the crashed upload is in the export.
    r = pv_ray(
        "export-identity", GONE, "--store", str(store), "--out", str(tmp_path / "gone.zip"), cwd=tmp_path / "cwd"
    )
    assert r.returncode == 0, r.stderr
    with zipfile.ZipFile(tmp_path / "gone.zip") as archive:
        assert json.loads(archive.read(f"staging/.tmp-{GONE}-xyz/adapter.json"))["identity_id"] == GONE

    r = pv_ray("delete", "--store", str(store), "--tracking-uri", server, GONE, cwd=tmp_path / "cwd", env=quick)
    assert r.returncode == 1, r.stderr
    assert f"not removed MLflow runs in {server}: unreachable" in said(r)
    assert not staging.exists() and found_in(store, {"id": GONE.encode()}) == []

    # The store records where its runs went: delete, from any directory, must reach it.
    (store / "tracking.json").write_text(json.dumps({"in_store": [], "uris": [server]}))
    r = pv_ray("delete", "--store", str(store), KEPT, cwd=tmp_path / "cwd", env=quick)
    assert r.returncode == 1 and f"MLflow runs in {server}: unreachable" in said(r), r.stderr

    r = pv_ray("delete", "--store", str(tmp_path / "typo"), GONE, cwd=tmp_path / "cwd")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert said(r).startswith("error: --store") and "no such store" in said(r)
    assert not (tmp_path / "typo").exists() and list((tmp_path / "cwd").iterdir()) == []


def test_a_remote_output_without_a_tracking_store_is_refused(tmp_path, s3_endpoint, faces):
    """No silent fallback to the working directory: one line, exit 2, nothing written there (nor
    in the bucket)."""
    import boto3

    source = write_input(tmp_path / "in", {GONE: faces[0]})
    cwd = tmp_path / "cwd"
    prefix = f"refused-{int(time.time() * 1000)}"
    env = {"AWS_ENDPOINT_URL": s3_endpoint, "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x"}
    r = pv_ray(
        "personalize", "--config", str(TINY), "--input", str(source), "--output", f"s3://{S3_BUCKET}/{prefix}",
        cwd=cwd, env=env | {"PV_RAY_TRACKING_URI": None},
    )  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == (
        "error: an s3:// output needs --tracking-uri (an MLflow server or sqlite:////shared/path.db)"
    ), r.stderr
    assert list(cwd.iterdir()) == []
    s3 = boto3.client(
        "s3", endpoint_url=s3_endpoint, region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x"
    )
    assert s3.list_objects_v2(Bucket=S3_BUCKET, Prefix=prefix).get("KeyCount", 0) == 0

    # A remote store that records no tracking store: its runs are elsewhere, unknown: delete exits 1.
    s3.put_object(Bucket=S3_BUCKET, Key=f"{prefix}/report.json", Body=b'{"identities": {}}')
    r = pv_ray(
        "delete", "--store", f"s3://{S3_BUCKET}/{prefix}", GONE, cwd=cwd, env=env | {"PV_RAY_TRACKING_URI": None}
    )
    assert r.returncode == 1 and "records no tracking store: give --tracking-uri" in said(r), r.stderr


def test_the_store_names_its_tracking_stores_without_secrets(tmp_path, model_cache):
    """tracking.json: a sqlite file inside the store by its relative path (a copy names its own),
    a server without the credentials of its URI. Demo photos for a remote output go to the cache."""
    from pv_ray.presets.demo import demo_input_for
    from pv_ray.storage.personal_data import record_tracking_uri, tracking_uris_of

    store = AdapterStore(str(tmp_path / "store"))
    for uri in (
        "http://user:secret@mlflow.internal:5000", "postgresql://pv:secret@db.internal/mlflow",
        f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}",
    ):  # fmt: skip
        record_tracking_uri(store, uri)
        record_tracking_uri(store, uri)
    assert json.loads((tmp_path / "store" / "tracking.json").read_text()) == {
        "in_store": ["mlflow.db"],
        "uris": ["http://mlflow.internal:5000", "postgresql://db.internal/mlflow"],
    }
    shutil.copytree(tmp_path / "store", tmp_path / "copy")
    (tmp_path / "copy" / "mlflow.db").write_bytes(b"")
    assert tracking_uris_of(AdapterStore(str(tmp_path / "copy")), "http://user:secret@mlflow.internal:5000") == [
        "http://user:secret@mlflow.internal:5000",
        f"sqlite:///{tmp_path / 'copy' / 'mlflow.db'}",
        "postgresql://db.internal/mlflow",
    ]
    assert Path(demo_input_for("s3://bucket/run")) == model_cache / "demo-identities"
