"""One worker's recipe without a cluster: analysed rows in, adapters in the store, MLflow runs and a
ledger entry per identity out; a second pass skips what is complete."""

from __future__ import annotations

import json
from pathlib import Path

import skimage

from pv_ray.batch.recipe import BatchProgress, TuningRecipe, WorkerSettings
from pv_ray.batch.rows import IdentityAnalyzer
from pv_ray.config import load_config
from pv_ray.storage.adapter_store import AdapterStore
from pv_ray.storage.tracking import Tracker, resolve_tracking_uri

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def test_the_recipe_tunes_stores_logs_and_then_skips_without_ray(tmp_path, tiny_models):
    photo = (Path(skimage.data.__file__).parent / "astronaut.png").read_bytes()
    (tmp_path / "in" / "alice").mkdir(parents=True)
    (tmp_path / "in" / "alice" / "photo.png").write_bytes(photo)
    (tmp_path / "in" / "alice" / "meta.json").write_text(json.dumps({"class": "woman"}))
    (tmp_path / "in" / "bob").mkdir()
    (tmp_path / "in" / "bob" / "notes.jpg").write_bytes(b"not a photo")
    config = load_config(TINY, ["train.steps=2", "eval.num_prompts=1"]).model_dump(mode="json")
    analyzer = IdentityAnalyzer(config, None)
    rows = [analyzer({"identity_id": i, "uri": str(tmp_path / "in" / i)}) for i in ("alice", "bob")]

    output = str(tmp_path / "out")
    tracking_uri = resolve_tracking_uri(None, output)
    tracker = Tracker(tracking_uri, experiment="recipe")
    parent = tracker.start_batch("b1", {"config": config})
    settings = WorkerSettings(config, output, None, tracking_uri, "recipe", "b1", parent, force=False)

    progress = BatchProgress(total=2)
    summary = TuningRecipe(settings, progress).run(rows)
    status, rejects, _ = progress.results()
    assert status["alice"]["status"] == "done", status["alice"]
    assert status["bob"]["status"] == "rejected" and "notes.jpg" in status["bob"]["reason"]
    assert [r["identity_id"] for r in rejects] == ["bob"]
    assert summary["identities_tuned"] == 1 and summary["tune_seconds"] > 0
    store = AdapterStore(output)
    store.verify("alice")  # complete, bytes matching the completion mark
    assert status["alice"]["adapter_uri"] == store.uri("alice")
    (run,) = tracker.identity_runs("alice")
    assert run["status"] == "FINISHED" and run["run_id"] == status["alice"]["mlflow_run_id"]
    assert {"loss", "face_sim"} <= set(run["metrics"]) and "woman" not in json.dumps(run["params"])
    assert not tracker.identity_runs("bob"), "a rejected identity gets no run"

    again = BatchProgress(total=2)
    TuningRecipe(settings, again).run(rows)
    assert again.results()[0]["alice"]["status"] == "skipped"
    assert len(tracker.identity_runs("alice")) == 1
