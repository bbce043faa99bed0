"""Video jobs: generation queued behind the replicas, with progress, cancel and kept videos.

`JobBoard` is one named Ray actor per Serve application (detached, so its records outlive the
ingress and generator replicas; a restarted replica finds it by name). It holds every job's
record: status (queued -> running -> done | failed | cancelled), the denoising step the generator
last reported, the owner (a hash of the API key that made it), the request, the ingress replica
that dispatches it, and where its video went in the store (`jobs/<id>/video.<format>`, beside a
`job.json`). Videos and records expire after `serving.job_ttl_s`.

Every job ends, whatever dies:
- its generator replica: the ingress's call errors and the job is failed; should nothing report
  for `STALLED_AFTER_S` seconds (ingress and generator both gone), the watchdog fails it;
- its ingress replica (a queued job lives in that replica's router until a generator takes it):
  each ingress renews its lease on the board every few seconds; a queued job whose dispatcher has
  not renewed for `LEASE_S` is handed to the next ingress that renews (which dispatches it again),
  and failed with a reason once `ORPHANED_AFTER_S` pass with no ingress to take it;
- the board itself (its node): the actor restarts (`max_restarts=-1`) and reads the finished
  videos' `job.json` back from the store; jobs queued or running at that moment are lost (their
  callers see 404), and the ingress's handle reaches the new actor by itself.

Progress comes from the sampler's step callback on the generator replica: each step reports to
the board, which answers whether the job was cancelled meanwhile, so a running job stops
between two steps.
"""

# No `from __future__ import annotations`: Serve pickles these classes by value for replicas.

import hashlib
import secrets
import time
from collections import deque
from typing import Any

import ray

BOARD_NAMESPACE = "serve"
STATES = ("queued", "running", "done", "failed", "cancelled")
FINISHED = ("done", "failed", "cancelled")
STALLED_AFTER_S = 300.0  # a running job with no step reported for this long has lost its replica
LEASE_S = 15.0  # an ingress that has not renewed its lease for this long is gone: its queued jobs move
ORPHANED_AFTER_S = 120.0  # a queued job no ingress has taken over for this long is failed


class JobCancelled(Exception):
    """Raised inside the sampler's step callback: the job was cancelled between two steps."""


def new_job_id() -> str:
    """Unguessable (128 random bits) and safe in paths and URLs."""
    return secrets.token_urlsafe(16)


def owner_of(api_key: str | None) -> str | None:
    """Who a job belongs to: a hash of the API key that made it (None without API keys)."""
    return None if api_key is None else hashlib.sha256(api_key.encode()).hexdigest()


