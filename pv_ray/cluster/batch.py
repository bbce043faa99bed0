"""The batch job: personalize every identity of an input tree on a Ray cluster.

The driver lists the identity folders; a lazy Ray Data pipeline analyses them
(`pv_ray.cluster.ingest`) and streams into a Ray Train `TorchTrainer`, which fans them out over N
workers (one GPU each when present) as dataset shards: tuning starts with the first analysed
identity. Each worker loads the backbone once, then per group of `train.identities_per_batch`
identities: tunes them together, writes each adapter to the store (atomically, with a completion
mark) and logs one nested MLflow run per identity.

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

import contextlib
import logging
import tempfile
import threading
import time
import traceback
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
from ray.train import DataConfig

from pv_ray.cluster.ingest import Rejection, analysis_dataset, reference_from_row, row_outcome
from pv_ray.cluster.shared_paths import check_shared
from pv_ray.config import PVConfig, config_from_dict
from pv_ray.errors import InputError, TuningFailed
from pv_ray.storage.adapter_store import AdapterNotFound, AdapterStore, AdapterStoreError
from pv_ray.storage.identity_folders import check_input_root, list_identity_folders
from pv_ray.storage.personal_data import (
    TrackingStore,
    erase_identity,
    new_work_folder,
    record_tracking_uri,
    remove_stale_work_folders,
    remove_work_folder,
    write_store_document,
)
from pv_ray.storage.root import StorageUnavailable, absolute_uri
from pv_ray.storage.tombstones import refusal_reason
from pv_ray.storage.tracking import IdentityRun, Tracker, resolve_tracking_uri, sqlite_folder

if TYPE_CHECKING:  # the worker imports the method lazily: the driver never loads torch
    from pv_ray.method.personalizer import IdentityInput, PersonalizeResult
    from pv_ray.method.tuner import StepMetrics

DATASET = "identities"
FINISHED = ("done", "failed", "skipped")
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


@ray.remote(num_cpus=0)
class BatchProgress:
    """Per-identity status and rejections, shared by the workers and read by the driver."""

    def __init__(self, total: int):
        self.total = total  # identity folders of the batch (valid names)
        self.status: dict[str, dict[str, Any]] = {}
        self.rejects: dict[str, list[dict[str, Any]]] = {}  # by identity: a restarted worker group reports again
        self.workers: list[dict[str, Any]] = []  # one entry per worker loop that ran to its end

    def analysed(self, identity_id: str, status: str | None, reason: str, rejects: list[dict[str, Any]]) -> None:
        """Ingest's outcome for one identity: its rejections, and its end if it cannot be tuned."""
        self.rejects[identity_id] = rejects
        entry = self.status.setdefault(identity_id, {})
        entry["analysed"] = time.time()
        if status is not None:
            entry.update(status=status, reason=reason)

    def started(self, identity_id: str, worker: int, node: str) -> None:
        entry = self.status.setdefault(identity_id, {})
        if entry.get("status") not in FINISHED:
            entry.update(status="running", worker=worker, node=node, started=time.time())
            entry["attempts"] = entry.get("attempts", 0) + 1

    def finished(self, identity_id: str, status: str, info: dict[str, Any]) -> None:
        self.status.setdefault(identity_id, {}).update(status=status, finished=time.time(), **info)

    def note(self, identity_id: str, info: dict[str, Any]) -> None:
        """Add to an identity's report entry (e.g. why its stored adapter is tuned again)."""
        self.status.setdefault(identity_id, {}).update(info)

    def is_finished(self, identity_id: str) -> bool:
        return self.status.get(identity_id, {}).get("status") in FINISHED

    def worker_done(self, summary: dict[str, Any]) -> None:
        self.workers.append(summary)

    def counts(self) -> dict[str, int]:
        """The counts the driver's progress bar shows (cheap to poll: not the whole table)."""
        return _counts(self.status, self.total)

    def results(self) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
        """(status by identity, rejections, worker loop summaries): what the report is made of."""
        rejects = [r for identity_id in sorted(self.rejects) for r in self.rejects[identity_id]]
        return self.status, rejects, self.workers


