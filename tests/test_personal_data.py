"""Personal data: an identity erased everywhere (`pv-ray delete`), exported on request
(`pv-ray export-identity`), and its face descriptors never copied into MLflow."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from personal_traces import found_in, traces_of

from pv_ray.cluster.batch import run_batch
from pv_ray.config import load_config
from pv_ray.evaluation.contact_sheet import write_contact_sheet
from pv_ray.evaluation.store_evaluation import evaluate_store
from pv_ray.presets.demo import demo_photos
from pv_ray.storage.adapter_store import AdapterStore
from pv_ray.storage.tracking import Tracker

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
PV_RAY = str(Path(sys.executable).with_name("pv-ray"))
FAST = ["train.steps=1", "eval.num_prompts=1", "eval.num_frames=2", "eval.num_inference_steps=2"]
GONE, KEPT = "zq-erased-7", "zq-kept-3"  # ids no other text contains


def test_delete_leaves_no_byte_of_the_identity_and_keeps_the_others(tmp_path, ray_cluster, tiny_models):
    """Tuned, evaluated, drawn on the contact sheet, with a serving job video: after `pv-ray
    delete`, neither its id nor its face descriptors are anywhere under the output folder (the
    store, mlflow.db, MLflow's artifact root); the other identity keeps everything."""
    photos = list(demo_photos().values())
    for identity_id, (portrait, _) in zip((GONE, KEPT), photos):
        (tmp_path / "in" / identity_id).mkdir(parents=True)
        portrait.save(tmp_path / "in" / identity_id / "photo.png")
    (tmp_path / "in" / "zq-rejected-1").mkdir()  # a rejects.json entry of its own
    out = tmp_path / "out"
    cfg = load_config(TINY, FAST)
    report = run_batch(cfg, str(tmp_path / "in"), str(out), workers=1)
    assert report.counts["done"] == 2
    evaluate_store(cfg, str(out), tracking_uri=report.tracking_uri)
    store = AdapterStore(str(out))
    write_contact_sheet(cfg, store, str(tmp_path / "in"), [GONE, KEPT], out / "contact_sheet.png", frames=1)
    for job, identity_id in (("job-a", GONE), ("job-b", KEPT)):  # as the service writes them
        store.root.write_json(f"jobs/{job}/job.json", {"identity": identity_id, "video": "video.gif"})
        store.root.write_bytes(f"jobs/{job}/video.gif", b"GIF89a" + identity_id.encode())
    gone_needles = traces_of(store.get(GONE).metadata, GONE)
    kept_needles = traces_of(store.get(KEPT).metadata, KEPT)
    assert set(gone_needles) >= {"id", "reference_embedding float32", "reference_embedding json"}
    assert found_in(out, gone_needles), "the needles must be found before the deletion"

    # MLflow never had the face descriptors: its copy of adapter.json goes without them.
    tracker = Tracker(report.tracking_uri)
    (run,) = [r for r in tracker.find_identity_runs(report.batch_id) if r.data.tags["identity_id"] == KEPT]
    uploaded = json.loads(
        Path(tracker.client.download_artifacts(run.info.run_id, "adapter/adapter.json", str(tmp_path))).read_text()
    )
    assert "reference_embedding" not in uploaded and uploaded["identity_id"] == KEPT
    mlflow_files = [p for p in (out / "artifacts").rglob("*") if p.is_file()]
    assert mlflow_files and not found_in(out / "artifacts", {k: v for k, v in kept_needles.items() if k != "id"})

    r = subprocess.run([PV_RAY, "delete", "--store", str(out), GONE], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    said = " ".join(r.stderr.split())
    for what in ("adapter", "report.json", "evaluation.json", "serving job job-a", "contact_sheet.png", "MLflow run"):
        assert what in said, (what, said)
    assert said.count("MLflow run") == 2  # its tuning run and its evaluation run
    assert found_in(out, gone_needles) == []

    assert store.list_identities() == [KEPT] and store.get(KEPT).metadata["reference_embedding"]
    on_disk = json.loads((out / "report.json").read_text())
    assert list(on_disk["identities"]) == [KEPT, "zq-rejected-1"] and on_disk["counts"]["done"] == 1
    assert on_disk["counts"]["total"] == 2
    assert list(json.loads((out / "evaluation.json").read_text())["identities"]) == [KEPT]
    assert (out / "jobs" / "job-b" / "video.gif").is_file() and not (out / "jobs" / "job-a").exists()
    kept_runs = Tracker(report.tracking_uri).identity_runs(KEPT)
    assert len(kept_runs) == 2 and all(run["metrics"] for run in kept_runs)

    # Again: nothing left to remove is not an error; a rejected identity's entry goes too.
    r = subprocess.run(
        [PV_RAY, "delete", "--store", str(out), GONE, "zq-rejected-1"], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0 and f"nothing of {GONE} was found" in " ".join(r.stderr.split()), r.stderr
    assert json.loads((out / "rejects.json").read_text())["rejects"] == []
    r = subprocess.run([PV_RAY, "delete", "--store", str(out), "../x"], capture_output=True, text=True)
    assert r.returncode == 2 and "invalid identity id" in r.stderr

    # Subject access: the other identity's data as one zip.
    archive = tmp_path / "kept.zip"
    r = subprocess.run(
        [PV_RAY, "export-identity", KEPT, "--store", str(out), "--out", str(archive)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    with zipfile.ZipFile(io.BytesIO(archive.read_bytes())) as z:
        names = set(z.namelist())
        assert {"adapter/adapter.json", "adapter/pytorch_lora_weights.safetensors", "jobs/job-b/video.gif"} <= names
        assert {"reports/report.json", "reports/evaluation.json", "mlflow_runs.json"} <= names
        assert json.loads(z.read("adapter/adapter.json"))["identity_id"] == KEPT
        assert list(json.loads(z.read("reports/report.json"))) == [KEPT]
        assert len(json.loads(z.read("mlflow_runs.json"))) == 2


def test_over_a_tracking_server_runs_are_soft_deleted_and_the_rest_is_listed(tmp_path, mlflow_server):
    """A tracking server has no hard delete over HTTP: the artifacts go, the run is soft-deleted,
    and `pv-ray delete` names what the server's operator must purge (`mlflow gc`), exiting 1."""
    tracker = Tracker(mlflow_server)
    parent = tracker.start_batch("b1", {})
    with tracker.identity_run(parent, GONE, "b1") as run:
        run.log_metrics({"loss": 1.0}, step=1)
        run.log_text("the traceback", "failure.txt")
    (tmp_path / "store").mkdir()
    env = {**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    r = subprocess.run(
        [PV_RAY, "delete", "--store", str(tmp_path / "store"), "--tracking-uri", mlflow_server, GONE],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    said = " ".join(r.stderr.split())
    assert r.returncode == 1, said
    assert f"mlflow gc --backend-store-uri <the server's store> --run-ids {run.run_id}" in said
    assert tracker.client.get_run(run.run_id).info.lifecycle_stage == "deleted"
    assert tracker.client.list_artifacts(run.run_id) == []


def test_the_readme_table_is_the_registry_delete_follows():
    """Every place `pv-ray delete` reaches is named once, in pv_ray.storage.personal_data; the
    README's "Security and personal data" table holds each of its rows as `readme_table()` prints them."""
    from pv_ray.storage.personal_data import readme_table

    readme = (ROOT / "README.md").read_text()
    missing = [row for row in readme_table().splitlines() if row not in readme]
    assert not missing, f"README.md lacks these rows of personal_data.readme_table(): {missing}"