@ray.remote(num_cpus=0, max_restarts=-1)
class JobBoard:
    """Every job's record; see the module docstring."""

    def __init__(self, ttl_s: float, store: str, storage_options: dict[str, Any] | None):
        from serving.metrics import JobMetrics

        self.metrics = JobMetrics()
        self.ttl_s = ttl_s
        self.jobs: dict[str, dict[str, Any]] = {}
        self.queue: deque[str] = deque()  # queued job ids, oldest first
        self.durations: deque[float] = deque(maxlen=20)  # seconds of the last finished jobs
        self.leases: dict[str, float] = {}  # ingress replica -> when it last renewed
        self._read_back(store, storage_options)

    def submit(self, job_id: str, owner: str | None, request: Any, max_queued: int, dispatcher: str) -> bool:
        """Record a new queued job (`request`: a `serving.generator.VideoRequest`) that the ingress
        replica `dispatcher` hands to a generator; False when the queue is full."""
        self._watchdog()
        if len(self.queue) >= max_queued:
            return False
        now = time.time()
        self.leases[dispatcher] = now
        self.jobs[job_id] = {
            "id": job_id, "status": "queued", "owner": owner, "created": now, "updated": now, "started": None,
            "finished": None, "step": 0, "total_steps": request.num_inference_steps, "error": None,
            "video": None, "format": request.format, "request": request, "dispatcher": dispatcher, "cancel": False,
        }  # fmt: skip
        self.queue.append(job_id)
        self._report()
        return True

    def renew(self, dispatcher: str) -> list[tuple[str, Any, str | None]]:
        """The ingress replica `dispatcher` is alive. Returns the queued jobs it takes over from
        ingress replicas that are not: (job id, request, owner) to dispatch again."""
        now = time.time()
        self.leases[dispatcher] = now
        self._watchdog()
        taken = []
        for job_id in self.queue:
            job = self.jobs[job_id]
            if self.leases.get(job["dispatcher"], 0.0) < now - LEASE_S:
                job["dispatcher"] = dispatcher
                taken.append((job_id, job["request"], job["owner"]))
        return taken

    def view(self, job_id: str, owner: str | None) -> dict[str, Any] | None:
        """The job as its owner sees it (None: no such job, or another owner's)."""
        self._watchdog()
        job = self.jobs.get(job_id)
        if job is None or job["owner"] != owner:
            return None
        position = self.queue.index(job_id) if job["status"] == "queued" else None
        return {
            "id": job_id, "status": job["status"], "step": job["step"], "total_steps": job["total_steps"],
            "eta_s": self._eta(job, position), "position": position, "error": job["error"],
            "video": job["video"], "format": job["format"], "created": job["created"],
        }  # fmt: skip

    def pending(self, job_id: str) -> bool:
        """Whether the job still waits to start (not cancelled or expired meanwhile)."""
        job = self.jobs.get(job_id)
        return job is not None and job["status"] == "queued"

    def start(self, job_id: str) -> bool:
        """The generator begins the job; False if it was cancelled (or expired) while queued."""
        job = self.jobs.get(job_id)
        if job_id in self.queue:
            self.queue.remove(job_id)
        if job is None or job["status"] != "queued":
            return False
        job.update(status="running", started=time.time(), updated=time.time())
        self._report()
        return True

    def progress(self, job_id: str, step: int, total: int) -> bool:
        """A denoising step finished; True when the job should stop (cancelled)."""
        job = self.jobs.get(job_id)
        if job is None:
            return True
        job.update(step=step, total_steps=total, updated=time.time())
        return job["cancel"]

    def finish(self, job_id: str, status: str, error: str | None = None, video: str | None = None) -> None:
        job = self.jobs.get(job_id)
        if job is None or job["status"] in FINISHED:
            return
        if job_id in self.queue:
            self.queue.remove(job_id)
        now = time.time()
        if status == "done" and job["started"] is not None:
            self.durations.append(now - job["started"])
        job.update(status=status, error=error, video=video, finished=now, updated=now, request=None)
        self.metrics.finished.inc(tags={"status": status})
        self._report()

    def cancel(self, job_id: str, owner: str | None) -> str | None:
        """Cancel a queued job at once, a running one at its next step; the status after (None: no
        such job for this owner)."""
        job = self.jobs.get(job_id)
        if job is None or job["owner"] != owner:
            return None
        if job["status"] == "queued":
            self.finish(job_id, "cancelled", error="cancelled while queued")
        elif job["status"] == "running":
            job["cancel"] = True
        return job["status"]

    def expired(self) -> list[str]:
        """Drop the records older than the TTL; returns the store paths of their videos."""
        cutoff = time.time() - self.ttl_s
        gone = [i for i, j in self.jobs.items() if j["status"] in FINISHED and j["finished"] < cutoff]
        videos = [self.jobs[i]["video"] for i in gone if self.jobs[i]["video"]]
        for job_id in gone:
            del self.jobs[job_id]
        return videos

    def counts(self) -> dict[str, int]:
        statuses = [j["status"] for j in self.jobs.values()]
        return {s: statuses.count(s) for s in STATES}

    def retry_after_s(self) -> int:
        """A client's wait before trying again when the queue is full."""
        mean = sum(self.durations) / len(self.durations) if self.durations else 10.0
        return max(1, round(mean))

    def _report(self) -> None:
        for state, count in self.counts().items():
            self.metrics.jobs.set(count, tags={"state": state})

    def _eta(self, job: dict[str, Any], position: int | None) -> float | None:
        if job["status"] == "running" and job["step"]:
            per_step = (time.time() - job["started"]) / job["step"]
            return round(per_step * (job["total_steps"] - job["step"]), 1)
        if job["status"] == "queued" and self.durations:
            return round((position + 1) * sum(self.durations) / len(self.durations), 1)
        return 0.0 if job["status"] in FINISHED else None

    def _watchdog(self) -> None:
        now = time.time()
        for job_id, job in list(self.jobs.items()):
            if job["status"] == "running" and job["updated"] < now - STALLED_AFTER_S:
                self.finish(
                    job_id, "failed", error=f"no progress for {STALLED_AFTER_S:.0f} s: its generator replica was lost"
                )
            elif job["status"] == "queued" and self.leases.get(job["dispatcher"], 0.0) < now - ORPHANED_AFTER_S:
                error = f"its ingress replica was lost and none took the job over within {ORPHANED_AFTER_S:.0f} s"
                self.finish(job_id, "failed", error=error)

    def _read_back(self, store: str, storage_options: dict[str, Any] | None) -> None:
        """The finished jobs whose videos are in the store (after a restart of this actor)."""
        from pv_ray.storage.adapter_store import AdapterStore
        from pv_ray.storage.personal_data import JOB_MANIFEST, JOBS_FOLDER

        root = AdapterStore(store, storage_options).root
        for job_id in root.children(JOBS_FOLDER):
            try:
                manifest = root.read_json(f"{JOBS_FOLDER}/{job_id}/{JOB_MANIFEST}")
                video, created = f"{JOBS_FOLDER}/{job_id}/{manifest['video']}", float(manifest["created"])
                steps, fmt = int(manifest["total_steps"]), manifest["format"]
                if manifest["video"] not in root.children(f"{JOBS_FOLDER}/{job_id}"):
                    continue  # job.json is written first: the video never made it
            except (OSError, ValueError, KeyError, TypeError):
                continue  # unreadable, or a job.json from before these fields
            self.jobs[job_id] = {
                "id": job_id, "status": "done", "owner": manifest.get("owner"), "created": created,
                "updated": created, "started": None, "finished": created, "step": steps, "total_steps": steps,
                "error": None, "video": video, "format": fmt, "request": None, "dispatcher": None, "cancel": False,
            }  # fmt: skip
        self._report()


def job_board(ttl_s: float, store: str, storage_options: dict[str, Any] | None):
    """The board of the calling replica's application, created on first use; every replica of the
    application gets the same actor."""
    from ray import serve

    name = f"pv-ray-jobs-{serve.get_replica_context().app_name}"
    options = {"name": name, "namespace": BOARD_NAMESPACE, "lifetime": "detached", "get_if_exists": True}
    return JobBoard.options(**options).remote(ttl_s, store, storage_options)