def failure_reason(error: BaseException) -> str:
    """The report's one line for an identity's failure: our own errors say it themselves."""
    if isinstance(error, (TuningFailed, InputError)):
        return str(error)
    if isinstance(error, StorageUnavailable):
        return f"storage error (retried by the next run): {error}"
    return f"{type(error).__name__}: {error}"


class WorkerLoop:
    """One Ray Train worker: load the backbone once, tune its shard's identities, up to
    `train.identities_per_batch` of them together in one batched rollout."""

    def __init__(self, config: dict[str, Any]):
        from pv_ray.method.personalizer import Personalizer

        self.started, self.cpu_started = time.time(), time.process_time()
        self.config = config
        self.cfg = config_from_dict(config["pv_config"])
        self.rank = ray.train.get_context().get_world_rank()
        self.node = ray.get_runtime_context().get_node_id()
        self.progress = config["progress"]
        self.store = AdapterStore(config["output"], config["storage_options"])
        self.tracker = Tracker(config["tracking_uri"], experiment=config["experiment"])
        remove_stale_work_folders()  # what a crashed worker on this node left
        load_started = time.time()
        self.personalizer = Personalizer(self.cfg)
        self.load_seconds = time.time() - load_started  # the backbone, face models and adapter
        self.tune_seconds, self.tuned = 0.0, 0

    def run(self) -> None:
        group: list[dict[str, Any]] = []
        for row in ray.train.get_dataset_shard(DATASET).iter_rows():
            outcome = row_outcome(row)
            self.progress.analysed.remote(
                row["identity_id"], outcome.status, outcome.reason, [r.to_dict() for r in outcome.rejects]
            )
            if outcome.status is not None or self._settled_or_failed(row["identity_id"]):
                continue
            group.append(row)
            if len(group) == self.cfg.train.identities_per_batch:
                self.tune_group(group)
                group = []
        if group:
            self.tune_group(group)
        ray.get(self.progress.worker_done.remote(self.summary()))  # waited for: the driver reads it next

    def _settled_or_failed(self, identity_id: str) -> bool:
        """`_settled`, with any error of it failing this identity alone (a raise here would restart
        the whole worker group, and fail every identity with it)."""
        try:
            return self._settled(identity_id)
        except Exception as e:
            self.progress.finished.remote(identity_id, "failed", {"reason": failure_reason(e)})
            return True

    def _settled(self, identity_id: str) -> bool:
        """Whether this identity needs no tuning here: finished before a worker-group restart,
        erased while the batch ran, or complete and intact in the store (skipped unless --force)."""
        if ray.get(self.progress.is_finished.remote(identity_id)):
            return True
        erased_on = self.store.tombstones.erased_on(identity_id)
        if erased_on is not None:
            self.progress.finished.remote(identity_id, "rejected", {"reason": refusal_reason(identity_id, erased_on)})
            return True
        if not self.config["force"] and stored_adapter_state(self.store, identity_id) == INTACT:
            self.progress.finished.remote(
                identity_id,
                "skipped",
                {"reason": "adapter already complete in the store", "adapter_uri": self.store.uri(identity_id)},
            )
            return True
        return False

    def tune_group(self, rows: list[dict[str, Any]]) -> None:
        """Tune, store and log these identities together; each ends done or failed on its own (a
        failed one's MLflow run is FAILED, with the traceback as `failure.txt`, nothing stored)."""
        from pv_ray.method.personalizer import IdentityInput

        t0, config = time.time(), self.config
        opened: list[tuple[IdentityInput, IdentityRun]] = []
        with contextlib.ExitStack() as cleanup:
            for row in rows:
                identity_id = row["identity_id"]
                self.progress.started.remote(identity_id, self.rank, self.node)
                workdir = new_work_folder(identity_id)
                cleanup.callback(remove_work_folder, workdir)
                try:
                    reference, meta = reference_from_row(row)
                    run = self.tracker.identity_run(config["parent_run_id"], identity_id, config["batch_id"])
                    cleanup.push(_closing(run))  # FINISHED (FAILED on an error) on the way out unless _fail closed it
                    # The config only: nothing estimated from the face (class word, photo counts), no photo name.
                    run.log_params({"config": config["pv_config"]})
                except Exception as e:
                    self._fail(identity_id, None, e, t0)
                    continue
                opened.append((IdentityInput(identity_id, reference, workdir, meta), run))
            if not opened:
                return
            runs = {item.identity_id: run for item, run in opened}
            try:
                results = self.personalizer.personalize_many(
                    [item for item, _ in opened],
                    on_step=lambda identity_id, m: runs[identity_id].log_metrics(_step_metrics(m), step=m.step),
                )
            except Exception as e:  # the whole rollout failed: so did each of its identities
                results = [e] * len(opened)
            for (item, run), result in zip(opened, results):
                try:
                    if isinstance(result, Exception):
                        raise result
                    info = self._keep(item, run, result)
                    together = {
                        "tuned_with": [other.identity_id for other, _ in opened],
                        "seconds": round(time.time() - t0, 3),
                    }
                    self.progress.finished.remote(item.identity_id, "done", info | together)
                except Exception as e:
                    self._fail(item.identity_id, run, e, t0, [p.name for p in item.reference.photos])

    def _keep(self, item: IdentityInput, run: IdentityRun, result: PersonalizeResult) -> dict[str, Any]:
        """Store one tuned identity's adapter and log it; returns its report entry."""
        record = self.store.put(item.identity_id, item.out_dir, overwrite=True)
        summary = {f"{k}_before": v for k, v in result.metrics_before.items()} | {
            f"{k}_after": v for k, v in result.metrics_after.items()
        }
        run.log_metrics({k: v for k, v in summary.items() if v == v}, step=self.cfg.train.steps)  # NaN-free
        run.log_adapter(item.out_dir)
        run.set_tags({"adapter_uri": record.uri, "worker": str(self.rank)})
        identity_tune_seconds = sum(m.seconds for m in result.history)
        self.tune_seconds, self.tuned = self.tune_seconds + identity_tune_seconds, self.tuned + 1
        return {
            "tune_seconds": round(identity_tune_seconds, 3),
            "adapter_uri": record.uri,
            "mlflow_run_id": run.run_id,
            "metrics_before": result.info["metrics_before"],
            "metrics_after": result.info["metrics_after"],
        }

    def _fail(
        self, identity_id: str, run: IdentityRun | None, error: Exception, t0: float, photos: list[str] = ()
    ) -> None:
        """Record one identity's failure (one identity's failure never stops the others). MLflow
        gets the reason and traceback with the photos' names left out."""
        logger.error("identity %s failed", identity_id, exc_info=error)
        if run is not None:
            with contextlib.suppress(Exception):  # the failure itself matters more than its record
                run.set_tags({"failure_reason": without_names(failure_reason(error), photos)[:5000]})
                run.log_text(without_names("".join(traceback.format_exception(error)), photos), "failure.txt")
                run.finish("FAILED")
        self.progress.finished.remote(
            identity_id, "failed", {"reason": failure_reason(error), "seconds": round(time.time() - t0, 3)}
        )

    def summary(self) -> dict[str, Any]:
        """Step efficiency: the share of this worker's wall time (backbone load included) spent in
        tuning steps; the rest is loading, evaluation, writing and waiting for data. cpu_per_wall:
        CPU seconds this worker process got per wall second; well under its torch thread count on
        a CPU node means it was waiting for cores (other workers, Ray's processes)."""
        wall, cpu = time.time() - self.started, time.process_time() - self.cpu_started
        return {
            "rank": self.rank,
            "node": self.node,
            "identities_tuned": self.tuned,
            "wall_seconds": round(wall, 3),
            "load_seconds": round(self.load_seconds, 3),
            "tune_seconds": round(self.tune_seconds, 3),
            "step_efficiency": round(self.tune_seconds / wall, 3) if wall else None,
            "tracking_seconds": round(self.tracker.seconds, 3),  # in MLflow calls, lock waits included
            "cpu_seconds": round(cpu, 3),
            "cpu_per_wall": round(cpu / wall, 3) if wall else None,
        }


