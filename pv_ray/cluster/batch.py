"""The batch job: personalize every identity of an input tree on a Ray cluster.

Ray Data analyses the identity folders (`pv_ray.cluster.ingest`); a Ray Train `TorchTrainer` fans the
usable identities out over N workers (one GPU each when present) as a streamed dataset shard.
Each worker loads the backbone once, then per identity: resets the adapter, tunes, writes the
adapter to the store (atomically, with a completion mark) and logs a nested MLflow run.

Why the Ray layer looks the way it does:
- Per-identity progress cannot go through `ray.train.report` (a barrier across workers that
  hold different numbers of identities), so workers tell a small `BatchProgress` actor, which
  the driver polls for its progress bar and the final report.
- Ray Train splits datasets with `equal=True`, which drops rows to even out the shards; a
  personalization job must tune every identity, so `EveryRowSplit` splits with `equal=False`.
- A worker that dies makes Ray Train restart the worker group; the restarted workers stream the
  dataset again and skip identities already complete in the store (or finished in this batch),
  so every identity gets exactly one adapter.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray.train import DataConfig

from pv_ray.config import PVConfig, config_from_dict
from pv_ray.cluster.ingest import analyze_identities, reference_from_row
from pv_ray.storage.adapter_store import AdapterStore
from pv_ray.storage.tracking import Tracker

DATASET = "identities"


class EveryRowSplit(DataConfig):
    """Split datasets across workers without dropping rows (Ray Train's default uses equal=True)."""

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        output = [{} for _ in range(world_size)]
        for name, ds in datasets.items():
            for i, split in enumerate(ds.streaming_split(world_size, equal=False)):
                output[i][name] = split
        return output


@ray.remote(num_cpus=0)
class BatchProgress:
    """Per-identity status, shared by the workers and read by the driver."""

    def __init__(self):
        self.status: dict[str, dict[str, Any]] = {}
        self.workers: list[dict[str, Any]] = []  # one entry per worker loop that ran to its end

    def started(self, identity_id: str, worker: int, node: str) -> None:
        entry = self.status.setdefault(identity_id, {})
        if entry.get("status") not in ("done", "failed", "skipped"):
            entry.update(status="running", worker=worker, node=node, started=time.time())
            entry["attempts"] = entry.get("attempts", 0) + 1

    def finished(self, identity_id: str, status: str, info: dict[str, Any]) -> None:
        self.status.setdefault(identity_id, {}).update(status=status, finished=time.time(), **info)

    def is_finished(self, identity_id: str) -> bool:
        return self.status.get(identity_id, {}).get("status") in ("done", "failed", "skipped")

    def worker_done(self, summary: dict[str, Any]) -> None:
        self.workers.append(summary)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        return self.status

    def worker_summaries(self) -> list[dict[str, Any]]:
        return self.workers


def _worker_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker: load the backbone once, tune each identity of the shard."""
    from pv_ray.method.tuner import Personalizer

    started, cpu_started = time.time(), time.process_time()
    tune_seconds, tuned = 0.0, 0
    cfg = config_from_dict(config["pv_config"])
    rank = ray.train.get_context().get_world_rank()
    progress = config["progress"]
    store = AdapterStore(config["output"], config["storage_options"])
    tracker = Tracker(config["tracking_uri"], experiment=config["experiment"])
    load_started = time.time()
    personalizer = Personalizer(cfg)
    load_seconds = time.time() - load_started  # the backbone, face models and adapter
    for row in ray.train.get_dataset_shard(DATASET).iter_rows():
        identity_id = row["identity_id"]
        if ray.get(progress.is_finished.remote(identity_id)):
            continue  # finished before a worker-group restart
        if not config["force"] and store.exists(identity_id):
            progress.finished.remote(identity_id, "skipped", {"reason": "adapter already complete in the store", "adapter_uri": store.uri(identity_id)})
            continue
        progress.started.remote(identity_id, rank, ray.get_runtime_context().get_node_id())
        t0 = time.time()
        workdir = Path(tempfile.mkdtemp(prefix=f"pv-ray-{identity_id}-"))
        try:
            reference, meta = reference_from_row(row)
            with tracker.identity_run(config["parent_run_id"], identity_id, config["batch_id"]) as run:
                run.log_params({"config": config["pv_config"], "photos_usable": len(reference.usable), "class_word": reference.class_word})
                result = personalizer.personalize(
                    identity_id,
                    reference,
                    workdir,
                    meta=meta,
                    on_step=lambda m: run.log_metrics(
                        {"loss": m.loss, "loss_id": m.loss_id, "loss_scr": m.loss_scr, "face_sim": m.face_sim, "no_face_rate": m.no_face_rate, "grad_norm": m.grad_norm},
                        step=m.step,
                    ),
                )
                record = store.put(identity_id, workdir, overwrite=True)
                summary = {f"{k}_before": v for k, v in result.metrics_before.items()} | {f"{k}_after": v for k, v in result.metrics_after.items()}
                run.log_metrics({k: v for k, v in summary.items() if v == v}, step=cfg.train.steps)  # NaN-free
                run.log_adapter(workdir)
                run.set_tags({"adapter_uri": record.uri, "worker": str(rank)})
            identity_tune_seconds = sum(m.seconds for m in result.history)
            tune_seconds, tuned = tune_seconds + identity_tune_seconds, tuned + 1
            progress.finished.remote(
                identity_id,
                "done",
                {"seconds": round(time.time() - t0, 3), "tune_seconds": round(identity_tune_seconds, 3), "adapter_uri": record.uri, "mlflow_run_id": run.run_id, "metrics_before": result.info["metrics_before"], "metrics_after": result.info["metrics_after"]},
            )
        except Exception as e:  # one identity's failure must not stop the others
            progress.finished.remote(identity_id, "failed", {"reason": f"{type(e).__name__}: {e}", "seconds": round(time.time() - t0, 3)})
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    # Step efficiency: the share of this worker's wall time (backbone load included) spent in
    # tuning steps; the rest is loading, evaluation, writing and waiting for data.
    # cpu_per_wall: CPU seconds this worker process got per wall second; well under its torch
    # thread count on a CPU node means it was waiting for cores (other workers, Ray's processes).
    wall, cpu = time.time() - started, time.process_time() - cpu_started
    ray.get(progress.worker_done.remote(  # waited for: the driver reads it once the trainer returns
        {"rank": rank, "node": ray.get_runtime_context().get_node_id(), "identities_tuned": tuned,
         "wall_seconds": round(wall, 3), "load_seconds": round(load_seconds, 3), "tune_seconds": round(tune_seconds, 3),
         "step_efficiency": round(tune_seconds / wall, 3) if wall else None,
         "cpu_seconds": round(cpu, 3), "cpu_per_wall": round(cpu / wall, 3) if wall else None}
    ))


def default_tracking_uri(output: str) -> str:
    """An embedded sqlite store under the output folder (or ./.pv-ray when the output is remote)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(output)
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    base = Path(path) if "file" in protocols else Path(".pv-ray").resolve()
    base.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(base / 'mlflow.db').resolve()}"


