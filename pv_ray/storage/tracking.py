"""MLflow tracking for a batch: one parent run per batch, one nested run per identity.

Backends: ``sqlite:////abs/path.db`` (embedded; the file is created if missing) or
``http(s)://host:port`` (a shared ``mlflow server``). An explicit ``MlflowClient`` is used so
nothing touches MLflow's process-global tracking URI or active-run stack.

Concurrency: SQLite allows one writer at a time, and MLflow's own retries do not cover
several *processes* racing on one file (experiment creation, schema migration, writes). With
a sqlite URI every client call therefore runs under an inter-process ``fcntl.flock`` on
``<db>.lock`` and is retried with backoff on "database is locked" (a non-cooperating reader,
e.g. ``mlflow ui``, can still take the file). Over HTTP the server serialises.

Where: the default store is sqlite under a local output folder; a remote output (s3://, gs://)
needs an explicit tracking URI (an MLflow server or a sqlite file on a shared path): pv-ray never
falls back to the working directory, where the runs (and whatever they hold of a person) would
land beside whatever is there, a git checkout included.

Idempotency: exactly one run per batch id, and exactly one nested run per (batch, identity).
``start_batch``/``identity_run`` look for the existing run first and reuse it whatever its
status (a retried worker re-runs an identity): it is set back to RUNNING and its
``pv_ray.attempt`` tag is incremented. Metric points of the earlier attempt stay in the run's
history; params must keep their values (MLflow refuses a changed param). With sqlite the
look-up-then-create runs under the file lock, so it is atomic across processes on one
host; over HTTP it relies on the batch giving an identity to one worker at a time.
"""

from __future__ import annotations

import fcntl
import json
import random
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, Run, RunTag, ViewType
from mlflow.exceptions import MlflowException
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.utils.validation import (
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
)

from pv_ray.errors import InputError
from pv_ray.storage.adapter_folder import METADATA_NAME, WEIGHTS_NAME, for_tracking
from pv_ray.storage.identity import IDENTITY_ID_PATTERN, is_valid_identity_id, validate_identity_id
from pv_ray.storage.uris import absolute_uri, is_remote, scheme_of

__all__ = ["IdentityRun", "Tracker", "default_tracking_uri", "flatten_params", "resolve_tracking_uri"]

TAG_KIND = "pv_ray.kind"
TAG_ATTEMPT = "pv_ray.attempt"
TAG_BATCH = "batch_id"
TAG_IDENTITY = "identity_id"
TAG_PARENT = "mlflow.parentRunId"
KIND_BATCH = "batch"
KIND_IDENTITY = "identity"
ADAPTER_ARTIFACT_PATH = "adapter"
TERMINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")