def _closing(run: IdentityRun):
    """An exit callback that finishes an identity's MLflow run if nothing did. A run that cannot be
    closed (`pv-ray delete` removed it meanwhile) must not stop the worker, nor the other identities."""

    def close(exc_type, exc, tb) -> None:
        if not run.finished:
            try:
                run.finish("FAILED" if exc_type is not None else "FINISHED")
            except Exception:
                logger.warning("the MLflow run of %s could not be closed", run.identity_id, exc_info=True)

    return close


def without_names(text: str, names: list[str]) -> str:
    """`text` with each of `names` (photo file names) replaced by `<photo>`, longest first."""
    for name in sorted(set(names), key=len, reverse=True):
        if name:
            text = text.replace(name, "<photo>")
    return text


INTACT = "intact"


def stored_adapter_state(store: AdapterStore, identity_id: str) -> str | None:
    """None if the store has no complete adapter of the identity, INTACT if its files match their
    completion mark, else why they do not (the adapter is then tuned again)."""
    try:
        store.verify(identity_id)  # reads the mark first: no mark (or erased) is AdapterNotFound
    except AdapterNotFound:
        return None
    except (AdapterStoreError, FileNotFoundError) as e:  # a file gone from under its mark: corrupt too
        return str(e)
    except Exception as e:  # unreadable for any other reason (storage, permissions): tuned again, never skipped
        return f"it could not be checked ({type(e).__name__}: {e})"
    return INTACT