@dataclass
class BatchReport:
    batch_id: str
    counts: dict[str, int]
    identities: dict[str, dict[str, Any]]
    rejects: list[dict[str, Any]]
    seconds: float
    report_uri: str
    rejects_uri: str
    tracking_uri: str
    output: str
    error: str | None = None  # why the training run stopped early, if it did
    worker_loops: list[dict[str, Any]] | None = None  # per worker: wall, tune seconds, identities
    step_efficiency: float | None = None  # tuning-step time / worker wall time, all workers


def run_batch(
    cfg: PVConfig,
    input_uri: str,
    output_uri: str,
    *,
    workers: int = 1,
    force: bool = False,
    tracking_uri: str | None = None,
    storage_options: dict | None = None,
    max_failures: int = 3,
    on_progress=None,
    experiment: str = "pv-ray",
) -> BatchReport:
    """Personalize every identity under `input_uri` into the store at `output_uri`."""
    if output_uri.startswith("memory://") and workers > 0:
        raise ValueError("memory:// output lives in one process only; Ray workers cannot share it (use a path or s3://)")
    t0 = time.time()
    batch_id = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
    store = AdapterStore(output_uri, storage_options)
    tracking_uri = tracking_uri or default_tracking_uri(output_uri)
    if not ray.is_initialized():
        ray.init(log_to_driver=False, configure_logging=False)

    rows, rejects = analyze_identities(cfg, input_uri, storage_options=storage_options, max_actors=max(1, workers))
    rejects_uri = store.write_json("rejects.json", {"batch_id": batch_id, "rejects": [r.to_dict() for r in rejects]})
    identity_rejects = [r for r in rejects if r.photo is None]

    tracker = Tracker(tracking_uri, experiment=experiment)
    parent_run_id = tracker.start_batch(batch_id, {"input": input_uri, "output": output_uri, "workers": workers, "force": force, "config": cfg.model_dump(mode="json")})
    progress = BatchProgress.remote()
    skipped = set() if force else {r["identity_id"] for r in rows if store.exists(r["identity_id"])}
    for identity_id in sorted(skipped):  # resume: nothing to start for these
        progress.finished.remote(identity_id, "skipped", {"reason": "adapter already complete in the store", "adapter_uri": store.uri(identity_id)})
    todo = [r for r in rows if r["identity_id"] not in skipped]

    error: BaseException | None = None
    if todo:
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        use_gpu = bool(ray.cluster_resources().get("GPU", 0))
        trainer = TorchTrainer(
            _worker_loop,
            train_loop_config={
                "pv_config": cfg.model_dump(mode="json"),
                "progress": progress,
                "output": output_uri,
                "storage_options": storage_options,
                "tracking_uri": tracking_uri,
                "experiment": experiment,
                "batch_id": batch_id,
                "parent_run_id": parent_run_id,
                "force": force,
            },
            # SPREAD: one worker per node first, so a GPU cluster uses every machine.
            scaling_config=ScalingConfig(num_workers=min(workers, len(todo)), use_gpu=use_gpu, placement_strategy="SPREAD"),
            run_config=RunConfig(
                name=f"pv-ray-{batch_id}",
                storage_path=str(Path(tempfile.gettempdir()) / "pv-ray-train"),
                failure_config=FailureConfig(max_failures=max_failures),
            ),
            datasets={DATASET: ray.data.from_items(todo, override_num_blocks=len(todo))},
            dataset_config=EveryRowSplit(),
        )

        def fit() -> None:
            nonlocal error
            try:
                trainer.fit()
            except BaseException as e:  # reported after the progress loop
                error = e

        thread = threading.Thread(target=fit, daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(timeout=1.0)
            if on_progress is not None:
                on_progress(_counts(ray.get(progress.snapshot.remote()), len(rows)))
    status = ray.get(progress.snapshot.remote())
    workers_summary = ray.get(progress.worker_summaries.remote())
    for row in rows:  # anything the trainer never reached (it gave up) is a failure, not a gap
        status.setdefault(row["identity_id"], {"status": "failed", "reason": f"not processed: {error!r}" if error else "not processed"})
        if status[row["identity_id"]].get("status") == "running":
            status[row["identity_id"]].update(status="failed", reason=f"interrupted: {error!r}")
    for r in identity_rejects:
        status[r.identity_id] = {"status": "rejected", "reason": r.reason}
    counts = _counts(status, len(rows)) | {"rejected": len(identity_rejects), "total": len(rows) + len(identity_rejects)}
    report = {
        "batch_id": batch_id,
        "input": input_uri,
        "output": store.root_uri,
        "tracking_uri": tracking_uri,
        "mlflow_parent_run_id": parent_run_id,
        "workers": workers,
        "counts": counts,
        "seconds": round(time.time() - t0, 3),
        "identities": dict(sorted(status.items())),
        "worker_loops": workers_summary,
        "step_efficiency": _step_efficiency(workers_summary),
        "rejects_uri": rejects_uri,
        "error": None if error is None else repr(error),
    }
    report_uri = store.write_json("report.json", report)
    tracker.finish_batch(parent_run_id, {k: float(v) for k, v in counts.items()}, status="FINISHED" if error is None else "FAILED")
    return BatchReport(
        batch_id, counts, report["identities"], [r.to_dict() for r in rejects], report["seconds"], report_uri, rejects_uri,
        tracking_uri, store.root_uri, report["error"], workers_summary, report["step_efficiency"],
    )


def _step_efficiency(worker_loops: list[dict[str, Any]]) -> float | None:
    """Time in tuning steps / worker wall time, over every worker loop that ran to its end."""
    wall = sum(w["wall_seconds"] for w in worker_loops)
    return round(sum(w["tune_seconds"] for w in worker_loops) / wall, 3) if wall else None


def _counts(status: dict[str, dict[str, Any]], usable: int) -> dict[str, int]:
    counts = {k: 0 for k in ("done", "failed", "skipped", "running")}
    for entry in status.values():
        if entry.get("status") in counts:
            counts[entry["status"]] += 1
    counts["remaining"] = usable - counts["done"] - counts["failed"] - counts["skipped"]
    return counts
