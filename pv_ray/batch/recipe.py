"""One tuning worker's share of a batch job, without Ray: the recipe.

For each analysed row (`pv_ray.batch.rows`) the recipe, top to bottom:

1. skips what needs no tuning here: rejected by ingest, finished before a worker-group restart,
   erased while the batch ran, or complete and intact in the store (unless `force`);
2. groups up to `train.identities_per_batch` identities;
3. opens one MLflow run per identity (the config only as params);
4. evaluates before, tunes the group in one batched rollout, evaluates after (`Personalizer`);
5. saves each adapter into the store (atomically, with its completion mark) and logs it;
6. records each identity's end in the progress ledger: done, skipped, rejected or failed with a
   reason (one identity's failure never stops the others).

`pv_ray.cluster.batch` runs it on each Ray Train worker over that worker's dataset shard, with the
ledger (`BatchProgress`) in a Ray actor; a test runs it in-process with the ledger as a plain
object. Personal data: worker folders are per identity and process (`new_work_folder`), MLflow
gets no face descriptor, photo name or class word.
"""

from __future__ import annotations

import contextlib
import logging
import time
import traceback
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from pv_ray.batch.rows import reference_from_row, row_outcome
from pv_ray.config import config_from_dict
from pv_ray.errors import InputError, TuningFailed
from pv_ray.storage.adapter_store import AdapterNotFound, AdapterStore, AdapterStoreError
from pv_ray.storage.personal_data import new_work_folder, remove_stale_work_folders, remove_work_folder
from pv_ray.storage.root import StorageUnavailable
from pv_ray.storage.tombstones import refusal_reason
from pv_ray.storage.tracking import IdentityRun, Tracker

if TYPE_CHECKING:  # loaded by the recipe itself: a driver that imports this module never loads torch
    from pv_ray.method.personalizer import IdentityInput, PersonalizeResult
    from pv_ray.method.tuner import StepMetrics

FINISHED = ("done", "failed", "skipped")
PROMPT_EMBEDDINGS_DIR = "prompt-embeddings"  # in the store: the job's prompt rows (no personal data)
MAX_PROMPT_EMBEDDINGS_BYTES = 4 << 30
INTACT = "intact"
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerSettings:
    """What every tuning worker of one batch job is told."""

    pv_config: dict[str, Any]  # the config, as JSON (it crosses process boundaries)
    output: str  # the adapter store's URI
    storage_options: dict[str, Any] | None
    tracking_uri: str
    experiment: str
    batch_id: str
    parent_run_id: str  # the batch's MLflow run; each identity's run nests under it
    force: bool  # tune identities whose adapter is already complete in the store
    prompt_embeddings: str | None = None  # the job's prompt embeddings in the store (`write_prompt_embeddings`)


class Progress(Protocol):
    """Where a worker reports each identity's way through the recipe (`BatchProgress`)."""

    def analysed(self, identity_id: str, status: str | None, reason: str, rejects: list[dict[str, Any]]) -> None: ...
    def started(self, identity_id: str, worker: int, node: str) -> None: ...
    def finished(self, identity_id: str, status: str, info: dict[str, Any]) -> None: ...
    def is_finished(self, identity_id: str) -> bool: ...


class BatchProgress:
    """The ledger of a batch: per-identity status and rejections, written by the workers and read
    by the driver (in a Ray actor on a cluster)."""

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
        return status_counts(self.status, self.total)

    def results(self) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
        """(status by identity, rejections, worker loop summaries): what the report is made of."""
        rejects = [r for identity_id in sorted(self.rejects) for r in self.rejects[identity_id]]
        return self.status, rejects, self.workers


def status_counts(status: dict[str, dict[str, Any]], total: int) -> dict[str, int]:
    """Identities per status out of `total`; remaining: not finished yet (nor rejected)."""
    counts = {k: 0 for k in (*FINISHED, "rejected", "running")}
    for entry in status.values():
        if entry.get("status") in counts:
            counts[entry["status"]] += 1
    counts["remaining"] = total - sum(counts[k] for k in (*FINISHED, "rejected"))
    counts["total"] = total
    return counts


