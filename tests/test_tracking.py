from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import pytest

from pv_ray.storage.tracking import TAG_ATTEMPT, IdentityRun, Tracker, flatten_params


def sqlite_uri(path: Path) -> str:
    return f"sqlite:///{path}"


def loss_at(worker: int, identity: int, step: int) -> float:
    return 1.0 / (1 + step) + worker * 0.01 + identity * 0.001


def write_adapter(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pytorch_lora_weights.safetensors").write_bytes(b"weights" * 10)
    (folder / "adapter.json").write_text('{"rank": 4}')
    return folder


def test_flatten_params() -> None:
    nested = {"lora": {"rank": 16, "targets": ["to_q", "to_k"]}, "lr": 1e-4, "x": None}
    flat = flatten_params(nested)
    assert flat == {
        "lora.rank": "16",
        "lora.targets": '["to_q", "to_k"]',
        "lr": "0.0001",
        "x": "None",
    }
    long = flatten_params({"prompts": "p" * 7000})["prompts"]
    assert len(long) == 6000 and long.endswith("...[truncated]")


def test_refuses_bad_uris_and_ids(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="must hold an absolute path"):
        Tracker("sqlite:///relative.db")
    with pytest.raises(ValueError, match="must be sqlite"):
        Tracker(str(tmp_path / "mlruns"))
    tracker = Tracker(sqlite_uri(tmp_path / "db" / "mlflow.db"))
    parent = tracker.start_batch("b1", {})
    with pytest.raises(ValueError, match="invalid batch id"):
        tracker.start_batch("b' or '1'='1", {})
    with pytest.raises(ValueError, match="invalid identity id"):
        tracker.identity_run(parent, "../x", "b1")
    with pytest.raises(ValueError, match="invalid parent run id"):
        tracker.identity_run("x' or 1=1", "alice", "b1")


def test_batch_with_nested_identity_runs(tmp_path: Path) -> None:
    db = tmp_path / "tracking" / "mlflow.db"
    tracker = Tracker(sqlite_uri(db))
    parent = tracker.start_batch("batch-1", {"tuning": {"steps": 50, "lora": {"rank": 16}}})

    for i, identity in enumerate(["alice", "bob", "carol"]):
        with tracker.identity_run(parent, identity, "batch-1") as run:
            run.log_params({"tuning": {"lr": 1e-4}, "photos": i + 1})
            for step in range(50):
                run.log_metrics({"loss": loss_at(0, i, step), "face_sim": step / 50}, step=step)
            run.set_tags({"num_photos": i + 1})
            uri = run.log_adapter(write_adapter(tmp_path / identity))
            assert uri == f"runs:/{run.run_id}/adapter"
    tracker.finish_batch(parent, {"identities_ok": 3}, status="FINISHED")

    assert db.exists()
    batch = tracker.client.get_run(parent)
    assert batch.info.status == "FINISHED"
    assert batch.data.params == {"tuning.steps": "50", "tuning.lora.rank": "16"}
    assert batch.data.metrics == {"identities_ok": 3.0}
    assert tracker.find_batch_run("batch-1").info.run_id == parent

    runs = tracker.find_identity_runs("batch-1")
    assert [r.data.tags["identity_id"] for r in runs] == ["alice", "bob", "carol"]
    for i, run in enumerate(runs):
        assert run.data.tags["mlflow.parentRunId"] == parent
        assert run.data.tags["batch_id"] == "batch-1"
        assert run.data.tags["num_photos"] == str(i + 1)
        assert run.info.status == "FINISHED"
        assert run.data.params == {"tuning.lr": "0.0001", "photos": str(i + 1)}
        history = tracker.client.get_metric_history(run.info.run_id, "loss")
        assert sorted((m.step, m.value) for m in history) == [(s, pytest.approx(loss_at(0, i, s))) for s in range(50)]
        artifacts = [a.path for a in tracker.client.list_artifacts(run.info.run_id, "adapter")]
        assert artifacts == ["adapter/adapter.json", "adapter/pytorch_lora_weights.safetensors"]
        # Artifacts live next to the database, not in ./mlruns of the current directory.
        assert run.info.artifact_uri.startswith((db.parent / "artifacts").as_uri())
    assert not (Path.cwd() / "mlruns").exists() or Path.cwd() == tmp_path


def test_metrics_are_batched_not_one_request_per_step(tmp_path: Path) -> None:
    tracker = Tracker(sqlite_uri(tmp_path / "mlflow.db"))
    parent = tracker.start_batch("b", {})
    calls = []
    log_batch = tracker.client.log_batch

    def counting_log_batch(*args, **kwargs):  # records, then does the real call
        calls.append(len(kwargs["metrics"]))
        return log_batch(*args, **kwargs)

    tracker.client.log_batch = counting_log_batch
    run = tracker.identity_run(parent, "alice", "b")
    for step in range(800):
        run.log_metrics({"loss": 1.0 / (step + 1), "face_sim": step / 800}, step=step)
    run.finish()

    assert calls == [1000, 600]
    assert len(tracker.client.get_metric_history(run.run_id, "face_sim")) == 800


def test_identity_run_is_idempotent(tmp_path: Path) -> None:
    tracker = Tracker(sqlite_uri(tmp_path / "mlflow.db"))
    parent = tracker.start_batch("b", {"steps": 10})
    first = tracker.identity_run(parent, "alice", "b")
    first.log_metrics({"loss": 1.0}, step=0)
    first.finish("FAILED")

    again = tracker.identity_run(parent, "alice", "b")  # the retried worker
    again.log_params({"steps": 10})
    again.finish()

    assert again.run_id == first.run_id
    runs = tracker.find_identity_runs("b")
    assert len(runs) == 1
    assert runs[0].info.status == "FINISHED"
    assert runs[0].data.tags[TAG_ATTEMPT] == "2"
    # A restarted driver gets the same parent run back.
    assert tracker.start_batch("b", {"steps": 10}) == parent


def test_context_manager_marks_failure(tmp_path: Path) -> None:
    tracker = Tracker(sqlite_uri(tmp_path / "mlflow.db"))
    parent = tracker.start_batch("b", {})
    with pytest.raises(RuntimeError, match="boom"), tracker.identity_run(parent, "alice", "b") as run:
        run.log_metrics({"loss": 2.0}, step=0)
        raise RuntimeError("boom")
    logged = tracker.client.get_run(run.run_id)
    assert logged.info.status == "FAILED"
    assert logged.data.metrics == {"loss": 2.0}  # the buffer was flushed on failure


def _worker(db_uri: str, worker: int, barrier: mp.synchronize.Barrier) -> None:
    barrier.wait()  # all processes hit the fresh database (schema + experiment) together
    tracker = Tracker(db_uri)
    parent = tracker.start_batch("concurrent", {"workers": 4})
    for k in range(3):
        run: IdentityRun
        with tracker.identity_run(parent, f"w{worker}-id{k}", "concurrent") as run:
            run.log_params({"worker": worker})
            for step in range(50):
                run.log_metrics({"loss": loss_at(worker, k, step)}, step=step)
                if step % 10 == 9:
                    run.flush()  # many small writes: maximise contention


def test_processes_share_one_sqlite_file(tmp_path: Path) -> None:
    db_uri = sqlite_uri(tmp_path / "shared" / "mlflow.db")
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(4)
    procs = [ctx.Process(target=_worker, args=(db_uri, w, barrier)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]

    tracker = Tracker(db_uri)
    batch = tracker.find_batch_run("concurrent")
    runs = tracker.find_identity_runs("concurrent")
    assert len(runs) == 12
    assert {r.data.tags["identity_id"] for r in runs} == {f"w{w}-id{k}" for w in range(4) for k in range(3)}
    for run in runs:
        assert run.data.tags["mlflow.parentRunId"] == batch.info.run_id
        assert run.info.status == "FINISHED"
        worker, k = (int(x) for x in run.data.tags["identity_id"][1:].split("-id"))
        history = tracker.client.get_metric_history(run.info.run_id, "loss")
        assert sorted((m.step, m.value) for m in history) == [
            (s, pytest.approx(loss_at(worker, k, s))) for s in range(50)
        ]


def test_logging_over_http_to_mlflow_server(mlflow_server_process, tmp_path: Path) -> None:
    mlflow_server = mlflow_server_process.url
    tracker = Tracker(mlflow_server)
    assert Tracker(mlflow_server).experiment_id == tracker.experiment_id  # get, not re-create
    parent = tracker.start_batch("http-batch", {"steps": 5})
    with tracker.identity_run(parent, "alice", "http-batch") as run:
        for step in range(5):
            run.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
        run.log_adapter(write_adapter(tmp_path / "alice"))
    tracker.finish_batch(parent, {"identities_ok": 1})

    reader = Tracker(mlflow_server)
    [found] = reader.find_identity_runs("http-batch")
    assert found.info.run_id == run.run_id
    assert found.data.tags["mlflow.parentRunId"] == parent
    assert [m.value for m in reader.client.get_metric_history(run.run_id, "loss")] == [
        pytest.approx(1.0 / (s + 1)) for s in range(5)
    ]
    downloaded = Path(reader.client.download_artifacts(run.run_id, "adapter", str(tmp_path / "dl")))
    assert (downloaded / "pytorch_lora_weights.safetensors").read_bytes() == b"weights" * 10
    # Artifacts went through the server's proxy into its artifacts destination.
    stored = mlflow_server_process.artifacts.rglob("pytorch_lora_weights.safetensors")
    assert any(run.run_id in path.parts for path in stored)
    assert reader.find_batch_run("http-batch").info.status == "FINISHED"


def test_a_remote_output_has_no_default_tracking_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No silent fallback to the working directory (a checkout, say): one line, nothing written."""
    from pv_ray.errors import InputError
    from pv_ray.storage.tracking import default_tracking_uri, resolve_tracking_uri

    monkeypatch.chdir(tmp_path)
    for output in ("s3://bucket/run", "gs://bucket/run", "memory://run"):
        scheme = output.split(":")[0]
        with pytest.raises(InputError, match=f"^an {scheme}:// output needs --tracking-uri "):
            resolve_tracking_uri(None, output)
    assert list(tmp_path.iterdir()) == []
    assert default_tracking_uri(str(tmp_path / "out")) == f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}"


def test_an_existing_store_is_opened_as_it_is(tmp_path: Path) -> None:
    """Erasure and export open tracking stores without making one: a missing sqlite file is an
    error, not a new empty store."""
    with pytest.raises(FileNotFoundError, match="no MLflow store at"):
        Tracker(sqlite_uri(tmp_path / "gone" / "mlflow.db"), create=False)
    assert not (tmp_path / "gone").exists()
    Tracker(sqlite_uri(tmp_path / "db" / "mlflow.db")).start_batch("b1", {})
    opened = Tracker(sqlite_uri(tmp_path / "db" / "mlflow.db"), experiment="another", create=False)
    assert opened.experiment_id is None and opened.identity_runs("alice") == []


def test_mlflow_gets_no_face_descriptor_photo_name_or_class_word(tmp_path: Path) -> None:
    """The adapter's MLflow copy of adapter.json leaves out what is the person's."""
    import json

    tracker = Tracker(sqlite_uri(tmp_path / "db" / "mlflow.db"))
    parent = tracker.start_batch("b1", {})
    folder = write_adapter(tmp_path / "adapter")
    metadata = {
        "identity_id": "alice", "rank": 4, "class_word": "woman", "class_word_source": "face",
        "photos": [{"name": "IMG_0042 alice beach.jpg", "ok": True, "det_score": 0.9}],
        "eval_prompts": ["a woman surfing"], "reference_embedding": [0.1] * 8, "independent_reference": None,
        "sha256": {"pytorch_lora_weights.safetensors": "ab", "reference_embedding": "cd"},
        "final_step": {"step": 3, "loss": 0.5, "prompt": "portrait shot of a woman smiling"},
    }  # fmt: skip
    (folder / "adapter.json").write_text(json.dumps(metadata))
    with tracker.identity_run(parent, "alice", "b1") as run:
        run.log_adapter(folder)
    uploaded = json.loads(
        Path(tracker.client.download_artifacts(run.run_id, "adapter/adapter.json", str(tmp_path))).read_text()
    )
    assert uploaded == {
        "identity_id": "alice", "rank": 4, "sha256": {"pytorch_lora_weights.safetensors": "ab"},
        "final_step": {"step": 3, "loss": 0.5},
    }  # fmt: skip


def test_erasing_in_a_copied_folder_touches_nothing_of_the_original(tmp_path: Path) -> None:
    """MLflow records absolute artifact paths: in a copy of a store's folder they name the
    original's. The copy's erasure deletes the copy's own artifacts and leaves the original's."""
    import shutil

    original = tmp_path / "original"
    tracker = Tracker(sqlite_uri(original / "mlflow.db"))
    parent = tracker.start_batch("b1", {})
    with tracker.identity_run(parent, "alice", "b1") as run:
        run.log_adapter(write_adapter(tmp_path / "adapter"))
    shutil.copytree(original, tmp_path / "copy")
    before = {p: p.read_bytes() for p in original.rglob("*") if p.is_file()}

    removed, left = Tracker(sqlite_uri(tmp_path / "copy" / "mlflow.db"), create=False).erase_identity("alice")

    assert len(removed) == 1 and left == []
    assert {p: p.read_bytes() for p in original.rglob("*") if p.is_file()} == before
    assert not (tmp_path / "copy" / "artifacts" / run.run_id).exists()
    assert (original / "artifacts" / run.run_id / "artifacts" / "adapter" / "adapter.json").is_file()
    assert Tracker(sqlite_uri(original / "mlflow.db")).identity_runs("alice") != []