_TRUNCATED = "...[truncated]"
_LOCK_RETRIES = 8
_RUN_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_T = TypeVar("_T")


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config dicts → ``{"a.b.c": "value"}`` as MLflow params.

    Lists/tuples are written as JSON; values longer than MLflow's limit (6000 chars) are cut
    and end with ``...[truncated]`` rather than failing the whole batch.
    """
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, prefix=f"{name}."))
            continue
        text = json.dumps(list(value)) if isinstance(value, (list, tuple)) else str(value)
        if len(text) > MAX_PARAM_VAL_LENGTH:
            text = text[: MAX_PARAM_VAL_LENGTH - len(_TRUNCATED)] + _TRUNCATED
        flat[name] = text
    return flat


def _validate_batch_id(batch_id: str) -> str:
    # Same alphabet as identity ids: safe in MLflow filter strings and in paths.
    if not is_valid_identity_id(batch_id):
        raise ValueError(f"invalid batch id {batch_id!r}: must match {IDENTITY_ID_PATTERN}")
    return batch_id


def _is_database_locked(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if "database is locked" in str(seen) or "database table is locked" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _sqlite_db_path(tracking_uri: str) -> Path:
    path = Path(tracking_uri[len("sqlite:///") :])
    if not path.is_absolute():
        raise ValueError(
            f"sqlite tracking URI {tracking_uri!r} must hold an absolute path "
            "(sqlite:////abs/path.db); a relative one would depend on the working directory"
        )
    return path


SQLITE_NAME = "mlflow.db"
REMOTE_NEEDS_TRACKING = "an {scheme}:// output needs --tracking-uri (an MLflow server or sqlite:////shared/path.db)"


def default_tracking_uri(output: str, create: bool = True) -> str:
    """The embedded sqlite store under a local output folder (its folder made unless `create` is
    false). A remote output has no default: InputError (never a store in the working directory)."""
    if is_remote(output):
        raise InputError(REMOTE_NEEDS_TRACKING.format(scheme=scheme_of(output)))
    local = absolute_uri(output)
    base = Path(local)
    if create:
        base.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(base / SQLITE_NAME).resolve()}"


def resolve_tracking_uri(tracking_uri: str | None, output: str) -> str:
    """The tracking URI a job uses: the default under `output`, or the given one with a relative
    sqlite path made absolute (here, before any worker in another directory sees it)."""
    if tracking_uri is None:
        return default_tracking_uri(output)
    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri[len("sqlite:///") :]).is_absolute():
        return f"sqlite:///{Path(tracking_uri[len('sqlite:///') :]).resolve()}"
    return tracking_uri


def sqlite_folder(tracking_uri: str) -> Path | None:
    """The folder of an sqlite tracking store (None for a tracking server)."""
    return _sqlite_db_path(tracking_uri).parent if tracking_uri.startswith("sqlite:///") else None


class Tracker:
    """Creates and finds the batch's MLflow runs; see the module docstring for semantics.

    With `create=False` (erasure, export) an existing store is opened and nothing is made: a
    missing sqlite file is FileNotFoundError, and a missing experiment is not created."""

    def __init__(self, tracking_uri: str, experiment: str = "pv-ray", create: bool = True) -> None:
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment
        artifact_location: str | None = None
        self._lock_path: Path | None = None
        if tracking_uri.startswith("sqlite:///"):
            db_path = _sqlite_db_path(tracking_uri)
            if not create and not db_path.is_file():
                raise FileNotFoundError(f"no MLflow store at {db_path}")
            db_path.parent.mkdir(parents=True, exist_ok=True)
            self._lock_path = db_path.with_name(db_path.name + ".lock")
            # MLflow's default would be ./mlruns relative to whichever CWD created the
            # experiment; keep artifacts next to the database instead.
            artifact_location = (db_path.parent / "artifacts").as_uri()
        elif not tracking_uri.startswith(("http://", "https://")):
            raise ValueError(f"tracking_uri {tracking_uri!r} must be sqlite:////abs/path.db or http(s)://...")
        self.seconds = 0.0  # wall time spent in MLflow calls (see `_call`)
        self._thread_lock = threading.RLock()
        self._lock_depth = 0
        self._lock_file: Any = None
        with self._db_lock():
            # Creating the client creates/migrates the sqlite schema: a race without the lock.
            self.client = self._call(MlflowClient, tracking_uri)
            if create:
                self.experiment_id: str | None = self._get_or_create_experiment(experiment, artifact_location)
            else:
                found = self._call(self.client.get_experiment_by_name, experiment)  # reaches the store now
                self.experiment_id = found.experiment_id if found is not None else None

    def __reduce__(self) -> tuple[type[Tracker], tuple[str, str]]:
        # Ray ships trackers to workers: rebuild from the URI instead of pickling locks.
        return (Tracker, (self.tracking_uri, self.experiment_name))

    # ------------------------------------------------------------------ runs

    def start_batch(self, batch_id: str, params: Mapping[str, Any]) -> str:
        """The batch's parent run id (reused if this batch id already has one)."""
        _validate_batch_id(batch_id)
        tags = {TAG_BATCH: batch_id, TAG_KIND: KIND_BATCH}
        with self._db_lock():
            run_id = self._create_or_resume(tags, run_name=batch_id)
            self.log_params(run_id, params)
        return run_id

    def identity_run(self, parent_run_id: str, identity_id: str, batch_id: str) -> IdentityRun:
        """The nested run of ``identity_id`` under the batch's parent run (one per pair)."""
        validate_identity_id(identity_id)
        _validate_batch_id(batch_id)
        if not _RUN_ID_RE.fullmatch(parent_run_id):
            raise ValueError(f"invalid parent run id {parent_run_id!r}")
        tags = {
            TAG_PARENT: parent_run_id,
            TAG_BATCH: batch_id,
            TAG_IDENTITY: identity_id,
            TAG_KIND: KIND_IDENTITY,
        }
        with self._db_lock():
            run_id = self._create_or_resume(tags, run_name=identity_id)
        return IdentityRun(self, run_id, identity_id=identity_id, batch_id=batch_id)

    def finish_batch(self, run_id: str, metrics: Mapping[str, float] | None = None, status: str = "FINISHED") -> None:
        """Log the batch's summary metrics and close its parent run."""
        _check_status(status)
        if metrics:
            now = _now_ms()
            entries = [Metric(k, float(v), now, 0) for k, v in metrics.items()]
            self.log_batch(run_id, metrics=entries)
        self.terminate(run_id, status)

    def find_identity_runs(self, batch_id: str) -> list[Run]:
        """All nested identity runs of a batch, sorted by identity id."""
        _validate_batch_id(batch_id)
        runs = self._search(self._filter({TAG_BATCH: batch_id, TAG_KIND: KIND_IDENTITY}))
        return sorted(runs, key=lambda run: run.data.tags[TAG_IDENTITY])

    def find_batch_run(self, batch_id: str) -> Run | None:
        """The batch's parent run, if it was started."""
        _validate_batch_id(batch_id)
        runs = self._search(self._filter({TAG_BATCH: batch_id, TAG_KIND: KIND_BATCH}))
        return runs[0] if runs else None

    def identity_runs(self, identity_id: str) -> list[dict[str, Any]]:
        """Every run of `identity_id` in this tracking store as plain data (for an export)."""
        return [
            {
                "run_id": run.info.run_id,
                "experiment": run.info.experiment_id,
                "status": run.info.status,
                "params": run.data.params,
                "metrics": run.data.metrics,
                "tags": {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.")},
            }
            for run in self._runs_of(identity_id, ViewType.ACTIVE_ONLY)
        ]

    def _runs_of(self, identity_id: str, view: int) -> list[Run]:
        """The runs tagged with `identity_id`, in every experiment of this tracking store."""
        validate_identity_id(identity_id)  # before it goes into a filter string
        experiments = self._call(self.client.search_experiments, view_type=ViewType.ALL)
        if not experiments:
            return []
        return self._search(self._filter({TAG_IDENTITY: identity_id}), [e.experiment_id for e in experiments], view)

    def erase_identity(self, identity_id: str) -> tuple[list[str], list[str]]:
        """Remove every run of `identity_id` (tuning and evaluation, every batch and experiment of
        this tracking store) with its artifacts. Returns (what was removed, what could not be).

        sqlite: runs hard-deleted as `mlflow gc` does, then the file vacuumed, so no byte of them
        is left in free pages. A tracking server offers no hard delete over HTTP: the artifacts go,
        the runs are soft-deleted, and each is listed as left for `mlflow gc` on the server.

        A sqlite store keeps its runs' artifacts beside the file (`artifacts/<run id>/`), but MLflow
        records their absolute path: in a copied folder they name the original's. Those are
        deleted in this store's own folder, and nothing outside it is touched."""
        removed: list[str] = []
        left: list[str] = []
        with self._db_lock():
            runs = self._runs_of(identity_id, ViewType.ALL)
            hard_delete = getattr(self.client._tracking_client.store, "_hard_delete_run", None)
            for run in runs:
                run_id = run.info.run_id
                outside = self._delete_artifacts(run)
                if outside is not None:
                    left.append(outside)
                if run.info.lifecycle_stage != "deleted":
                    self._call(self.client.delete_run, run_id)
                if hard_delete is None:
                    left.append(
                        f"MLflow run {run_id}: artifacts deleted, run soft-deleted; purge it on the server with "
                        f"`mlflow gc --backend-store-uri <the server's store> --run-ids {run_id}`"
                    )
                    continue
                self._call(hard_delete, run_id)
                removed.append(f"MLflow run {run_id} ({run.data.tags.get(TAG_BATCH, '?')}) and its artifacts")
            if runs and self._lock_path is not None:
                self._vacuum()
        return removed, left

    def _delete_artifacts(self, run: Run) -> str | None:
        """Delete a run's artifacts; a sqlite store's only inside its own folder (see
        erase_identity). Returns why some could not be, if so."""
        uri = run.info.artifact_uri
        if self._lock_path is None or is_remote(uri):
            self._call(get_artifact_repository(uri, self.tracking_uri).delete_artifacts)
            return None
        folder, recorded = self._lock_path.parent.resolve(), Path(uri.removeprefix("file://")).resolve()
        own = folder / "artifacts" / run.info.run_id  # the layout this class makes
        if recorded.is_relative_to(folder):
            own = recorded
        elif recorded.parts[-2:] != (run.info.run_id, "artifacts") or not own.exists():
            if recorded.exists():
                return f"MLflow run {run.info.run_id}: its artifacts at {recorded} are outside {folder}; not touched"
            return None
        if own.exists():  # this store's, or a copied folder's own copy of them
            shutil.rmtree(own)
        return None

    def _vacuum(self) -> None:
        """Rewrite the sqlite file so deleted rows leave no bytes behind (under the file lock)."""
        import sqlite3

        connection = sqlite3.connect(_sqlite_db_path(self.tracking_uri), timeout=60)
        try:
            connection.execute("VACUUM")
        finally:
            connection.close()

    # ------------------------------------------------------- per-run operations

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        """Log (nested) params, flattened with dots; see ``flatten_params``."""
        flat = [Param(k, v) for k, v in flatten_params(params).items()]
        for i in range(0, len(flat), MAX_PARAMS_TAGS_PER_BATCH):
            self.log_batch(run_id, params=flat[i : i + MAX_PARAMS_TAGS_PER_BATCH])

    def log_batch(
        self,
        run_id: str,
        metrics: list[Metric] | None = None,
        params: list[Param] | None = None,
        tags: list[RunTag] | None = None,
    ) -> None:
        self._call(self.client.log_batch, run_id, metrics=metrics or [], params=params or [], tags=tags or [])

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        entries = [RunTag(k, str(v)) for k, v in tags.items()]
        for i in range(0, len(entries), MAX_PARAMS_TAGS_PER_BATCH):
            self.log_batch(run_id, tags=entries[i : i + MAX_PARAMS_TAGS_PER_BATCH])

    def log_artifacts(self, run_id: str, local_dir: str | Path, artifact_path: str) -> None:
        self._call(self.client.log_artifacts, run_id, str(local_dir), artifact_path)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self._call(self.client.log_text, run_id, text, artifact_file)

    def terminate(self, run_id: str, status: str) -> None:
        _check_status(status)
        self._call(self.client.set_terminated, run_id, status)

    # -------------------------------------------------------- client plumbing

    def _call(self, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        """One client call: under the sqlite file lock, retried while the database is locked.
        Its wall time, waits for the lock included, adds to `seconds`."""
        attempt, started = 0, time.perf_counter()
        try:
            while True:
                try:
                    with self._db_lock():
                        return fn(*args, **kwargs)
                except Exception as exc:
                    if attempt >= _LOCK_RETRIES or not _is_database_locked(exc):
                        raise
                time.sleep(min(2.0, 0.05 * 2**attempt) * random.uniform(0.5, 1.5))
                attempt += 1
        finally:
            self.seconds += time.perf_counter() - started

    @contextmanager
    def _db_lock(self) -> Iterator[None]:
        """Inter-process lock on ``<db>.lock`` (sqlite only); re-entrant within one Tracker."""
        if self._lock_path is None:
            yield
            return
        with self._thread_lock:
            if self._lock_depth == 0:
                lock_file = open(self._lock_path, "a+")  # noqa: SIM115 - held across the yield
                fcntl.flock(lock_file, fcntl.LOCK_EX)
                self._lock_file = lock_file
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
                if self._lock_depth == 0:
                    fcntl.flock(self._lock_file, fcntl.LOCK_UN)
                    self._lock_file.close()
                    self._lock_file = None

    def _get_or_create_experiment(self, name: str, artifact_location: str | None) -> str:
        experiment = self._call(self.client.get_experiment_by_name, name)
        if experiment is None:
            try:
                return self._call(self.client.create_experiment, name, artifact_location=artifact_location)
            except MlflowException as exc:
                # Another process (over HTTP) created it between our read and our create.
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            experiment = self._call(self.client.get_experiment_by_name, name)
        if experiment is None or experiment.lifecycle_stage != "active":
            raise ValueError(f"MLflow experiment {name!r} is deleted; restore it or use another name")
        return experiment.experiment_id

    @staticmethod
    def _filter(tags: Mapping[str, str]) -> str:
        # Every value is a validated id or a run id (hex): no quote can break the filter.
        return " and ".join(f"tags.`{key}` = '{value}'" for key, value in tags.items())

    def _search(
        self, filter_string: str, experiment_ids: list[str] | None = None, view: int = ViewType.ACTIVE_ONLY
    ) -> list[Run]:
        runs: list[Run] = []
        page_token = None
        while True:
            page = self._call(
                self.client.search_runs,
                experiment_ids or [self.experiment_id],
                filter_string=filter_string,
                run_view_type=view,
                max_results=1000,
                order_by=["attributes.start_time ASC"],
                page_token=page_token,
            )
            runs.extend(page)
            page_token = page.token
            if not page_token:
                return runs

    def _create_or_resume(self, tags: Mapping[str, str], run_name: str) -> str:
        existing = self._search(self._filter(tags))
        if not existing:
            run = self._call(
                self.client.create_run,
                self.experiment_id,
                tags={**tags, TAG_ATTEMPT: "1"},
                run_name=run_name,
            )
            return run.info.run_id
        run = existing[0]  # oldest; there is only one unless someone bypassed this class
        attempt = int(run.data.tags.get(TAG_ATTEMPT, "1")) + 1
        self._call(self.client.update_run, run.info.run_id, status="RUNNING")
        self._call(self.client.set_tag, run.info.run_id, TAG_ATTEMPT, str(attempt))
        return run.info.run_id


class IdentityRun:
    """One identity's nested run; metrics are buffered and sent in ``log_batch`` chunks.

    Use as a context manager to finish FAILED on an exception and FINISHED otherwise.
    """

    def __init__(
        self,
        tracker: Tracker,
        run_id: str,
        identity_id: str,
        batch_id: str,
        flush_every: int = MAX_METRICS_PER_BATCH,
        flush_interval_s: float = 30.0,
    ) -> None:
        if not 1 <= flush_every <= MAX_METRICS_PER_BATCH:
            raise ValueError(f"flush_every must be in [1, {MAX_METRICS_PER_BATCH}], got {flush_every}")
        self.tracker = tracker
        self.run_id = run_id
        self.identity_id = identity_id
        self.batch_id = batch_id
        self.flush_every = flush_every
        # Time-based flushes keep the MLflow UI live during a long tuning.
        self.flush_interval_s = flush_interval_s
        self._pending: list[Metric] = []
        self._last_flush = time.monotonic()
        self.finished = False

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log (nested) params, flattened with dots; see ``flatten_params``."""
        self.tracker.log_params(self.run_id, params)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Buffer one step's metrics; sent when the buffer is full or every flush_interval_s."""
        now = _now_ms()
        self._pending.extend(Metric(k, float(v), now, int(step)) for k, v in metrics.items())
        if len(self._pending) >= self.flush_every or time.monotonic() - self._last_flush >= self.flush_interval_s:
            self.flush()

    def flush(self) -> None:
        """Send the buffered metrics now."""
        while self._pending:
            chunk = self._pending[: self.flush_every]
            self.tracker.log_batch(self.run_id, metrics=chunk)
            del self._pending[: len(chunk)]
        self._last_flush = time.monotonic()

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self.tracker.set_tags(self.run_id, tags)

    def log_adapter(self, local_dir: str | Path) -> str:
        """Upload the adapter folder as artifacts under ``adapter/``: the weights, and adapter.json
        without the face descriptors, photo names or class word (`for_tracking`: those stay in
        the adapter store only). Returns its ``runs:/`` URI."""
        local_dir = Path(local_dir)
        if not (local_dir / WEIGHTS_NAME).is_file():
            raise FileNotFoundError(f"adapter folder {local_dir} has no {WEIGHTS_NAME}")
        with tempfile.TemporaryDirectory(prefix="pv-ray-mlflow-") as staging:
            shutil.copy2(local_dir / WEIGHTS_NAME, Path(staging) / WEIGHTS_NAME)
            if (local_dir / METADATA_NAME).is_file():
                metadata = for_tracking(json.loads((local_dir / METADATA_NAME).read_text()))
                (Path(staging) / METADATA_NAME).write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")
            self.tracker.log_artifacts(self.run_id, staging, ADAPTER_ARTIFACT_PATH)
        return f"runs:/{self.run_id}/{ADAPTER_ARTIFACT_PATH}"

    def log_text(self, text: str, artifact_file: str) -> None:
        """A text artifact (e.g. a failure's traceback)."""
        self.tracker.log_text(self.run_id, text, artifact_file)

    def finish(self, status: str = "FINISHED") -> None:
        """Flush buffered metrics and close the run with ``status``."""
        _check_status(status)
        self.flush()
        self.tracker.terminate(self.run_id, status)
        self.finished = True

    def __enter__(self) -> IdentityRun:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if not self.finished:
            self.finish("FAILED" if exc_type is not None else "FINISHED")


def _check_status(status: str) -> None:
    if status not in TERMINAL_STATUSES:
        raise ValueError(f"status must be one of {TERMINAL_STATUSES}, got {status!r}")


def _now_ms() -> int:
    return int(time.time() * 1000)