def _step_metrics(m: StepMetrics) -> dict[str, float]:
    """One tuning step's metrics as logged to the identity's MLflow run."""
    return {
        "loss": m.loss, "loss_id": m.loss_id, "loss_scr": m.loss_scr, "face_sim": m.face_sim,
        "no_face_rate": m.no_face_rate, "grad_norm": m.grad_norm,
    }  # fmt: skip


def _worker_loop(config: dict[str, Any]) -> None:
    WorkerLoop(config).run()


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
    folders = {what: uri for what, uri in (("--input", input_uri), ("--output", output_uri)) if "://" not in uri}
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
    progress = BatchProgress.remote(len(folders))
    todo, refused = _skip_complete(job, folders, progress)
    error = _fit(job, todo, progress, parent_run_id, max_failures, on_progress) if todo else None
    status, rejects, loops = ray.get(progress.results.remote())
    erased = _finish_erasures(job, tracker, [i for i, _ in todo], status)
    rejects = [r.to_dict() for r in invalid_rejects + refused] + [r for r in rejects if r["identity_id"] not in erased]
    rejects_uri = write_store_document(store, "rejects.json", {"batch_id": batch_id, "rejects": rejects})
    todo_ids = [i for i, _ in todo if i not in erased]
    report = _report(
        job, todo_ids, invalid_rejects + refused, status, loops, error, parent_run_id, len(folders) - len(erased)
    )
    report.update(seconds=round(time.time() - t0, 3), rejects_uri=rejects_uri)
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


def _fit(job: _Job, todo, progress, parent_run_id: str, max_failures: int, on_progress) -> BaseException | None:
    """Analyse and tune the `todo` folders, the analysis streaming into the trainer; polls
    `progress` for `on_progress`. Returns the error that stopped the trainer, if one did."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    workers = min(job.workers, len(todo))
    # The analysis runs beside the tuning: where the training workers (one CPU each) leave no
    # CPU free, its tasks share the cores rather than wait for the tuning to end.
    spare_cpus = ray.cluster_resources().get("CPU", 0) - workers
    analysis = analysis_dataset(
        job.cfg, todo, storage_options=job.storage_options, concurrency=max(1, workers),
        num_cpus=1 if spare_cpus >= 1 else 0,
    )  # fmt: skip

    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={
            "pv_config": job.cfg.model_dump(mode="json"),
            "progress": progress,
            "output": job.store.root_uri,
            "storage_options": job.storage_options,
            "tracking_uri": job.tracking_uri,
            "experiment": job.experiment,
            "batch_id": job.batch_id,
            "parent_run_id": parent_run_id,
            "force": job.force,
        },
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
    counts = _counts(status, folders + len(invalid))
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


def _counts(status: dict[str, dict[str, Any]], total: int) -> dict[str, int]:
    """Identities per status out of `total`; remaining: not finished yet (nor rejected)."""
    counts = {k: 0 for k in (*FINISHED, "rejected", "running")}
    for entry in status.values():
        if entry.get("status") in counts:
            counts[entry["status"]] += 1
    counts["remaining"] = total - sum(counts[k] for k in (*FINISHED, "rejected"))
    counts["total"] = total
    return counts
