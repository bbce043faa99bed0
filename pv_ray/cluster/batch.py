"""The batch job: personalize every identity of an input tree on a Ray cluster.

The driver lists the identity folders; a lazy Ray Data pipeline analyses them
(`pv_ray.cluster.ingest`) and streams into a Ray Train `TorchTrainer`, which fans them out over N
workers (one GPU each when present) as dataset shards: tuning starts with the first analysed
identity. Each worker runs the Ray-free recipe (`pv_ray.batch.recipe.TuningRecipe`) over its
shard: load the backbone once, then per group of `train.identities_per_batch` identities tune them
together, write each adapter to the store (atomically, with a completion mark) and log one nested
MLflow run per identity. This module only wires Ray Data and Ray Train to it.

Why the Ray layer looks the way it does:
- Every path is made absolute here, on the driver: Ray Train runs workers in a per-run working
  directory, where a relative `--output` would land somewhere nobody looks. On a cluster of
  several nodes, local paths must be shared (`check_shared`) before any work starts.
- Per-identity progress cannot go through `ray.train.report` (a barrier across workers that
  hold different numbers of identities), so workers tell a small `BatchProgress` actor, which
  the driver polls for its progress bar and the final report.
- Ray Train splits datasets with `equal=True`, which drops rows to even out the shards; a
  personalization job must tune every identity, so `EveryRowSplit` splits with `equal=False`.
- A worker that dies makes Ray Train restart the worker group; the restarted workers stream the
  dataset again and skip identities already complete in the store (or finished in this batch),
  so every identity gets exactly one adapter.
- An identity that fails keeps its reason in the report; its traceback goes to the worker's log
  and to its MLflow run (`failure.txt`, with its photos' names left out), and nothing of it
  reaches the store.
- Personal data (pv_ray.storage.personal_data): an erased identity (a tombstone in the store) is
  refused with the date until reinstated; one erased while the batch runs is dropped from the
  report and whatever the batch made of it meanwhile is erased again at the end. Resume skips an
  adapter only when its bytes match its completion mark; a corrupt one is tuned again. MLflow gets
  the config, the training metrics and the adapter without face descriptors, photo names or the
  class word (which may be inferred from the face). Worker folders are per identity and process
  (`new_work_folder`), so `pv-ray delete` and the next worker on a node find a crash's leftovers.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import ray
from ray.train import DataConfig

from pv_ray.batch.recipe import (
    INTACT,
    BatchProgress,
    TuningRecipe,
    WorkerSettings,
    failure_reason,
    status_counts,
    stored_adapter_state,
    write_prompt_embeddings,
)
from pv_ray.batch.rows import Rejection
from pv_ray.cluster.ingest import analysis_dataset
from pv_ray.cluster.shared_paths import check_shared
from pv_ray.config import PVConfig
from pv_ray.errors import InputError
from pv_ray.storage.adapter_store import AdapterStore
from pv_ray.storage.identity_folders import check_input_root, list_identity_folders
from pv_ray.storage.personal_data import (
    TrackingStore,
    erase_identity,
    record_tracking_uri,
    write_store_document,
)
from pv_ray.storage.tombstones import refusal_reason
from pv_ray.storage.tracking import Tracker, resolve_tracking_uri, sqlite_folder
from pv_ray.storage.uris import absolute_uri, is_remote

DATASET = "identities"
VERIFY_THREADS = 8  # resume hashes every stored adapter: overlap the reads
logger = logging.getLogger(__name__)


class EveryRowSplit(DataConfig):
    """Split datasets across workers without dropping rows (Ray Train's default uses equal=True)."""

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        output = [{} for _ in range(world_size)]
        for name, ds in datasets.items():
            for i, split in enumerate(ds.streaming_split(world_size, equal=False)):
                output[i][name] = split
        return output


# The ledger lives in an actor: per-identity progress cannot go through `ray.train.report`.
RemoteBatchProgress = ray.remote(num_cpus=0)(BatchProgress)


class ActorProgress:
    """The recipe's `Progress`, told to the ledger actor (fire and forget, but `is_finished`)."""

    def __init__(self, actor):
        self.actor = actor

    def analysed(self, identity_id: str, status: str | None, reason: str, rejects: list[dict[str, Any]]) -> None:
        self.actor.analysed.remote(identity_id, status, reason, rejects)

    def started(self, identity_id: str, worker: int, node: str) -> None:
        self.actor.started.remote(identity_id, worker, node)

    def finished(self, identity_id: str, status: str, info: dict[str, Any]) -> None:
        self.actor.finished.remote(identity_id, status, info)

    def is_finished(self, identity_id: str) -> bool:
        return ray.get(self.actor.is_finished.remote(identity_id))


def asked_for_early(rows: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """`rows`, its first one asked for now, in a thread. Ray Data starts the analysis only when a
    consumer asks for a row: asked for after the backbone has loaded, the worker would wait for
    the analysis pool to start (processes, face models) after its own start instead of during
    it. Only the first row is asked for ahead: the split hands rows to whichever worker asks, so
    reading further ahead would take identities from an idle worker."""
    rows, end = iter(rows), object()
    thread = ThreadPoolExecutor(1, thread_name_prefix="pv-ray-first-row")
    first = thread.submit(next, rows, end)
    thread.shutdown(wait=False)  # the one call still runs; the thread ends with it

    def all_rows() -> Iterator[dict[str, Any]]:
        row = first.result()  # an error of the dataset is raised here, in the worker's loop
        if row is not end:
            yield row
            yield from rows

    return all_rows()


def _worker_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker: the recipe over this worker's shard of the analysed identities."""
    rows = asked_for_early(ray.train.get_dataset_shard(DATASET).iter_rows())  # analysed while the backbone loads
    progress, settings = config["progress"], config["settings"]
    if config["prompt_embeddings"] is not None:  # the job's prompt rows, once their task has written them
        settings = replace(settings, prompt_embeddings=ray.get(config["prompt_embeddings"])["relpath"])
    recipe = TuningRecipe(
        settings, ActorProgress(progress), rank=ray.train.get_context().get_world_rank(),
        node=ray.get_runtime_context().get_node_id(),
    )  # fmt: skip
    summary = recipe.run(rows)
    ray.get(progress.worker_done.remote(summary))  # waited for: the driver reads it next


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


@dataclass
class _Job:
    """What the driver knows of the batch it runs."""

    cfg: PVConfig
    batch_id: str
    input_uri: str
    store: AdapterStore
    tracking_uri: str
    storage_options: dict | None
    workers: int
    force: bool
    experiment: str


def local_folders(input_uri: str, output_uri: str, tracking_uri: str) -> dict[str, str]:
    """The job's local folders, which a multi-node cluster must share (what -> folder)."""
    folders = {what: uri for what, uri in (("--input", input_uri), ("--output", output_uri)) if not is_remote(uri)}
    tracking = sqlite_folder(tracking_uri)
    if tracking is not None:
        folders["sqlite tracking store"] = str(tracking)
    return folders


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
        raise InputError(
            "memory:// output lives in one process only; Ray workers cannot share it (use a path or s3://)"
        )
    t0 = time.time()
    input_uri, output_uri = absolute_uri(input_uri), absolute_uri(output_uri)
    check_input_root(input_uri, storage_options)  # before anything is written under the output
    tracking_uri = resolve_tracking_uri(tracking_uri, output_uri)
    if not ray.is_initialized():
        ray.init(log_to_driver=False, configure_logging=False)
    check_shared(local_folders(input_uri, output_uri, tracking_uri))
    batch_id = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
    store = AdapterStore(output_uri, storage_options)
    job = _Job(cfg, batch_id, input_uri, store, tracking_uri, storage_options, workers, force, experiment)

    # `taken`: an input `alice` is refused while the store holds `Alice` (one folder on a case-folding mount).
    folders, invalid = list_identity_folders(input_uri, storage_options, taken=store.list_identities())
    invalid_rejects = [Rejection(name, reason) for name, reason in invalid]
    tracker = Tracker(tracking_uri, experiment=experiment)
    record_tracking_uri(store, tracking_uri)  # where `pv-ray delete` finds the runs, from any directory
    params = {"input": input_uri, "output": output_uri, "workers": workers, "force": force}
    parent_run_id = tracker.start_batch(batch_id, params | {"config": cfg.model_dump(mode="json")})
    progress = RemoteBatchProgress.remote(len(folders))
    todo, refused = _skip_complete(job, folders, progress)
    prompts = _prompt_embeddings(job) if todo else None
    error = _fit(job, todo, progress, parent_run_id, max_failures, on_progress, prompts) if todo else None
    status, rejects, loops = ray.get(progress.results.remote())
    erased = _finish_erasures(job, tracker, [i for i, _ in todo], status)
    rejects = [r.to_dict() for r in invalid_rejects + refused] + [r for r in rejects if r["identity_id"] not in erased]
    rejects_uri = write_store_document(store, "rejects.json", {"batch_id": batch_id, "rejects": rejects})
    todo_ids = [i for i, _ in todo if i not in erased]
    report = _report(
        job, todo_ids, invalid_rejects + refused, status, loops, error, parent_run_id, len(folders) - len(erased)
    )
    report.update(seconds=round(time.time() - t0, 3), rejects_uri=rejects_uri)
    if prompts is not None:
        report["prompt_embeddings"] = _prompt_embeddings_summary(prompts)
    report_uri = write_store_document(store, "report.json", report)
    counts = report["counts"]
    tracker.finish_batch(
        parent_run_id, {k: float(v) for k, v in counts.items()}, status="FAILED" if error else "FINISHED"
    )
    return BatchReport(
        batch_id, counts, report["identities"], rejects, report["seconds"], report_uri, rejects_uri, tracking_uri,
        store.root_uri, report["error"], loops, report["step_efficiency"],
    )  # fmt: skip


def _skip_complete(
    job: _Job, folders: list[tuple[str, str]], progress
) -> tuple[list[tuple[str, str]], list[Rejection]]:
    """The folders to analyse and tune, and the refusals of erased identities: every folder less
    the erased ones (refused until reinstated) and those whose adapter is complete and intact in
    the store (resume; nothing of them is read again). A stored adapter whose bytes do not match
    its completion mark is tuned again, and its report entry says why."""
    erased = job.store.tombstones.erased(i for i, _ in folders)
    refused = [Rejection(i, refusal_reason(i, erased[i])) for i in sorted(erased)]
    candidates = [i for i, _ in folders if i not in erased]
    states: dict[str, str | None] = {}
    if not job.force and candidates:
        with ThreadPoolExecutor(VERIFY_THREADS) as pool:
            states = dict(zip(candidates, pool.map(lambda i: stored_adapter_state(job.store, i), candidates)))
    skipped = {i for i, state in states.items() if state == INTACT}
    for identity_id in sorted(skipped):
        progress.finished.remote(
            identity_id,
            "skipped",
            {"reason": "adapter already complete in the store", "adapter_uri": job.store.uri(identity_id)},
        )
    for identity_id, state in states.items():
        if state not in (None, INTACT):
            progress.note.remote(identity_id, {"stored_adapter": f"corrupt, tuned again: {state}"})
    return [(i, uri) for i, uri in folders if i not in erased and i not in skipped], refused


def _finish_erasures(job: _Job, tracker: Tracker, todo: list[str], status: dict[str, dict[str, Any]]) -> set[str]:
    """The identities erased while the batch ran: what the batch made of them meanwhile (an
    adapter, MLflow runs, a worker folder) is erased again, and they leave the report."""
    erased = set(job.store.tombstones.erased(todo))
    for identity_id in sorted(erased):
        tracking = [TrackingStore(tracker.tracking_uri, tracker)]
        erasure = erase_identity(job.store, identity_id, tracking, tombstone=False)
        for what in erasure.left:
            logger.error("erased identity %s: not removed: %s", identity_id, what)
        status.pop(identity_id, None)
    return erased


def _prompt_embeddings(job: _Job) -> ray.ObjectRef | None:
    """The job's prompts encoded once, in a Ray task (on a GPU where the cluster has one) that runs
    while the worker group starts; each worker waits for it before loading its backbone
    (`write_prompt_embeddings`). None for a family without the cache."""
    if job.cfg.model.family != "wan":  # AnimateDiff's CLIP text encoder is small: each worker loads it
        return None
    gpus = 1 if ray.cluster_resources().get("GPU", 0) else 0
    task = ray.remote(num_cpus=1, num_gpus=gpus)(write_prompt_embeddings)
    return task.remote(job.cfg.model_dump(mode="json"), job.store.root_uri, job.storage_options)


def _prompt_embeddings_summary(ref: ray.ObjectRef | None) -> dict[str, Any]:
    """What the prompt-embeddings task did, for report.json (or why it failed)."""
    if ref is None:
        return {}
    try:
        return {k: v for k, v in ray.get(ref).items() if k != "relpath"}
    except Exception as e:  # its workers failed with it and say so; the report keeps the reason
        return {"error": failure_reason(e)}


def _fit(
    job: _Job, todo, progress, parent_run_id: str, max_failures: int, on_progress, prompts: ray.ObjectRef | None
) -> BaseException | None:
    """Analyse and tune the `todo` folders, the analysis streaming into the trainer; polls
    `progress` for `on_progress`. Returns the error that stopped the trainer, if one did."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    workers = min(job.workers, len(todo))
    # The analysis runs beside the tuning, on one actor per training worker: where the training
    # workers (one CPU each) leave too few CPUs for them, the actors share the cores rather than
    # wait for the tuning to end.
    spare_cpus = ray.cluster_resources().get("CPU", 0) - workers
    analysers = max(1, workers)  # workers is already at most one per identity
    analysis = analysis_dataset(
        job.cfg, todo, storage_options=job.storage_options, concurrency=analysers,
        num_cpus=1 if spare_cpus >= analysers else 0,
    )  # fmt: skip

    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={
            "progress": progress,
            "prompt_embeddings": prompts,
            "settings": WorkerSettings(
                pv_config=job.cfg.model_dump(mode="json"),
                output=job.store.root_uri,
                storage_options=job.storage_options,
                tracking_uri=job.tracking_uri,
                experiment=job.experiment,
                batch_id=job.batch_id,
                parent_run_id=parent_run_id,
                force=job.force,
            ),
        },  # fmt: skip
        # SPREAD: one worker per node first, so a GPU cluster uses every machine.
        scaling_config=ScalingConfig(
            num_workers=workers,
            use_gpu=bool(ray.cluster_resources().get("GPU", 0)),
            placement_strategy="SPREAD",
        ),
        run_config=RunConfig(
            name=f"pv-ray-{job.batch_id}",
            storage_path=str(Path(tempfile.gettempdir()) / "pv-ray-train"),
            failure_config=FailureConfig(max_failures=max_failures),
        ),
        datasets={DATASET: analysis},
        dataset_config=EveryRowSplit(),
    )
    error: BaseException | None = None

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
            on_progress(ray.get(progress.counts.remote()))
    return error


def _report(
    job: _Job,
    todo: list[str],
    invalid: list[Rejection],
    status: dict[str, dict[str, Any]],
    workers_summary: list[dict[str, Any]],
    error: BaseException | None,
    parent_run_id: str,
    folders: int,
) -> dict[str, Any]:
    """report.json: every identity's status (none missing), counts, worker loops, where things went."""
    for identity_id in todo:  # anything the trainer never reached (it gave up) is a failure, not a gap
        entry = status.setdefault(identity_id, {})
        if "status" not in entry:
            entry.update(status="failed", reason=f"not processed: {error!r}" if error else "not processed")
        elif entry["status"] == "running":
            entry.update(status="failed", reason=f"interrupted: {error!r}")
    for r in invalid:
        status[r.identity_id] = {"status": "rejected", "reason": r.reason}
    counts = status_counts(status, folders + len(invalid))
    return {
        "batch_id": job.batch_id,
        "input": job.input_uri,
        "output": job.store.root_uri,
        "tracking_uri": job.tracking_uri,
        "mlflow_parent_run_id": parent_run_id,
        "workers": job.workers,
        "counts": counts,
        "identities": dict(sorted(status.items())),
        "worker_loops": workers_summary,
        "step_efficiency": _step_efficiency(workers_summary),
        "error": None if error is None else repr(error),
    }


def _step_efficiency(worker_loops: list[dict[str, Any]]) -> float | None:
    """Time in tuning steps / worker wall time, over every worker loop that ran to its end."""
    wall = sum(w["wall_seconds"] for w in worker_loops)
    return round(sum(w["tune_seconds"] for w in worker_loops) / wall, 3) if wall else None