class TuningRecipe:
    """One worker: load the backbone once, then tune the identities of `rows`, up to
    `train.identities_per_batch` of them together in one batched rollout."""

    def __init__(self, settings: WorkerSettings, progress: Progress, *, rank: int = 0, node: str = "local"):
        from pv_ray.method.personalizer import Personalizer

        self.started, self.cpu_started = time.time(), time.process_time()
        self.settings, self.progress, self.rank, self.node = settings, progress, rank, node
        self.cfg = config_from_dict(settings.pv_config)
        self.store = AdapterStore(settings.output, settings.storage_options)
        self.tracker = Tracker(settings.tracking_uri, experiment=settings.experiment)
        remove_stale_work_folders()  # what a crashed worker on this node left
        load_started = time.time()
        backbone = None
        if settings.prompt_embeddings:
            from pv_ray.backbones import load_backbone
            from pv_ray.model.prompt_embeddings import PromptEmbeddings

            data = self.store.root.read_bytes(settings.prompt_embeddings, MAX_PROMPT_EMBEDDINGS_BYTES)
            backbone = load_backbone(self.cfg.model, PromptEmbeddings.from_bytes(data))
        self.personalizer = Personalizer(self.cfg, backbone)
        self.load_seconds = time.time() - load_started  # the backbone, face models and adapter
        self.tune_seconds, self.tuned = 0.0, 0

    def run(self, rows: Iterable[dict[str, Any]]) -> dict[str, Any]:
        """Tune every row that needs it; returns this worker's `summary`."""
        group: list[dict[str, Any]] = []
        for row in rows:
            outcome = row_outcome(row)
            self.progress.analysed(
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
        return self.summary()

    def _settled_or_failed(self, identity_id: str) -> bool:
        """`_settled`, with any error of it failing this identity alone (a raise here would restart
        the whole worker group, and fail every identity with it)."""
        try:
            return self._settled(identity_id)
        except Exception as e:
            self.progress.finished(identity_id, "failed", {"reason": failure_reason(e)})
            return True

    def _settled(self, identity_id: str) -> bool:
        """Whether this identity needs no tuning here: finished before a worker-group restart,
        erased while the batch ran, or complete and intact in the store (skipped unless force)."""
        if self.progress.is_finished(identity_id):
            return True
        erased_on = self.store.tombstones.erased_on(identity_id)
        if erased_on is not None:
            self.progress.finished(identity_id, "rejected", {"reason": refusal_reason(identity_id, erased_on)})
            return True
        if not self.settings.force and stored_adapter_state(self.store, identity_id) == INTACT:
            self.progress.finished(
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

        t0, settings = time.time(), self.settings
        opened: list[tuple[IdentityInput, IdentityRun]] = []
        with contextlib.ExitStack() as cleanup:
            for row in rows:
                identity_id = row["identity_id"]
                self.progress.started(identity_id, self.rank, self.node)
                workdir = new_work_folder(identity_id)
                cleanup.callback(remove_work_folder, workdir)
                try:
                    reference, meta = reference_from_row(row)
                    run = self.tracker.identity_run(settings.parent_run_id, identity_id, settings.batch_id)
                    cleanup.push(_closing(run))  # FINISHED (FAILED on an error) on the way out unless _fail closed it
                    # The config only: nothing estimated from the face (class word, photo counts), no photo name.
                    run.log_params({"config": settings.pv_config})
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
                    on_step=lambda identity_id, m: runs[identity_id].log_metrics(step_metrics(m), step=m.step),
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
                    self.progress.finished(item.identity_id, "done", info | together)
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
        self.progress.finished(
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


def write_prompt_embeddings(pv_config: dict[str, Any], output: str, storage_options: dict | None) -> dict[str, Any]:
    """Encode every prompt a Wan job's identities will use once (`job_prompts`), with the text
    encoder alone, and store the rows beside the adapters, for the workers to read instead of
    loading the text encoder; kept for a rerun of the same job (same weights, same prompts).
    Returns what it did, for the report."""
    import hashlib
    import json

    import torch

    from pv_ray.backbones import configured_backbone_record, encode_job_prompts
    from pv_ray.method.personalizer import job_prompts

    cfg = config_from_dict(pv_config)
    store = AdapterStore(output, storage_options)
    prompts = job_prompts(cfg)
    key = json.dumps([configured_backbone_record(cfg.model)["fingerprint"], cfg.model.dtype, prompts])
    relpath = f"{PROMPT_EMBEDDINGS_DIR}/{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"
    summary: dict[str, Any] = {"uri": store.root.uri_of(store.root.path(relpath)), "prompts": len(prompts)}
    path = store.root.path(relpath)
    if store.root.retry(f"looking up {summary['uri']}", lambda: store.fs.exists(path)):
        return {**summary, "relpath": relpath, "reused": True}
    started = time.time()
    embeddings = encode_job_prompts(cfg.model, prompts)
    assert embeddings is not None, "a Wan config"
    store.root.write_bytes(relpath, embeddings.to_bytes())
    parameters = _text_encoder_parameters(cfg)
    return {
        **summary, "relpath": relpath, "reused": False, "seconds": round(time.time() - started, 3),
        # What each worker no longer loads: the text encoder's parameters and their bytes in the model dtype.
        "text_encoder_parameters": parameters,
        "text_encoder_bytes_per_worker": parameters * torch.finfo(getattr(torch, cfg.model.dtype)).bits // 8,
    }  # fmt: skip


def _text_encoder_parameters(cfg) -> int:
    """The text encoder's parameter count, from its safetensors headers (no tensor is read)."""
    import math

    from safetensors import safe_open

    from pv_ray.backbones import model_paths

    total = 0
    for file in (model_paths(cfg.model).base / "text_encoder").glob("*.safetensors"):
        with safe_open(file, "pt") as weights:
            names = weights.keys()  # a safe_open handle is not iterable itself
            total += sum(math.prod(weights.get_slice(name).get_shape()) for name in names)
    return total


def failure_reason(error: BaseException) -> str:
    """The report's one line for an identity's failure: our own errors say it themselves."""
    if isinstance(error, (TuningFailed, InputError)):
        return str(error)
    if isinstance(error, StorageUnavailable):
        return f"storage error (retried by the next run): {error}"
    return f"{type(error).__name__}: {error}"


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


def step_metrics(m: StepMetrics) -> dict[str, float]:
    """One tuning step's metrics as logged to the identity's MLflow run."""
    return {
        "loss": m.loss, "loss_id": m.loss_id, "loss_scr": m.loss_scr, "face_sim": m.face_sim,
        "no_face_rate": m.no_face_rate, "grad_norm": m.grad_norm,
    }  # fmt: skip
